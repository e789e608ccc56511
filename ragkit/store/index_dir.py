"""A crash-safe index directory: immutable snapshots, an atomic ``CURRENT`` pointer, a manifest, a lock.

Layout::

    DIR/
      CURRENT            one line: the name of the live snapshot ("v000003")
      .lock              filelock's lock file (present while a writer holds it)
      .lock.owner        JSON: pid, host, command line of the writer holding the lock
      v000002/           the previous snapshot (kept so that one step back is always possible)
      v000003/           the live snapshot: files + manifest.json (checksums of every file)
      .tmp-v000004-PID/  a snapshot being written (removed by the next writer if its writer died)

A snapshot is written into a temporary directory, every file and the directory are fsynced, the
directory is renamed into place, and only then is ``CURRENT`` replaced (write a temp file, fsync,
rename, fsync the directory). A reader therefore sees either the old snapshot or the new one, never a
partial one, whatever point a writer is killed at.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from ragkit.errors import (
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    IndexReadOnlyError,
    InvalidArgumentError,
)
from ragkit.files import fsync_path, sha256_file

T = TypeVar("T")
log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LOCK = ".lock"
LOCK_OWNER = ".lock.owner"
_SNAPSHOT_RE = re.compile(r"^v(\d{6,})$")
_RESERVED = {MANIFEST}
# Test hook: when set to a stage name, the writer prints "RAGKIT-PAUSED <stage>" to stderr and sleeps
# there, so that tests can SIGKILL a real process at a known point of a commit.
_PAUSE_ENV = "RAGKIT_TEST_PAUSE_AT"


def _pause_point(stage: str) -> None:
    if os.environ.get(_PAUSE_ENV) == stage:
        print(f"RAGKIT-PAUSED {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent, directory=True)


@dataclass(frozen=True)
class Snapshot:
    """A verified, immutable snapshot: its directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict[str, Any]:
        """What the writer recorded beside the checksums (embedder, index kind, counts, ...)."""
        return self.manifest["meta"]

    def file(self, name: str) -> Path:
        """Path of a file of this snapshot; :class:`KeyError` if the manifest does not list it."""
        if name not in self.manifest["files"]:
            raise KeyError(f"snapshot {self.path} has no file {name!r}; it has {sorted(self.manifest['files'])}")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]


