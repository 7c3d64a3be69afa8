"""When to stop: stop token ids, EOS ids, and stop strings that may span token boundaries.

OpenAI semantics: the matched stop string is not returned, and text after it is dropped.
Text that could still become a stop string is held back until it either completes one or
cannot anymore. The stop string that completes first wins (the longest one ending there),
so the result does not depend on how the text was cut into deltas.

Stop strings are matched with an Aho–Corasick automaton (Aho & Corasick, 1975): each new
character costs amortised O(1) whatever the number and length of the stop strings, and the
automaton's state is exactly what to hold back (the longest suffix that is a proper prefix of
some stop string).
"""

from __future__ import annotations

from collections import deque

FinishReason = str  # "stop" | "length"


class StopAutomaton:
    """Aho–Corasick over a set of strings. State 0 is the root; state s spells a prefix of
    `depth[s]` characters of some pattern; `out[s]` is the length of the longest pattern that is
    a suffix of that prefix (0: none)."""

    def __init__(self, patterns: list[str]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.out = [0]
        for p in patterns:
            s = 0
            for ch in p:
                nxt = self.goto[s].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[s][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[s] + 1)
                    self.out.append(0)
                s = nxt
            self.out[s] = len(p)
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first: a state's failure link points to a shallower state
            s = queue.popleft()
            for ch, nxt in self.goto[s].items():
                f = self.fail[s]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                target = self.goto[f].get(ch, 0)
                self.fail[nxt] = target if target != nxt else 0
                self.out[nxt] = self.out[nxt] or self.out[self.fail[nxt]]
                queue.append(nxt)

    def step(self, state: int, ch: str) -> int:
        """The state after reading `ch`."""
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def run(self, text: str, state: int = 0) -> int:
        for ch in text:
            state = self.step(state, ch)
        return state


class StopChecker:
    """Decide per token / per text delta whether a sequence is finished and what text may be shown.

    One checker follows one text. It remembers where the automaton stood after the last call, so
    feeding consecutive deltas costs time proportional to the deltas only; if it is handed a
    `text_so_far` it did not see, it re-reads the last `max_stop_len - 1` characters of it.
    """

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
        self._ac = StopAutomaton(self.stop) if self.stop else None
        self._seen = 0  # length of the text the automaton has read
        self._state = 0

    def check_token(self, token_id: int) -> FinishReason | None:
        """'stop' if `token_id` ends the sequence (a stop id, or EOS unless ignore_eos), else None."""
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids):
            return "stop"
        return None

    def _state_after(self, text: str) -> int:
        if self._seen != len(text):  # not the text we followed: re-read its tail
            tail = text[-(self.max_stop_len - 1) :] if self.max_stop_len > 1 else ""
            self._state, self._seen = self._ac.run(tail), len(text)
        return self._state

    def held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        if self._ac is None:
            return 0
        tail = text[-(self.max_stop_len - 1) :] if self.max_stop_len > 1 else ""
        return self._ac.depth[self._ac.run(tail)]

    def check_text(self, text_so_far: str, new_delta: str) -> tuple[bool, str]:
        """Feed the next text delta; return (finished, text to emit now).

        `text_so_far` is all text generated before `new_delta` (emitted or held back). When a
        stop string completes, the text before it is emitted and finished is True.
        """
        if self._ac is None:
            return False, new_delta
        ac = self._ac
        state = self._state_after(text_so_far)
        held = ac.depth[state]  # the end of text_so_far not shown yet
        window = (text_so_far[len(text_so_far) - held :] if held else "") + new_delta
        for i, ch in enumerate(new_delta):
            state = ac.step(state, ch)
            if ac.out[state]:
                self._state, self._seen = 0, len(text_so_far) + i + 1
                return True, window[: held + i + 1 - ac.out[state]]
        self._state, self._seen = state, len(text_so_far) + len(new_delta)
        return False, window[: len(window) - ac.depth[state]]

    def flush(self, text_so_far: str) -> str:
        """Text still held back at the end of generation (finished for another reason)."""
        if self._ac is None:
            return ""
        n = self._ac.depth[self._state_after(text_so_far)]
        return text_so_far[len(text_so_far) - n :] if n else ""
