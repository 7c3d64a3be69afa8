"""The `llmkit` command line. Each module in this package defines one subcommand.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=callable(args) -> int | None` as the parser default. Modules are discovered
automatically, so adding a command means adding one file here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from llmkit.errors import LlmkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkit", description="The whole LLM lifecycle in one package.")
    parser.add_argument("--version", action="version", version=f"llmkit {__import__('llmkit').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except LlmkitError as e:
        print(f"llmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `llmkit info DIR | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
