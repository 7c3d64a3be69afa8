"""Every ```python block in README.md and docs/*.md runs as written, so the docs never lie.

Blocks run in a fresh interpreter, in a scratch folder laid out like the repository's parent
(`../shared/data` resolves), so the documented relative paths work and nothing is written here.
A block fenced as ```python no-run is shown but not executed (servers, long training runs).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if "no-run" not in m.group(1):
                line = text[: m.start()].count("\n") + 1
                yield pytest.param(m.group(2), id=f"{doc.name}:{line}")


@pytest.mark.skipif(not SHARED.exists(), reason="../shared not present")
@pytest.mark.parametrize("code", list(blocks()))
def test_doc_block_runs(code, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_documents_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
