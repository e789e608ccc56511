"""A local OpenAI-compatible server for a ragkit model: ``transformers serve`` on loopback, as a child process.

For tests, benchmarks and trying the remote backend on one machine; production serving is vLLM or
llama.cpp's server (docs/serving.md). ``transformers serve`` was chosen because it installs from PyPI
(``fastapi`` + ``uvicorn`` beside the installed transformers), loads the same safetensors directory as
:class:`ragkit.llm.LocalLLM` (the embedded GGUF goes through ragkit's converted cache), and runs the same
``model.generate`` code, so greedy answers match in-process ones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ragkit import models
from ragkit.errors import ServerUnavailableError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """``transformers serve`` for one local model, started and stopped by this object.

    >>> with LocalServer("default") as server:
    ...     llm = OpenAICompatibleLLM(server.base_url, server.model_name)

    ``model``: as for LocalLLM (``"default"``, a directory, a ``.gguf`` file, a cached hub id).
    ``continuous_batching``: batch concurrent requests (paged attention) instead of running them one by one.
    ``threads``: torch CPU threads of the server (OMP_NUM_THREADS); on a CPU shared with other work, 1 thread is
    several times faster than threads that spin-wait for busy cores.
    """

    def __init__(self, model: str | os.PathLike[str] = models.DEFAULT, *, host: str = "127.0.0.1",
                 port: int | None = None, device: str = "cpu", dtype: str = "auto",
                 continuous_batching: bool = False, threads: int | None = None, startup_timeout: float = 300.0):
        self.directory = models.local_dir(models.resolve_llm(model))
        self.host, self.port = host, port or free_port(host)
        self.device, self.dtype = device, dtype
        self.continuous_batching = continuous_batching
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        """The name the server lists the model under (its directory)."""
        return str(self.directory)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(self.directory),
               "--host", self.host, "--port", str(self.port), "--device", self.device, "--dtype", self.dtype]
        return cmd + (["--continuous-batching"] if self.continuous_batching else [])

    def start(self) -> LocalServer:
        """Start the server and wait (bounded) until ``/health`` answers; raises ServerUnavailableError otherwise."""
        fd, log = tempfile.mkstemp(prefix="ragkit-serve-", suffix=".log")
        self.log_path = Path(log)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        while time.perf_counter() - t0 < self.startup_timeout:
            if self.process.poll() is not None:
                raise ServerUnavailableError(
                    f"transformers serve exited with code {self.process.returncode} while starting; its log:\n"
                    f"{self.log_tail()}\nInstall its dependencies with `pip install fastapi uvicorn openai`."
                )
            if self.healthy():
                self.startup_seconds = time.perf_counter() - t0
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerUnavailableError(
            f"transformers serve did not answer on {self.base_url} within {self.startup_timeout:g} s; log:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL the server at once (what a crash looks like to clients)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
