"""When to stop: stop token ids, EOS ids, and stop strings that may span token boundaries.

OpenAI semantics: the matched stop string is not returned, and text after it is dropped.
Text that could still become a stop string is held back until it either completes one or
cannot anymore.
"""

from __future__ import annotations

FinishReason = str  # "stop" | "length"


class StopChecker:
    """Decide per token / per text delta whether a sequence is finished and what text may be shown."""

    def __init__(
        self,
        stop: list[str] | None = None,
        stop_token_ids: set[int] | None = None,
        eos_token_ids: set[int] | None = None,
        ignore_eos: bool = False,
    ):
        self.stop = [s for s in (stop or []) if s]
        self.stop_token_ids = set(stop_token_ids or ())
        self.eos_token_ids = set(eos_token_ids or ())
        self.ignore_eos = ignore_eos
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def check_token(self, token_id: int) -> FinishReason | None:
        """'stop' if `token_id` ends the sequence (a stop id, or EOS unless ignore_eos), else None."""
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids):
            return "stop"
        return None

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def check_text(self, text_so_far: str, new_delta: str) -> tuple[bool, str]:
        """Feed the next text delta; return (finished, text to emit now).

        `text_so_far` is all text generated before `new_delta` (emitted or held back: the
        checker keeps no state, it recomputes what it held back). When a stop string
        completes, the text before it is emitted and finished is True.
        """
        if not self.stop:
            return False, new_delta
        tail_len = self.max_stop_len - 1  # only this much of text_so_far can be held back or matched
        tail = text_so_far[-tail_len:] if tail_len > 0 else ""
        start = len(tail) - self.held_back(tail)  # tail[:start] was already emitted
        window = tail + new_delta
        hits = [i for i in (window.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return True, window[start : min(hits)]
        return False, window[start : len(window) - self.held_back(window)]

    def flush(self, text_so_far: str) -> str:
        """Text still held back at the end of generation (finished for another reason)."""
        tail = text_so_far[-(self.max_stop_len - 1) :] if self.max_stop_len > 1 else ""
        n = self.held_back(tail)
        return tail[len(tail) - n :] if n else ""
