"""Where trials keep their files: a local folder, a shared (NFS) path or an object store.

A trial writes its own checkpoint and best student here, and finds them again when it is
resumed or retried, on whichever node Ray places it. Everything that reads or writes those
files goes through `Storage`, over a pyarrow filesystem, so the same code serves a laptop's
disk, an NFS mount seen by every node, and `s3://bucket/prefix?endpoint_override=...` (or
`gs://...`) on a cluster. Driver-side files (the Optuna journal, results.parquet, the MLflow
map) stay in the local search directory and never come here.

A `Storage` is a URI string and nothing else when pickled: Ray ships it to trials on other
nodes, and each process opens the filesystem itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

# A search's storage holds one folder per trial, named by its Optuna trial number (stable
# across resumes and retries): its engine state for resuming and its best student so far.
STATE_FILE = "state.pt"
STUDENT_FILE = "student_best.pt"
# The driver's ASHA decisions for a trial: {"epoch": e} when it stopped the trial at epoch e,
# {"passed": e} when the trial may train on past rung epoch e (a reproducible search's trials
# wait at each rung for it). The trial reads it after its reports of an epoch, and again when
# it runs again after a resume.
STOP_FILE = "stopped.json"


def trial_key(number: int) -> str:
    return f"trial-{number:04d}"


def write_decision(storage: Storage, number: int, epoch: int, stop: bool) -> None:
    """Tell trial `number` (through its folder in the storage) that it stops at, or passes,
    rung epoch `epoch`."""
    decision = {"epoch": int(epoch), "by": "ASHA"} if stop else {"passed": int(epoch)}
    storage.child(trial_key(number)).write_bytes(STOP_FILE, json.dumps(decision).encode())


def read_decision(files: Storage) -> tuple[int | None, int]:
    """A trial's last decision from its folder: (the epoch it was stopped at or None, the
    highest rung epoch it passed, 0 if none)."""
    blob = files.read_bytes(STOP_FILE)
    try:
        decision = json.loads(blob) if blob else {}
        stop = decision.get("epoch")
        return (None if stop is None else int(stop)), int(decision.get("passed", 0))
    except (ValueError, TypeError, AttributeError):
        return None, 0


# Query options that carry secrets: never shown in messages.
_SECRET_OPTIONS = {"access_key", "secret_key", "session_token"}


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write a local file through a temporary name beside it and one rename: a reader, or a
    kill, sees the old file or the new one, never half of one; a write that fails (a full
    disk) leaves nothing behind. Every file searchkd writes whole goes through here."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # per writer
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(exc: BaseException) -> bool:
    """Whether an error is a full disk (or an exhausted quota), which stops a search rather
    than failing a trial: freeing space and resuming is the way out."""
    text = str(exc).lower()
    return (
        isinstance(exc, OSError)
        and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        or "no space left on device" in text
        or "database or disk is full" in text
    )


class StorageError(RuntimeError):
    """Storage that cannot be used (bad URI, no access): the message is one line."""


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(location: str) -> str:
    """A local path made absolute (relative to the working directory); URIs kept as given."""
    if is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


class Storage:
    """A folder on a local or remote filesystem, addressed by a URI or an absolute path."""

    def __init__(self, location: str) -> None:
        self.uri = normalize(location)
        self._fs: pafs.FileSystem | None = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage({self.display!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def display(self) -> str:
        """The URI with secret query options masked, for messages."""
        if not is_uri(self.uri):
            return self.uri
        parts = urlsplit(self.uri)
        query = [(k, "***" if k in _SECRET_OPTIONS else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query, safe=":/*")))

    @property
    def is_local(self) -> bool:
        """True for a path on this machine's filesystem (which may still be an NFS mount)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._open()[0]

    def _open(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem and this folder's path on it, parsed once per process."""
        if self._fs is None:
            if is_uri(self.uri):
                try:
                    fs, root = pafs.FileSystem.from_uri(self.uri)
                except (ValueError, OSError) as exc:
                    raise StorageError(f"storage {self.display}: {_one_line(exc)}") from None
            else:
                fs, root = pafs.LocalFileSystem(), self.uri
            self._fs, self._root = fs, root.rstrip("/")
        return self._fs, self._root

    def path(self, name: str = "") -> str:
        """`name` (slash-separated, relative) as a path on `fs`."""
        root = self._open()[1]
        return f"{root}/{name}" if name else root

    def child(self, *names: str) -> Storage:
        """The storage of a sub-folder (the URI's query options are kept)."""
        sub = "/".join(n.strip("/") for n in names)
        if not is_uri(self.uri):
            return Storage(str(Path(self.uri, sub)))
        parts = urlsplit(self.uri)
        return Storage(urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{sub}")))

    # -- files --------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file so that readers see the old content or the new, never half of it.

        The bytes go to a temporary name first and are then moved: a rename on a local or
        NFS path, a server-side copy on an object store (whose objects appear whole).
        """
        final = self.path(name)
        parent, _, base = final.rpartition("/")
        tmp = f"{parent}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.create_dir(parent, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, final)
        except BaseException:
            self._delete_quietly(tmp)
            raise

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def list(self, name: str = "") -> list[str]:
        """Names directly inside a folder (files and folders), sorted; [] when it is absent."""
        selector = pafs.FileSelector(self.path(name), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete(self, name: str) -> None:
        """Delete a file or a folder with its contents; absent is fine."""
        info = self.fs.get_file_info(self.path(name))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(name))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(name))

    def _delete_quietly(self, path: str) -> None:
        with contextlib.suppress(OSError):
            self.fs.delete_file(path)

    def check_writable(self) -> None:
        """Write, read back and delete a marker: a bad URI, missing credentials or a read-only
        path fail here, before a search starts, as one line."""
        marker = f".searchkd-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(marker, b"ok")
            if self.read_bytes(marker) != b"ok":
                raise OSError("a file written there could not be read back")
            self.delete(marker)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(
                f"storage {self.display} is not writable: {_one_line(exc)}"
            ) from None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
