"""Run directory: ``run.json`` (provenance + settings), ``results.jsonl`` (one row per finished cell).

Rows are appended and fsynced one by one, so a killed run loses at most the cell in flight. On resume a
torn last line is cut off, and rows are matched by cell id, which hashes the configuration: results made
under other settings are never reused.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from evals.core.errors import RunDirError
from evals.core import portable

RUN_JSON = "run.json"
RESULTS = "results.jsonl"


def versions(packages: Iterable[str] = ("ragkit", "torch", "transformers", "tokenizers", "bitsandbytes",
                                        "llama-index-core", "faiss-cpu", "sentence-transformers", "numpy",
                                        "pandas")) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state(code: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs (``code``: one of its files, default this one): the git
    checkout that file is tracked in; else the commit an
    installer recorded (pip's direct_url.json, dirty unknown); else ``{"commit": None, "dirty": None}`` — never a
    commit of some other repository this directory happens to sit in, never ``dirty: false`` without a commit."""
    code = (code or Path(__file__)).resolve()
    where = code.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit and git("ls-files", "--error-unmatch", "--", code.name) is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(status) if status is not None else None, "source": "checkout"}
    return installed_commit()


def installed_commit(package: str = "ragkit") -> dict[str, Any]:
    """The commit pip recorded when ``package`` was installed from a git URL (PEP 610), else commit None."""
    try:
        raw = metadata.distribution(package).read_text("direct_url.json")
        commit = json.loads(raw or "{}").get("vcs_info", {}).get("commit_id")
    except (metadata.PackageNotFoundError, json.JSONDecodeError, AttributeError):
        commit = None
    return {"commit": commit, "dirty": None, "source": "installed package" if commit else None}


class RunDir:
    """One run's directory. ``open`` creates it or, with ``resume``, checks it was made with the same settings."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    def read_run(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / RUN_JSON).read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a run directory (no {RUN_JSON})") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.path / RUN_JSON} is damaged ({e}); start a new run with another --out") from None

    def open(self, suite: str, settings: dict[str, Any], config: str, resume: bool) -> dict[str, dict]:
        """Create or re-open the run; returns {cell_id: row} of finished cells (empty for a new run)."""
        exists = (self.path / RUN_JSON).exists()
        if exists and not resume:
            raise RunDirError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose another --out "
                "(nothing was changed)")
        if exists:
            old = self.read_run()
            if old.get("suite") != suite or old.get("config") != config:
                # compared as run.json stores settings: with machine paths made portable (provenance)
                new = portable.portable_value(json.loads(json.dumps(settings, default=str)), self.path)
                diff = sorted(k for k in set(old.get("settings", {})) | set(new)
                              if old.get("settings", {}).get(k) != new.get(k))
                raise RunDirError(
                    f"{self.path} was made with other settings (differ: {', '.join(diff) or 'suite or code version'}); "
                    "resume it with the same flags, or choose another --out (nothing was changed)")
            return self._load_rows()
        if resume and self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"{self.path} is not empty and has no {RUN_JSON}; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        return {}

    def write_run(self, record: dict[str, Any]) -> None:
        tmp = self.path / (RUN_JSON + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, self.path / RUN_JSON)

    def _load_rows(self) -> dict[str, dict]:
        """Finished rows by cell id; a torn last line (killed mid-write) is cut off the file."""
        path = self.results_path
        if not path.exists():
            return {}
        data = path.read_bytes()
        rows: dict[str, dict] = {}
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[row["cell_id"]] = row
            good += len(line)
        if good < len(data):
            print(f"note: cut a torn last line ({len(data) - good} bytes) from {path}", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(good)
        return rows

    def rows(self) -> list[dict]:
        path = self.results_path
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
        return out

    def append(self, row: dict[str, Any]) -> None:
        """One scored row into results.jsonl, fsynced before the next cell starts."""
        append_jsonl(self.results_path, row)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it: a killed run loses at most the record being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def provenance(suite: str, settings: dict[str, Any], config: str, model_info: dict[str, Any],
               run_dir: Path | None = None) -> dict[str, Any]:
    """The header of run.json: no machine paths in it (evals.core.portable; ``run_dir``: paths below it are
    written relative to it). ``config`` is the identity (hash of the settings); the rest is provenance."""
    return {
        "suite": suite,
        "config": config,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": portable.command(),
        "model": portable.portable_value(model_info, run_dir),
        "settings": portable.portable_value(settings, run_dir),
        "seeds": settings.get("seeds"),
        "git": git_state(),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
