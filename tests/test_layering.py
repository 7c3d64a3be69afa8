"""Package layering: imports only go downward (docs/architecture.md, "Layers"), so no package cycles.

Every `import llmkit.X` / `from llmkit.X import ...` in every module (module level or inside a
function) is checked against the layer map; a test fails on an upward import or one between two
packages of the same layer, which is also what any cycle between packages needs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "llmkit"

# the layer of each top-level package/module of llmkit (lower = more basic); keep in step with
# docs/architecture.md
LAYERS = {
    "errors": 0,
    "fsutil": 0,
    "text": 1,  # documents, cleaning, dedup (no tokens)
    "sandbox": 1,  # untrusted code execution (eval's HumanEval, agent's python tool)
    "tokenizer": 2,
    "data": 3,  # tokenized shards
    "model": 4,
    "infer": 5,  # the one generation loop (train samples through it)
    "train": 6,
    "serve": 6,
    "eval": 6,
    "compress": 6,  # calibration data, GGUF / ONNX export (quantizers live in model/quant.py)
    "rag": 6,  # retrieval; serve gets a rag.service.RagService from the CLI, never imports rag
    "agent": 6,  # tool-using loop over infer/ or an endpoint; the CLI hands it rag's search, never imports rag
    "cli": 7,
    "__main__": 8,
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "llmkit":
        return None
    return parts[1] if len(parts) > 1 else "llmkit"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported llmkit module) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("llmkit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("llmkit"):
            if node.module == "llmkit":  # `from llmkit import x`: x is a subpackage or a facade name
                out += [(node.lineno, f"llmkit.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        pkg = rel.parts[0].removesuffix(".py")
        if pkg == "__init__":  # the lazy public facade `llmkit/__init__.py` sits above everything
            continue
        if pkg not in LAYERS:
            bad.append(f"{rel}: package {pkg!r} has no layer in LAYERS (add it here and in docs/architecture.md)")
            continue
        for line, mod in _imports(path):
            target = _package(mod)
            if target in (None, pkg, "__version__"):
                continue
            if target not in LAYERS:
                if pkg in ("cli", "__main__"):  # the top layer may use the public facade
                    continue
                bad.append(f"{rel}:{line} imports {mod}: not a layered package")
            elif LAYERS[target] >= LAYERS[pkg]:
                bad.append(f"{rel}:{line} imports {mod}: layer {LAYERS[target]} ({target}) is not below "
                           f"layer {LAYERS[pkg]} ({pkg})")
    return bad


def test_imports_only_go_down_the_layers():
    assert violations() == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    for pkg, body in {"model": "from llmkit.infer.generate import generate\n",
                      "text": "def f():\n    from llmkit.data.shards import get_batch\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(body)
    found = violations(tmp_path)
    assert len(found) == 2
    assert "model/m.py:1 imports llmkit.infer.generate" in found[0]
    assert "text/m.py:2 imports llmkit.data.shards" in found[1]


@pytest.mark.parametrize("pkg", sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"))
def test_every_package_has_modules(pkg):
    """No empty placeholder packages: a package exists once an issue fills it."""
    assert [p for p in (SRC / pkg).rglob("*.py") if p.name != "__init__.py"], f"llmkit.{pkg} is empty"
