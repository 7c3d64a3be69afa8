"""`llmkit chat --model DIR`: an interactive multi-turn chat using the tokenizer's chat template.

Commands: `/reset` clears the history, `/system TEXT` sets the system prompt (and resets),
Ctrl-D (end of input) exits. Works with piped stdin, one user message per line.
"""

from __future__ import annotations

import argparse
import sys

from llmkit.cli._args import add_model_args, add_sampling_args, load_model_and_tokenizer, sampling_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat REPL (/reset, /system TEXT, Ctrl-D exits)")
    add_model_args(p)
    p.add_argument("--system", help="system prompt")
    add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=run)


class ChatSession:
    """A conversation: messages, rendered with the chat template, trimmed to fit the context."""

    def __init__(self, model, tokenizer, system: str | None = None, **sampling):
        from llmkit.tokenizer import CHATML_TEMPLATE

        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.template = tokenizer.chat_template or CHATML_TEMPLATE
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self, system: str | None = None) -> None:
        if system is not None:
            self.system = system or None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The rendered conversation; drops the oldest turns while it leaves no room to answer."""
        from llmkit.errors import InputError

        room = self.model.config.block_size - self.sampling["max_new_tokens"]
        while True:
            ids = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True, chat_template=self.template)
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(ids) <= room:
                return ids
            if len(self.messages) - first <= 1:
                raise InputError(
                    f"the message needs {len(ids)} tokens but only {room} fit the context "
                    f"({self.model.config.block_size} minus --max-new-tokens); shorten it"
                )
            del self.messages[first : first + 2]  # oldest user/assistant pair

    def reply(self, user: str):
        """Add a user message and stream the assistant's reply (deltas); it joins the history."""
        from llmkit.infer.generate import stream_text

        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        out = []
        for delta in stream_text(self.model, self.tokenizer, ids, **self.sampling):
            out.append(delta)
            yield delta
        self.messages.append({"role": "assistant", "content": "".join(out)})


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    if tokenizer.chat_template is None:
        print("note: the tokenizer has no chat template; using ChatML", file=sys.stderr)
    session = ChatSession(model, tokenizer, args.system, **sampling_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the history, /system TEXT sets the system prompt, Ctrl-D exits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        if line.startswith("/system"):
            session.reset(line[len("/system") :].strip())
            print(f"[system prompt set: {session.system!r}; history cleared]", file=sys.stderr)
            continue
        for delta in session.reply(line):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
