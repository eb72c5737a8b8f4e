"""Storage for every stage: a local path or any pyarrow filesystem URI (s3://, gs://, ...).

`RAYLM_STORAGE` (default `./runs`) is the root; each job writes `<root>/<job>/<run-name>/`.
Files that mark completion (manifest.json, summary.json) are written atomically: to a temporary
name and renamed on a local disk, and as a single PUT on object stores (which is atomic there).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_root() -> str:
    root = os.environ.get("RAYLM_STORAGE", "./runs")
    return root.rstrip("/") if is_uri(root) else os.path.abspath(root.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


# URI schemes of the pyarrow filesystems that paths inside them can be turned back into URIs for.
_SCHEMES = {"s3": "s3", "gcs": "gs", "abfs": "abfs"}


def location(fs: pafs.FileSystem, path: str) -> str:
    """`path` inside `fs` (as pyarrow listings and Ray's `Checkpoint.path` give it: "bucket/key",
    no scheme) as a local path or a URI that `filesystem` opens again. Ray's checkpoints and results
    carry (filesystem, path) pairs; summaries and the registry need one string that says both."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = _SCHEMES.get(fs.type_name)
    if scheme is None:
        raise ValueError(f"no URI scheme known for pyarrow filesystem '{fs.type_name}' (path '{path}')")
    return f"{scheme}://{path.lstrip('/')}"


def listdir(path: str) -> list[str]:
    """Names of the entries of the folder at `path` (local or URI), sorted; [] when there is none."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    # compression=None: pyarrow's default ('detect') would decompress a .gz on an object store
    # only, where a local read returns the file's own bytes.
    with fs.open_input_stream(p, compression=None) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_bytes_atomic(path: str, data: bytes) -> None:
    fs, p = filesystem(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p, compression=None) as f:  # as in read_bytes: the bytes as given
            f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class Appender:
    """Lines appended to a file. A local file is appended to at once. An object store cannot
    append, so there the file is rewritten whole, starting from what it held (a resumed run or a
    restarted worker keeps the rows written before, as a local file would), at most every
    `every_s` seconds and at `flush()`, with the lines in between held here. Against an S3 server
    30 ms away a rewrite per line cost the writer ~140 ms a line (four requests: the folder's
    checks, then the PUT); a metrics row per log step, or a data-trace row per batch, paid that in
    the training loop."""

    def __init__(self, path: str, every_s: float = 0.0) -> None:
        self.path = path
        self.every_s = every_s
        self._lines: list[str] | None = None
        self._pending = False
        if is_uri(path):
            self._fs, self._path = filesystem(path)
            self._lines = read_text(path).splitlines(keepends=True) if exists(path) else []
            self._written = time.monotonic()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, line: str) -> None:
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(line)
            return
        self._lines.append(line)
        self._pending = True
        if time.monotonic() - self._written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Write the held lines now (object stores; a local file has them already)."""
        if self._lines is None or not self._pending:
            return
        with self._fs.open_output_stream(self._path, compression=None) as f:  # one PUT: atomic there
            f.write("".join(self._lines).encode("utf-8"))
        self._pending = False
        self._written = time.monotonic()


def delete_dir(path: str) -> None:
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def dirname(path: str) -> str:
    """The folder holding `path` (a local path or URI; a trailing '/' is ignored)."""
    path = path.rstrip("/")
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    """The last part of `path` (a local path or URI; a trailing '/' is ignored)."""
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path.rstrip(os.sep))


def delete(path: str) -> None:
    """Remove the file or the folder (with everything in it) at `path`; nothing when there is none."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(p)
