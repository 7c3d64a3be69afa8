"""Run untrusted Python in a throw-away subprocess: rlimits, a temp dir, no network, a hard kill.

Used by the HumanEval evaluator (`eval/humaneval.py`) and meant for the agent's `python` tool, so it
imports nothing from llmkit but `errors`. Layers of protection, each used where the OS allows it:

- a new session (process group) per run, killed as a whole (SIGKILL) on timeout or at the end;
- rlimits: CPU seconds, address space (memory), file size, no core files, and process count;
- a pids cgroup (`pids.max`) when running as root with cgroup v1/v2 writable (root ignores RLIMIT_NPROC);
- `unshare --net --pid --fork --kill-child` (with `--map-root-user` when not root): a network
  namespace with only a down loopback (no network) and a pid namespace whose processes all die with it;
- the working directory is a fresh temporary folder, removed afterwards; `python -I` (isolated mode).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import InputError


@dataclass
class SandboxLimits:
    """Resource limits for one run."""

    timeout: float = 10.0  # wall-clock seconds before the process group is killed
    cpu_seconds: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS (address space)
    max_processes: int = 32  # pids.max / RLIMIT_NPROC (not enforced for root without cgroups)
    file_size_mb: int = 16  # RLIMIT_FSIZE
    network: bool = False  # True keeps the host network (no namespace)

    def validate(self) -> SandboxLimits:
        if self.timeout <= 0 or self.cpu_seconds <= 0 or self.memory_mb <= 0 or self.max_processes <= 0:
            raise InputError(f"sandbox limits must be positive, got {self}")
        return self


@dataclass
class SandboxResult:
    """What one run did. `status` is `ok`, `error` (non-zero exit), `timeout` or `killed` (signal)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` command line that works here (network + pid namespace), or () if none does."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    base = [exe, "--net", "--pid", "--fork", "--kill-child"]
    candidates = [base] if os.geteuid() == 0 else []
    candidates.append([exe, "--map-root-user", *base[1:]])
    for cmd in candidates:
        try:
            r = subprocess.run([*cmd, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return tuple(cmd)
    return ()


def _pids_cgroup_root() -> Path | None:
    """A writable pids-cgroup folder (v1 `pids` hierarchy or a v2 root with the pids controller)."""
    if os.geteuid() != 0:
        return None
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        procs = root / "cgroup.procs"
        if not procs.exists():
            continue
        if root.name != "pids" and "pids" not in (root / "cgroup.subtree_control").read_text(errors="ignore"):
            continue
        if os.access(root, os.W_OK):
            return root
    return None


def _make_cgroup(max_processes: int) -> Path | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = root / f"llmkit-sandbox-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_processes))
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _remove_cgroup(path: Path | None) -> None:
    if path is None or not path.exists():
        return
    for _ in range(50):  # processes may take a moment to be reaped after SIGKILL
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            path.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def _preexec(limits: SandboxLimits, cgroup: Path | None) -> None:
    """Runs in the child between fork and exec: join the cgroup, set the rlimits."""
    if cgroup is not None:
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    fsize = limits.file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if os.geteuid() != 0:
        # RLIMIT_NPROC counts every process of this user, so allow what already runs plus the budget
        n_user = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p))
        resource.setrlimit(resource.RLIMIT_NPROC, (n_user + limits.max_processes,) * 2)


def _owned(p: Path) -> bool:
    try:
        return p.stat().st_uid == os.getuid()
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Execute `code` with a fresh Python interpreter inside the sandbox; never raises for what the code does."""
    limits = (limits or SandboxLimits()).validate()
    workdir = tempfile.mkdtemp(prefix="llmkit-sandbox-")
    cgroup = _make_cgroup(limits.max_processes)
    prefix = () if limits.network else _unshare_prefix()
    script = Path(workdir) / "main.py"
    script.write_text(code, encoding="utf-8")
    cmd = [*prefix, sys.executable, "-I", "-B", str(script)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    t0 = time.monotonic()
    status, rc = "ok", None
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=functools.partial(_preexec, limits, cgroup),
        )
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.timeout)
            rc = proc.returncode
            if rc != 0:
                status = "killed" if rc < 0 else "error"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild keeps the pipes open: stop reading
                proc.kill()
                out, err = b"", b""
            rc = proc.returncode
    finally:
        if "proc" in locals():
            _kill_group(proc)  # leftovers (background children) never outlive the run
        _remove_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(
        status, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - t0
    )


def run_many(
    codes: list[str], limits: SandboxLimits | None = None, workers: int | None = None, progress: bool = False
) -> list[SandboxResult]:
    """`run_python` over many programs with `workers` parallel sandboxes (default: CPU count)."""
    from tqdm import tqdm

    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda c: run_python(c, limits), codes)
        return list(tqdm(it, total=len(codes), desc="sandbox", unit="program", disable=not progress))
