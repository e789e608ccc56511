"""A throwaway Postgres server with pgvector on loopback, for tests, benchmarks and trying ``--store``.

It runs the Postgres 16 + pgvector binaries that the PyPI package ``pgserver`` bundles (``pip install
pgserver``), but starts them itself: listening on 127.0.0.1 only (no Unix socket), data in a directory
of the caller's choosing, trust authentication for the ``postgres`` user. As root it runs the server
as ``nobody``, since Postgres refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ragkit.errors import RagkitError


def _bin_dir() -> Path:
    try:
        import pgserver._commands as commands
    except ImportError as exc:
        raise RagkitError("a local Postgres needs pgserver's binaries: pip install 'pgserver==0.1.4'") from exc
    return Path(commands.POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """``with LocalPostgres(tmp_dir) as pg: pg.url`` — a server that lives as long as the block."""

    def __init__(self, data_dir: str | os.PathLike[str], *, port: int | None = None, fsync: bool = True):
        self.data_dir = Path(data_dir)
        self.port = port or _free_port()
        self.fsync = fsync
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = "nobody" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, str]:
        return {"user": self._user} if self._user else {}

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        """initdb (first time only), start on 127.0.0.1:port, wait until it accepts connections."""
        bin_dir = _bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(self.data_dir, self._user)
            self.data_dir.chmod(0o700)
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "--auth=trust", "-U", "postgres",
                            "--encoding=utf8", "--no-sync"], check=True, capture_output=True, **self._run_as())
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port),
                 "-c", "unix_socket_directories=", "-c", f"fsync={'on' if self.fsync else 'off'}"],
                stdout=out, stderr=subprocess.STDOUT, **self._run_as())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RagkitError(f"Postgres in {self.data_dir} exited at start (code {self._proc.returncode}); "
                                  f"its log: {log}\n{log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                  capture_output=True).returncode == 0:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RagkitError(f"Postgres in {self.data_dir} did not accept connections within {timeout:.0f} s; log: {log}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, then exit)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
