"""Chat data from plays: each speech is a turn; the reply that follows answers it.

A speech is a blank-line-separated block whose first line is a speaker's name alone, ending in
'.' or ':' (`HAMLET.`, `Hor.`, `First Citizen:`), with the spoken lines under it. Stage
directions and anything else break the run of speeches, so a reply never crosses a scene.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}[.:]$")  # a name alone on its line


@dataclass
class Speech:
    speaker: str
    text: str


def speech_runs(text: str) -> list[list[Speech]]:
    """Runs of consecutive speeches (each run: an uninterrupted stretch of dialogue)."""
    runs: list[list[Speech]] = [[]]
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln.strip() for ln in block.strip("\n").split("\n")]
        if len(lines) >= 2 and SPEAKER.match(lines[0]) and all(lines[1:]):
            runs[-1].append(Speech(lines[0][:-1].strip(), "\n".join(lines[1:])))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) >= 2]


def dialogue_pairs(text: str, max_chars: int = 400, turns: int = 1) -> list[list[dict[str, str]]]:
    """Chat conversations from a play: a speech as the user turn, the reply as the assistant turn.

    `turns` > 1 also makes conversations of that many exchanges (user, assistant, user, ...) from
    longer runs. Speeches longer than `max_chars` are skipped (with what they would pair with).
    """
    convs = []
    for run in speech_runs(text):
        for n in range(1, turns + 1):
            span = 2 * n
            for i in range(0, len(run) - span + 1, n):
                part = run[i : i + span]
                if any(s.speaker == t.speaker for s, t in zip(part, part[1:])):
                    continue  # the same speaker twice: a split block, not a reply
                if any(len(s.text) > max_chars for s in part):
                    continue
                roles = ("user", "assistant") * n
                convs.append([{"role": r, "content": s.text} for r, s in zip(roles, part)])
    return convs


def play_dialogues(files: Iterable[str | Path], max_chars: int = 400, turns: int = 2) -> list[dict[str, Any]]:
    """SFT records (`{"messages": [...]}`, the chat JSONL form `llmkit finetune` reads) from play files."""
    records = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        records += [{"messages": m} for m in dialogue_pairs(text, max_chars, turns)]
    return records
