"""Running multi-process jobs (DDP ranks, torchrun nodes) from tests without ever hanging CI:
one thread per rank, logs in files (never pipes), a hard timeout, and on a hang every process'
stack in the failure message. Shared by tests/test_ddp.py, tests/test_torchrun.py and the DataModule's
DDP test."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


class ProcessesHung(AssertionError):
    """The processes were still running at the timeout (the message holds their stacks)."""


# ------------------------------------------------------------------ multi-process runs that cannot hang CI

# Every rank gets one intra-op thread: on 2 shared cores, OpenMP/MKL pools spin-waiting in one rank
# steal the core the other rank needs to reach the next gloo collective.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONFAULTHANDLER": "1",  # SIGABRT (sent on timeout) prints every thread's Python stack to stderr
}
# Launcher state of an enclosing job (a SLURM allocation, torchrun) must not leak into the children.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "LIGHTNING_MIM_RUN_NAME")  # fmt: skip


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (for a gloo rendezvous, a server the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("SLURM_")}
    return {**env, **CHILD_ENV, "LIGHTNING_MIM_HOME": str(home)}


def _no_core_files() -> None:  # preexec_fn: SIGABRT below must not leave core dumps behind
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _tree(procs: list[subprocess.Popen], known: dict[int, psutil.Process]) -> None:
    """Add every live descendant (Lightning's relaunched ranks, torchrun's workers) to `known`."""
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            for q in [root, *root.children(recursive=True)]:
                known.setdefault(q.pid, q)
        except psutil.NoSuchProcess:
            pass


def _alive(known: dict[int, psutil.Process]) -> list[psutil.Process]:
    out = []
    for q in known.values():
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
        except psutil.NoSuchProcess:
            pass
    return out


def _stacks(processes: list[psutil.Process]) -> str:
    """py-spy dumps of the hung processes (if py-spy is installed), then SIGABRT: with
    PYTHONFAULTHANDLER=1 each prints all its threads' Python stacks into its own log."""
    dumps = []
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    for q in processes:
        header = f"--- pid {q.pid}: {' '.join(q.cmdline())[-300:]}" if q.is_running() else f"--- pid {q.pid}"
        if py_spy:
            try:
                res = subprocess.run([py_spy, "dump", "--pid", str(q.pid)], capture_output=True, text=True, timeout=30)
                header += "\n" + (res.stdout or res.stderr)[-4000:]
            except (subprocess.TimeoutExpired, OSError) as err:
                header += f"\n(py-spy failed: {err})"
        dumps.append(header)
    for q in processes:  # one at a time: ranks share a log file, and interleaved dumps are unreadable
        try:
            q.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            continue
        deadline = time.monotonic() + 5  # poll without reaping: Popen keeps the exit code
        while _alive({q.pid: q}) and time.monotonic() < deadline:
            time.sleep(0.1)
    return "\n".join(dumps)


def _tail(path: Path, chars: int = 8000) -> str:
    # faulthandler's one-line list of loaded extension modules is ~10 kB of noise per process
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if not line.startswith("Extension modules:"))[-chars:]


def run_processes(commands: list[list[str]], env: dict[str, str], log_dir: Path, timeout: float,
                  expected_codes: list[int] | None = None) -> float:
    """Run the commands at once (each with every process it starts) to completion; returns seconds.

    Each command's stdout+stderr go to `log_dir/proc{i}.log` (a file, not a pipe: a full pipe blocks
    the writer, which looks exactly like a hang). Fails with the logs' tails when the commands' exit
    codes are not `expected_codes` (default: all 0; -9 for a command meant to die by SIGKILL), and — when the processes are still running after `timeout` seconds, or a descendant
    (a rank) outlives its launcher by 60 s — with every process' stack dump, after which everything is killed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = [log_dir / f"proc{i}.log" for i in range(len(commands))]
    logs = [open(path, "w") for path in paths]
    start = time.monotonic()
    procs = [
        subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=_no_core_files)
        for cmd, log in zip(commands, logs)
    ]  # fmt: skip
    known: dict[int, psutil.Process] = {}
    hung, launchers_done = "", None
    try:
        while True:
            _tree(procs, known)
            alive = _alive(known)
            if all(p.poll() is not None for p in procs):
                launchers_done = launchers_done or time.monotonic()
                if not alive:
                    break
            waited = time.monotonic() - start
            if waited > timeout or (launchers_done and time.monotonic() - launchers_done > 60):
                hung = f"still running after {waited:.0f} s:\n" + _stacks(alive)
                break
            time.sleep(0.2)
    finally:
        for q in _alive(known):
            q.kill()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    seconds = time.monotonic() - start
    codes = [p.returncode for p in procs]
    if hung or codes != (expected_codes or [0] * len(procs)):
        tails = "\n".join(f"=== {path.name} (exit {code}): {' '.join(map(str, cmd))[-400:]}\n{_tail(path)}"
                          for path, code, cmd in zip(paths, codes, commands))  # fmt: skip
        raise (ProcessesHung if hung else AssertionError)(f"{hung or 'failed'} (exit codes {codes}, {seconds:.0f} s)\n{tails}")
    return seconds


