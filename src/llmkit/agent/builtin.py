"""Built-in tools: `calculator`, `python`, `read_file` / `write_file`, `rag`, and `remember` / `recall`.

`builtin_tools("calculator,python", workspace=DIR, rag=search_fn, memory=LongTermMemory)` builds them by name.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmkit.agent.tools import MAX_OBSERVATION_CHARS, Tool, format_result, tool
from llmkit.errors import InputError
from llmkit.fsutil import atomic_write_text
from llmkit.sandbox import SandboxLimits, run_python

# ---------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log,
          "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 10_000
MAX_DIGITS = 4_300  # Python's int -> str limit


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression by walking its syntax tree (never `eval`): numbers, + - * / // % **,
    parentheses, and abs round min max sqrt log exp sin cos tan floor ceil pi e."""
    if not isinstance(expression, str) or not expression.strip():
        raise InputError("calculator needs a non-empty arithmetic expression such as '12 * (3 + 4)'")
    try:
        tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise InputError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise InputError(f"exponent {b} is too large (at most {MAX_EXPONENT})")
            if isinstance(node.op, ast.Mult | ast.Pow) and isinstance(a, int) and isinstance(b, int):
                bits = a.bit_length() + b.bit_length() if isinstance(node.op, ast.Mult) else a.bit_length() * abs(b)
                if bits > MAX_DIGITS * 3.33:
                    raise InputError(f"the result would have more than {MAX_DIGITS} digits")
            try:
                return _BINARY[type(node.op)](a, b)
            except ZeroDivisionError:
                raise InputError("division by zero") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords):
            try:
                return _FUNCS[node.func.id](*[ev(a) for a in node.args])
            except (ValueError, TypeError) as e:
                raise InputError(f"{node.func.id}: {e}") from None
        raise InputError(f"unsupported in an arithmetic expression: {ast.unparse(node)!r}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


@tool(name="calculator")
def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: e.g. '(17 + 5) * 4'
    """
    return calculate(expression)


# ---------------------------------------------------------------------------- python (sandboxed)


def python_tool(limits: SandboxLimits | None = None, max_chars: int = MAX_OBSERVATION_CHARS) -> Tool:
    """The `python` tool: runs code in `llmkit.sandbox` (a subprocess with CPU, memory and time rlimits,
    a temporary working directory, no network); stdout (and stderr on failure) truncated to `max_chars`."""
    limits = (limits or SandboxLimits(timeout=10, cpu_seconds=10, memory_mb=512)).validate()

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files kept) and return what it printed.
        Use print() to see values.

        Args:
            code: a complete Python program
        """
        r = run_python(code, limits)
        out = r.stdout
        if r.status == "timeout":
            out += f"\n[timed out after {limits.timeout:g} s]"
        elif not r.ok:
            out += ("\n" if out else "") + r.stderr.strip()[-max_chars:] + f"\n[exit status {r.returncode}]"
        return format_result(out.strip() or "(no output)", max_chars)

    return tool(python, timeout=limits.timeout + 5)


# ---------------------------------------------------------------------------- files in a workspace


def _inside(workspace: Path, path: str) -> Path:
    if not isinstance(path, str) or not path.strip():
        raise InputError("path must be a non-empty relative path inside the workspace")
    p = (workspace / path).resolve()  # resolves symlinks, so a link out of the workspace is caught too
    if not p.is_relative_to(workspace):
        raise InputError(f"{path!r} is outside the workspace; use a relative path inside it")
    return p


def file_tools(workspace: str | Path, max_bytes: int = 1_000_000) -> list[Tool]:
    """`read_file` and `write_file`, confined to `workspace` (created if missing)."""
    root = Path(workspace).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()

    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: a path relative to the workspace
        """
        p = _inside(root, path)
        if not p.is_file():
            listing = sorted(str(q.relative_to(root)) for q in root.rglob("*") if q.is_file())[:50]
            raise InputError(f"no file {path!r} in the workspace; files: {', '.join(listing) or 'none'}")
        return p.read_text(encoding="utf-8", errors="replace")

    def write_file(path: str, content: str) -> str:
        """Write (replace) a text file in the workspace.

        Args:
            path: a path relative to the workspace
            content: the whole text of the file
        """
        p = _inside(root, path)
        data = content.encode("utf-8")
        if len(data) > max_bytes:
            raise InputError(f"content is {len(data)} bytes; at most {max_bytes}")
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, content)
        return f"wrote {len(data)} bytes to {p.relative_to(root)}"

    return [tool(read_file), tool(write_file)]


# ---------------------------------------------------------------------------- rag and long-term memory


def rag_tool(search: Callable[[str, int], list[dict[str, Any]]]) -> Tool:
    """The `rag` tool over a retrieval function `search(query, k) -> [{"text", "source", ...}]` (the CLI passes
    `llmkit.rag.Index(store).query`; agent/ does not import rag/, which shares its layer)."""

    def rag(query: str, k: int = 3) -> str:
        """Search the document collection and return the most relevant passages with their sources.

        Args:
            query: what to look for
            k: how many passages (1-10)
        """
        hits = search(query, max(1, min(int(k), 10)))
        if not hits:
            return "no passages found"
        return "\n\n".join(f"[{i}] ({h.get('source', '?')}) {h.get('text', '')}" for i, h in enumerate(hits, 1))

    return tool(rag)


def memory_tools(memory: Any) -> list[Tool]:
    """`remember` and `recall` over a `LongTermMemory`."""

    def remember(fact: str) -> str:
        """Store a fact in long-term memory, to be recalled in later tasks.

        Args:
            fact: one self-contained sentence
        """
        memory.add(fact)
        return "remembered"

    def recall(query: str, k: int = 3) -> str:
        """Recall the stored facts most related to a query.

        Args:
            query: what to recall
            k: how many facts
        """
        facts = memory.search(query, k)
        return "\n".join(f"- {f}" for f, _ in facts) or "nothing remembered yet"

    return [tool(remember), tool(recall)]


BUILTIN = ("calculator", "python", "read_file", "write_file", "rag", "remember", "recall")


def builtin_tools(names: str | list[str], *, workspace: str | Path | None = None,
                  rag: Callable[[str, int], list[dict[str, Any]]] | None = None, memory: Any = None,
                  python_limits: SandboxLimits | None = None) -> list[Tool]:
    """Built-in tools by name (a comma-separated string or a list)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[Tool] = []
    for n in names:
        if n not in BUILTIN:
            raise InputError(f"unknown tool {n!r}; the built-in tools are {', '.join(BUILTIN)}")
        if n == "calculator":
            out.append(calculator)
        elif n == "python":
            out.append(python_tool(python_limits))
        elif n in ("read_file", "write_file"):
            if workspace is None:
                raise InputError(f"{n} needs a workspace folder (--workspace DIR)")
            out += [t for t in file_tools(workspace) if t.name == n]
        elif n == "rag":
            if rag is None:
                raise InputError("the rag tool needs a store (--rag-store DIR, built with `llmkit rag index`)")
            out.append(rag_tool(rag))
        else:
            if memory is None:
                raise InputError(f"{n} needs a long-term memory (--memory DIR)")
            out += [t for t in memory_tools(memory) if t.name == n]
    return out
