"""How one registry model lies on storage: immutable versions and the pointer that names the current one.

    registry/<name>/model.json          the pointer: the current version's model.json (with its "version")
    registry/<name>/versions/<n>/       version n: the Hugging Face files and its own model.json
    registry/<name>/.publish.lock       held while a publish or gc of <name> runs (cluster/registry_lock.py)

A version is complete before any pointer names it: on a local disk it is written under a temporary
name and renamed into place; on an object store (no rename) its model.json is written last, and a
folder without one is incomplete. The pointer is then replaced in one step (write + os.replace on a
local disk, one PUT on an object store), so a reader finds the old version or the new one, complete,
wherever a publish stops. A version never changes once written, so a Serve deployment that pinned a
version's path and sha256 loads the same bytes on every replica start, whatever is published later.

The layout without versions (model.json and the weights directly in `registry/<name>/`, no "version"
in model.json) reads as version 0: served from there while it is current, and left in place (its
model.json saved as legacy.json) when a publish adds versions/1 over it, until gc removes it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from cluster import storage

POINTER = "model.json"
VERSIONS = "versions"
LEGACY_META = "legacy.json"
LOCK = ".publish.lock"
WEIGHTS = "model.safetensors"
LEGACY = 0  # the version number of the layout without versions


class RegistryError(ValueError):
    """A publish or lookup that cannot go ahead; the message names the checkpoint or model."""


def version_path(entry_dir: str, version: int) -> str:
    return entry_dir if version == LEGACY else storage.join(entry_dir, VERSIONS, str(version))


def _read(path: str) -> dict[str, Any] | None:
    if not storage.exists(path):
        return None
    data = storage.read_json(path)
    return data if isinstance(data, dict) else None


def _with_path(meta: dict[str, Any], entry_dir: str) -> dict[str, Any]:
    version = int(meta.get("version") or LEGACY)
    return {**meta, "version": version, "path": version_path(entry_dir, version)}


def current(entry_dir: str) -> dict[str, Any] | None:
    """The current version's model.json with its `version` (LEGACY for the old layout) and `path` (the
    version's folder, where its files are); None when `entry_dir` holds no published model."""
    pointer = _read(storage.join(entry_dir, POINTER))
    return None if pointer is None else _with_path(pointer, entry_dir)


def at(path: str) -> dict[str, Any]:
    """The model.json of the version folder `path`, with `path` added."""
    meta = _read(storage.join(path, POINTER))
    if meta is None:
        raise RegistryError(f"'{path}' is not a complete registry version (it has no {POINTER})")
    return {**meta, "version": int(meta.get("version") or LEGACY), "path": path}


def version_numbers(entry_dir: str) -> list[int]:
    """The numbers of the folders under versions/, complete or not, ascending."""
    return sorted(int(n) for n in storage.listdir(storage.join(entry_dir, VERSIONS)) if n.isdigit())


def next_version(entry_dir: str) -> int:
    """The number the next publish takes: above every folder, so a stopped publish's number is never reused."""
    return max(version_numbers(entry_dir), default=LEGACY) + 1


def has_legacy_copy(entry_dir: str) -> bool:
    return storage.exists(storage.join(entry_dir, WEIGHTS))


def versions(entry_dir: str) -> list[dict[str, Any]]:
    """Every version in `entry_dir`, oldest first: its model.json (none for a folder a stopped
    publish left incomplete) with `version`, `path`, `complete` and `current`."""
    now = current(entry_dir)
    current_version = now["version"] if now else None
    rows = []
    if has_legacy_copy(entry_dir):
        meta = now if current_version == LEGACY else _read(storage.join(entry_dir, LEGACY_META)) or {}
        rows.append({**meta, "version": LEGACY, "path": entry_dir, "complete": True})
    for n in version_numbers(entry_dir):
        path = version_path(entry_dir, n)
        meta = _read(storage.join(path, POINTER))
        rows.append({**(meta or {}), "version": n, "path": path, "complete": meta is not None})
    return [{**r, "current": r["version"] == current_version} for r in rows]


def write_version(entry_dir: str, version: int, entry: dict[str, Any], fill: Callable[[str], None]) -> str:
    """Write version `version` complete and return its folder: `fill(folder)` puts the model files
    in, then its model.json goes in. A local version is built under a temporary name and renamed
    into place (a rename never replaces a folder with files in it); on an object store it is
    written in place, model.json last."""
    final = version_path(entry_dir, version)
    if storage.is_uri(final):
        fill(final)
        storage.write_json_atomic(storage.join(final, POINTER), entry)
        return final
    tmp = storage.join(entry_dir, VERSIONS, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        fill(tmp)
        storage.write_json_atomic(os.path.join(tmp, POINTER), entry)
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def move_pointer(entry_dir: str, entry: dict[str, Any]) -> None:
    """Make `entry` (a complete version's model.json) current by replacing the pointer in one step.
    Over the old layout, its model.json is first saved as legacy.json, so that copy stays listed (as
    version 0) until gc."""
    pointer = storage.join(entry_dir, POINTER)
    old = _read(pointer)
    if old is not None and not old.get("version"):
        storage.write_json_atomic(storage.join(entry_dir, LEGACY_META), old)
    storage.write_json_atomic(pointer, entry)


def _delete_file(path: str) -> None:
    fs, p = storage.filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def remove_version(entry_dir: str, version: int) -> None:
    """Delete a version. Its model.json goes first (for the old layout, its weights), so a removal
    stopped partway leaves an incomplete folder, never served and removed by the next gc."""
    if version != LEGACY:
        path = version_path(entry_dir, version)
        _delete_file(storage.join(path, POINTER))
        storage.delete_dir(path)
        return
    _delete_file(storage.join(entry_dir, WEIGHTS))
    fs, p = storage.filesystem(entry_dir)
    for info in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)):
        if posixpath.basename(info.path.replace(os.sep, "/")) in (POINTER, VERSIONS, LOCK, LEGACY_META):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)
    _delete_file(storage.join(entry_dir, LEGACY_META))


def remove_leftovers(entry_dir: str) -> list[str]:
    """Delete the temporary folders that stopped local publishes left under versions/; returns them."""
    base = storage.join(entry_dir, VERSIONS)
    if storage.is_uri(base):
        return []  # object-store versions are written in place: an incomplete one is a numbered folder
    gone = [os.path.join(base, n) for n in storage.listdir(base) if n.startswith(".tmp-")]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone
