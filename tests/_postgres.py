"""A throwaway PostgreSQL server and an `mlflow server` whose backend store is one of its databases:
the shared stores of a sweep whose workers run on several nodes (tests/test_postgres_sweep.py,
docs/SCALING.md "Distributed sweeps").

PostgreSQL refuses to run as root: under root the server runs as the `postgres` system user (Debian's
`postgresql` package creates it), or as `nobody` where there is none, in a temporary directory of its
own (data, log, unix socket) on a free TCP port of 127.0.0.1. Missing server binaries fail the test
with what to install; nothing is skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from _processes import free_port

DB_USER = "lmim"  # the database superuser initdb creates (whatever OS user runs the server)


def postgres_bindir() -> Path:
    """The directory of `initdb`, `pg_ctl` and `createdb`: on PATH, beside a linked `pg_ctl`, or Debian's
    /usr/lib/postgresql/<version>/bin (newest version)."""
    candidates = [os.path.realpath(found) for found in map(shutil.which, ("initdb", "pg_ctl")) if found]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    for found in filter(None, candidates):
        bindir = Path(found).parent
        if all((bindir / name).exists() for name in ("initdb", "pg_ctl", "createdb")):
            return bindir
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl, createdb) not found on PATH nor in /usr/lib/postgresql/*/bin: "
                "install the server (Debian/Ubuntu: apt-get install -y postgresql; .ci/run does this)", pytrace=False)


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root; None: run it as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as", pytrace=False)


@dataclass
class Postgres:
    bindir: Path
    root: Path  # data/, server.log, the unix socket
    port: int
    account: pwd.struct_passwd | None

    def url(self, database: str) -> str:
        """SQLAlchemy URL of `database` (psycopg2): what Optuna (`sweep.storage=`) and `mlflow server` take."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str) -> None:
        """Run a PostgreSQL program as the server's account; failures raise with its output."""
        as_account = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[]) if self.account else {}
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, capture_output=True, text=True,
                              timeout=120, **as_account)
        if proc.returncode != 0:
            log = self.root / "server.log"
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                                 + (log.read_text(errors="replace")[-3000:] if log.exists() else ""))

    def createdb(self, name: str) -> None:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, name)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb + `pg_ctl start` in a fresh temporary directory; stopped (immediate) and removed afterwards.
    Trust authentication on 127.0.0.1 only: a test server, no password."""
    bindir, account = postgres_bindir(), _server_account()
    root = Path(tempfile.mkdtemp(prefix="lmim-postgres-"))  # not under pytest's tmp_path: root-only 0700 parents
    if account:
        os.chown(root, account.pw_uid, account.pw_gid)
    server = Postgres(bindir, root, free_port(), account)
    started = False
    try:
        server.run("initdb", "-D", "data", "-U", DB_USER, "--auth=trust", "-E", "UTF8")
        server.run("pg_ctl", "-D", "data", "-l", "server.log", "-w", "start",
                   "-o", f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1")
        started = True
        yield server
    finally:
        if started:
            server.run("pg_ctl", "-D", "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend_store_uri: str, artifact_root: Path, log_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:<free port> with this backend store and a local artifact root;
    yields its URL once GET /health answers. The server and its workers are stopped afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--default-artifact-root", str(artifact_root), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # first start: MLflow creates its tables (migrations) in the database
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up ({'exit ' + str(proc.returncode) if proc.poll() is not None else 'timeout'}):\n"
                                     + log_path.read_text(errors="replace")[-5000:])
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), SIGKILL after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group's other members (server workers) may outlive its leader by a moment
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