class SnapshotWriter:
    """Handle on a snapshot being written: put files in it with :meth:`write_bytes` or :meth:`path`.

    Files written through :meth:`path` (e.g. by ``faiss.write_index``) are fsynced at commit.
    Nothing is visible to readers until the commit finishes.
    """

    def __init__(self, tmp_dir: Path):
        self.dir = tmp_dir

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` (a plain file name, no directories)."""
        if name in _RESERVED or "/" in name or name.startswith(".") or not name:
            raise InvalidArgumentError(f"invalid snapshot file name {name!r}: use a plain name other than {MANIFEST!r}")
        return self.dir / name

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.path(name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _pause_point("writing")


class IndexDirectory:
    """A directory of immutable snapshots with an atomically switched ``CURRENT`` pointer.

    Readers call :meth:`current`. Writers hold :meth:`lock` across read-modify-write and call
    :meth:`commit`; a second writer gets :class:`IndexLockedError`. A corrupt or partial directory
    raises :class:`IndexCorruptError` and is never written over unless ``force=True``.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 0.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._lock = FileLock(self.path / LOCK, timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"IndexDirectory({str(self.path)!r})"

    # ---- reading ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the directory has a ``CURRENT`` pointer (it may still be corrupt)."""
        return (self.path / CURRENT).is_file()

    def require(self) -> None:
        """:class:`IndexNotFoundError` saying why, unless the directory has a ``CURRENT`` pointer."""
        if not self.exists():
            self.current_name()

    def current_name(self) -> str:
        """The name ``CURRENT`` points to, checked for form but not verified."""
        pointer = self.path / CURRENT
        if not pointer.is_file():
            orphans = self.snapshots()
            note = (f" (snapshot directories {orphans} exist without a {CURRENT} pointer: a first write was "
                    f"interrupted, or {CURRENT} was deleted; they are kept, never loaded)") if orphans else ""
            raise IndexNotFoundError(
                f"no index at {self.path}: no {CURRENT} file{note}. "
                f"Build one first (ragkit ingest PATH --index {self.path})."
            )
        raw = pointer.read_bytes()
        name = raw.decode("utf-8", errors="replace").strip()
        if not _SNAPSHOT_RE.match(name):
            raise IndexCorruptError(
                f"{pointer} should name a snapshot like 'v000001' but contains {raw[:60]!r}; "
                f"the index directory is damaged. Restore it or rebuild with force=True (--force)."
            )
        return name

    def current(self, *, verify: bool = True) -> Snapshot:
        """The live snapshot, its manifest parsed and (``verify=True``) every file's checksum checked."""
        return self.snapshot(self.current_name(), verify=verify)

    def read(self, load: Callable[[Snapshot], T], *, verify: bool = True, attempts: int = 50) -> T:
        """``load(live snapshot)``, again on the new live snapshot if a commit removed the one being read.

        A writer keeps the live and the previous snapshot; a slow reader can therefore find its snapshot
        deleted after two commits. Such a failure is retried as long as ``CURRENT`` moved meanwhile;
        a snapshot that is still live and fails is really damaged, and that error is raised.
        """
        for attempt in range(attempts):
            name = self.current_name()
            try:
                return load(self.snapshot(name, verify=verify))
            except (IndexCorruptError, OSError):
                if attempt == attempts - 1 or self.current_name() == name:
                    raise
        raise AssertionError("unreachable")

    def snapshot(self, name: str, *, verify: bool = True) -> Snapshot:
        """Open the snapshot ``name``; :class:`IndexCorruptError` says what is wrong with it."""
        snap_dir = self.path / name
        hint = "Restore the directory from a backup or rebuild the index with force=True (--force)."
        if not snap_dir.is_dir():
            raise IndexCorruptError(f"{self.path / CURRENT} names snapshot {name!r} but {snap_dir} does not exist. {hint}")
        manifest = self._read_manifest(snap_dir, hint)
        if verify:
            for fname, info in manifest["files"].items():
                fpath = snap_dir / fname
                if not fpath.is_file():
                    raise IndexCorruptError(f"{fpath} is listed in the manifest but missing. {hint}")
                size = fpath.stat().st_size
                if size != info["bytes"]:
                    raise IndexCorruptError(
                        f"{fpath} has {size} bytes but the manifest records {info['bytes']} (truncated or "
                        f"overwritten). {hint}"
                    )
                if sha256_file(fpath) != info["sha256"]:
                    raise IndexCorruptError(f"{fpath} fails its sha256 checksum (its content changed). {hint}")
        return Snapshot(snap_dir, manifest)

    @staticmethod
    def _read_manifest(snap_dir: Path, hint: str) -> dict[str, Any]:
        mpath = snap_dir / MANIFEST
        try:
            manifest = json.loads(mpath.read_bytes())
        except FileNotFoundError as e:
            raise IndexCorruptError(f"{mpath} is missing: {snap_dir} is not a complete snapshot. {hint}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexCorruptError(f"{mpath} is not valid JSON ({e}). {hint}") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "meta" not in manifest:
            raise IndexCorruptError(f"{mpath} lacks the 'files' and 'meta' entries of a ragkit manifest. {hint}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexCorruptError(
                f"{mpath} has format_version {version!r}; this ragkit reads version {FORMAT_VERSION}. "
                f"Use the ragkit version that wrote it, or rebuild the index."
            )
        for fname, info in manifest["files"].items():
            if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
                raise IndexCorruptError(f"{mpath}: entry for {fname!r} lacks sha256/bytes. {hint}")
        return manifest

    def snapshots(self) -> list[str]:
        """Names of the complete (renamed-into-place) snapshot directories, oldest first."""
        if not self.path.is_dir():
            return []
        names = [p.name for p in self.path.iterdir() if p.is_dir() and _SNAPSHOT_RE.match(p.name)]
        return sorted(names, key=lambda n: int(n[1:]))

    # ---- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[IndexDirectory]:
        """Hold the writer lock (re-entrant in this process); :class:`IndexLockedError` after ``timeout`` s.

        Hold it across load -> modify -> :meth:`commit`, so that no other writer's commit is lost.
        """
        if self.path.exists() and not self.path.is_dir():
            raise IndexCorruptError(f"{self.path} exists and is not a directory; choose another --index path.")
        wait = self.lock_timeout if timeout is None else timeout
        first = not self._lock.is_locked
        with self._writable():
            self.path.mkdir(parents=True, exist_ok=True)
            if first and not os.access(self.path, os.W_OK):  # filelock would wait for a lock it can never take
                raise PermissionError(errno.EACCES, "permission denied", str(self.path))
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                if wait <= 0:
                    raise IndexLockedError(self._locked_message(wait)) from None
                log.warning("index directory %s is locked by %s; waiting up to %g s for it", self.path,
                            self._holder(), wait)
                try:
                    self._lock.acquire(timeout=wait)
                except Timeout:
                    raise IndexLockedError(self._locked_message(wait)) from None
        try:
            if first:
                owner = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                         "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                with self._writable():
                    (self.path / LOCK_OWNER).write_text(json.dumps(owner))
            yield self
        finally:
            if first:
                (self.path / LOCK_OWNER).unlink(missing_ok=True)
            self._lock.release()

    @contextlib.contextmanager
    def _writable(self) -> Iterator[None]:
        """Turn a permission / read-only filesystem failure into :class:`IndexReadOnlyError`."""
        try:
            yield
        except OSError as exc:
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            raise IndexReadOnlyError(
                f"index directory {self.path} is not writable ({exc.strerror}: {exc.filename}); nothing was "
                f"changed. Make it writable (chmod u+w), or copy the index to a writable place."
            ) from None

    def _holder(self) -> str:
        """Who holds the lock, as its owner file says."""
        try:
            owner = json.loads((self.path / LOCK_OWNER).read_text())
            return f"process {owner['pid']} on {owner['host']} ({' '.join(owner['argv'])[:200]}), since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def _locked_message(self, waited: float) -> str:
        return (
            f"index directory {self.path} is locked by {self._holder()}; lock file {self.path / LOCK}. "
            f"Waited {waited:g} s. Wait for that writer to finish, or wait for it with --lock-timeout SECONDS "
            f"(Pipeline(lock_timeout=...)); "
            f"only one writer may change an index at a time."
        )

    def check_writable(self, *, force: bool = False) -> None:
        """Refuse to write over a corrupt index or into a foreign non-empty directory (unless ``force``)."""
        if force or not self.path.exists():
            return
        if not self.path.is_dir():
            raise IndexCorruptError(f"{self.path} exists and is not a directory; choose another --index path.")
        if self.exists():
            self.current()  # raises IndexCorruptError when the live snapshot is damaged
            return
        ours = {LOCK, LOCK_OWNER}
        foreign = [p.name for p in self.path.iterdir()
                   if p.name not in ours and not _SNAPSHOT_RE.match(p.name) and not p.name.startswith(".tmp-")
                   and not p.name.startswith(f".{CURRENT}.tmp")]
        if foreign:
            raise IndexCorruptError(
                f"{self.path} is not empty and has no {CURRENT} file (it holds {sorted(foreign)[:5]}); it is not a "
                f"usable ragkit index. Choose an empty directory, or pass force=True (--force) to write a new "
                f"index into it (existing files are left in place)."
            )

    def commit(self, write: Callable[[SnapshotWriter], None], *, meta: dict[str, Any],
               force: bool = False) -> Snapshot:
        """Write a new snapshot with ``write(writer)`` and make it live atomically; returns it.

        ``meta`` (JSON-serialisable) goes into the manifest beside the checksums. Takes the lock if this
        process does not hold it. Keeps the live and the previous snapshot; older ones are removed
        (not when ``force=True``: then nothing is removed).
        """
        with self.lock(), self._writable():
            self.check_writable(force=force)
            previous = self._current_name_or_none()
            existing = [int(n[1:]) for n in self.snapshots()]
            name = f"v{max(existing, default=0) + 1:06d}"
            self._remove_stale_temps()
            tmp = self.path / f".tmp-{name}-{os.getpid()}"
            tmp.mkdir()
            try:
                write(SnapshotWriter(tmp))
                files = {}
                for f in sorted(tmp.iterdir()):
                    if not f.is_file():
                        raise InvalidArgumentError(f"snapshot writers may only create plain files; {f} is not one")
                    fsync_path(f)
                    files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing was published; leave no debris
                raise
            manifest = {"format": "ragkit-index", "format_version": FORMAT_VERSION, "snapshot": name,
                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "previous": previous, "files": files, "meta": meta}
            _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            fsync_path(tmp, directory=True)
            _pause_point("before-rename")
            os.rename(tmp, self.path / name)
            fsync_path(self.path, directory=True)
            _pause_point("before-switch")
            _write_atomic(self.path / CURRENT, f"{name}\n".encode())
            _pause_point("before-gc")
            if not force:  # a forced write deletes nothing: the damaged snapshots stay for inspection
                self._collect_garbage(name, previous)
            return Snapshot(self.path / name, manifest)

    def _current_name_or_none(self) -> str | None:
        try:
            return self.current_name()
        except (IndexNotFoundError, IndexCorruptError):
            return None

    def _remove_stale_temps(self) -> None:
        """Delete temp snapshots left by writers that died (we hold the lock, so none is in progress)."""
        for p in self.path.iterdir():
            if p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p)
            elif p.name.startswith(f".{CURRENT}.tmp-"):
                p.unlink()

    def _collect_garbage(self, live: str, previous: str | None) -> None:
        """Remove snapshots other than the live and the previous one (none when there was no previous)."""
        if previous is None:
            return
        for name in self.snapshots():
            if name not in (live, previous):
                shutil.rmtree(self.path / name)
