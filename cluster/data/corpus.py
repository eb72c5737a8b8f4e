"""A prepared corpus as later stages open it: `shards/*.parquet`, `tokenizer/`, `config.yaml` and
`manifest.json`, the manifest written last. This module is the one place that knows where the corpus
a name (`<storage>/prepare/<name>`) stands for lies:

- on a local disk, in `<name>/` itself;
- on an object store, in the build folder that the pointer `<name>/current.json` names (an object
  store cannot rename a folder; one PUT of the pointer is atomic), or in `<name>/` itself when there is
  no pointer (corpora prepared before pointers, or copied there from a local disk).

`CorpusBuild` writes a new corpus beside the one its name stands for (`.<name>.build-<id>/`) and
swaps it in only once its manifest is written, so the name opens the previous complete corpus until
then and after any failure. A folder with neither manifest nor pointer is an unfinished or failed
corpus, and `Corpus.open` refuses it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from cluster import storage
from cluster.errors import CorpusError, JobError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")

MANIFEST = "manifest.json"
# On object stores: {"build": ".<name>.build-<id>"}, the sibling folder the name stands for.
POINTER = "current.json"
# What a corpus folder held before pointers, removed from `<name>/` once a pointer takes over.
_UNPOINTED = (MANIFEST, "shards", "tokenizer", "config.yaml")
_BUILD = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]*\.build-[0-9a-f]{12}")


def corpus_dir(name: str, root: str | None = None) -> str:
    """The folder a corpus name stands for: `<root or RAYLM_STORAGE>/prepare/<name>`."""
    return storage.join(root or storage.storage_root(), "prepare", name)


def _parked(path: str) -> str:
    """Where a local swap keeps the corpus it replaces between its two renames."""
    return storage.join(storage.dirname(path), f".{storage.basename(path)}.previous")


def _pointed(path: str) -> str | None:
    """The build folder the pointer in `path` names; None when `path` holds no pointer."""
    pointer = storage.join(path, POINTER)
    if not storage.exists(pointer):
        return None
    try:
        build = storage.read_json(pointer).get("build")
    except (ValueError, AttributeError):  # not JSON, or not an object
        build = None
    if not isinstance(build, str) or not _BUILD.fullmatch(build):
        raise CorpusError(f"corpus '{path}': {POINTER} names no build folder ({build!r}); re-run jobs.prepare")
    return storage.join(storage.dirname(path), build)


def _complete(path: str) -> str | None:
    """The folder holding the complete corpus `path` stands for: the build its pointer names, else
    itself, else (a local swap stopped between its renames) the previous corpus parked beside it."""
    pointed = _pointed(path)
    if pointed is not None:
        return pointed
    for folder in (path, _parked(path)):
        if storage.exists(storage.join(folder, MANIFEST)):
            return folder
    return None


def resolve_corpus_path(path: str) -> str:
    """`path` as a user names a folder of a corpus (`<storage>/prepare/web/tokenizer`), where it
    lies: inside the build the corpus's pointer names. A path that exists, or whose parent holds no
    pointer, is returned as it is."""
    if storage.exists(path):
        return path
    pointed = _pointed(storage.dirname(path))
    return storage.join(pointed, storage.basename(path)) if pointed else path


@dataclass
class Corpus:
    """A prepared corpus directory, opened by name (under RAYLM_STORAGE/prepare/) or by path."""

    path: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, name_or_path: str, root: str | None = None) -> Corpus:
        """The complete corpus a name or path stands for; CorpusError, naming where it looked, when
        there is none."""
        candidates = [name_or_path]
        if "/" not in name_or_path and not storage.is_uri(name_or_path):
            candidates.insert(0, corpus_dir(name_or_path, root))
        # A swap running meanwhile can move what one look found (a local one renames two folders,
        # a pointer move removes the build it replaced): looking again, a moment later, finds the
        # corpus swapped in. Between a local swap's renames the name or its parked corpus exists.
        for pause in (0, 0.02, 0.05, 0.1, 0.2):
            time.sleep(pause)
            for path in candidates:
                folder = _complete(path)
                if folder is not None:
                    try:
                        return cls(folder, storage.read_json(storage.join(folder, MANIFEST)))
                    except FileNotFoundError:
                        continue
            if not any(storage.exists(path) or storage.exists(_parked(path)) for path in candidates):
                break
        for path in candidates:
            if storage.exists(path):
                pointed = _pointed(path)
                where = f" in the build its {POINTER} names ('{pointed}')" if pointed else ""
                raise CorpusError(
                    f"corpus '{path}' has no {MANIFEST}{where}: its prepare run did not finish; re-run jobs.prepare"
                )
        raise CorpusError(
            f"corpus '{name_or_path}' not found (looked in: {', '.join(candidates)}); "
            "prepare it with `raylm prepare` or jobs.prepare"
        )

    @property
    def layout(self) -> str:
        return self.manifest["layout"]

    @property
    def tokenizer_path(self) -> str:
        return storage.join(self.path, self.manifest["tokenizer"]["path"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        """The split's shards in manifest order: {"path", "rows"} each."""
        return [{"path": storage.join(self.path, s["file"]), "rows": s["rows"]}
                for s in self.manifest["shards"] if s["split"] == split]

    def shard_paths(self, split: str) -> list[str]:
        return [s["path"] for s in self.shards(split)]

    def split_info(self, split: str) -> dict[str, Any]:
        return self.manifest["splits"][split]

    def bytes_per_token(self, split: str) -> float:
        """Raw bytes represented by one packed token, for bits-per-byte from summed nats."""
        info = self.split_info(split)
        return info["bytes"] / max(1, info["tokens"])

    def entropy_floor(self, split: str = "validation") -> float | None:
        return (self.manifest.get("entropy_floor_bpb") or {}).get(split)

    def local_tokenizer_dir(self) -> str:
        """A local directory holding the tokenizer (downloaded once from a URI corpus)."""
        if not storage.is_uri(self.path):
            return self.tokenizer_path
        local = os.path.join(tempfile.gettempdir(), "raylm-tokenizers", self.manifest["tokenizer"]["hash"])
        if os.path.exists(os.path.join(local, "tokenizer.json")):
            return local
        # Copied into a fresh folder beside it, then renamed: pyarrow writes files only into folders
        # that exist, and every worker of a node may get here at once (the first rename wins).
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(local), prefix=".copy-")
        try:
            pafs.copy_files(self.tokenizer_path, tmp, destination_filesystem=pafs.LocalFileSystem())
            try:
                os.rename(tmp, local)
            except OSError:
                if not os.path.exists(os.path.join(local, "tokenizer.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local


class CorpusBuild:
    """A corpus being prepared under a name: written into a sibling of the folder the name stands
    for (`.<name>.build-<id>/`: never a corpus name, so never opened by one) and swapped in by
    `commit` once its manifest is written. Until then, and after any failure, the name opens the
    previous complete corpus. Two prepares of one name at once are not supported: the later one's
    `start` removes the earlier one's build."""

    def __init__(self, name: str, root: str | None = None) -> None:
        self.name = name
        self.named = corpus_dir(name, root)
        self.parent = storage.dirname(self.named)
        self.path = storage.join(self.parent, f".{name}.build-{uuid.uuid4().hex[:12]}")

    @classmethod
    def start(cls, name: str, config_yaml: str, root: str | None = None) -> CorpusBuild:
        """Tidy what an interrupted prepare of `name` left, make the build folder and write the
        resolved config into it. A storage that cannot be written fails here, naming the corpus."""
        build = cls(name, root)
        try:
            build.tidy()
            storage.makedirs(build.path)
            storage.write_text_atomic(build.file("config.yaml"), config_yaml)
        except OSError as exc:
            raise JobError(f"storage '{build.named}' is not writable: {exc}") from None
        return build

    def file(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def commit(self, manifest: dict[str, Any]) -> Corpus:
        """Write the manifest (last), then make the name stand for this build; returns it opened."""
        storage.write_json_atomic(self.file(MANIFEST), manifest)
        if storage.is_uri(self.named):
            self._move_pointer()
            return Corpus(self.path, manifest)
        self._rename_into_place()
        return Corpus(self.named, manifest)

    def abandon(self) -> None:
        """Remove this build after a failure (what a crash keeps from here, the next `start` of
        the name removes); never a build the name already stands for."""
        try:
            if _pointed(self.named) != self.path:
                storage.delete(self.path)
        except (OSError, CorpusError) as exc:
            log.warning("could not remove the failed build '%s' (the next prepare of '%s' will): %s",
                        self.path, self.name, exc)

    def tidy(self) -> None:
        """Put right what an interrupted prepare of this name left: a local corpus parked by a swap
        stopped between its renames goes back under the name (or, when the name already has the new
        one, is removed); builds the name does not stand for are removed, and so are the pointerless
        files left in `<name>/` once a pointer took over."""
        parked = _parked(self.named)
        if not storage.is_uri(self.named) and os.path.exists(parked):
            if os.path.exists(self.named):
                shutil.rmtree(parked)
            else:
                os.rename(parked, self.named)
        try:
            current = _pointed(self.named)
        except CorpusError:  # a pointer naming no build opens nothing: this build will replace it
            current = None
        for entry in storage.listdir(self.parent):
            path = storage.join(self.parent, entry)
            if _build_of(entry, self.name) and path not in (current, self.path):
                storage.delete(path)
        if current is not None:
            for entry in _UNPOINTED:
                storage.delete(storage.join(self.named, entry))

    def _rename_into_place(self) -> None:
        """Local disk: two renames. What a crash leaves at each point (`Corpus.open` by name):
        before the first, the name still holds the previous corpus, and this complete build is
        removed by the next `start`; between them, the name holds nothing and the previous corpus
        is parked at `.<name>.previous`, which `Corpus.open` reads and the next `start` moves back;
        after the second, the name holds this corpus and the parked one is removed here or by the
        next `start`. No step leaves a half-written folder under the name."""
        parked = _parked(self.named)
        if os.path.exists(parked):  # left by a swap interrupted since `start`: the name gets this build anyway
            shutil.rmtree(parked)
        had = os.path.exists(self.named)
        if had:
            os.rename(self.named, parked)
        try:
            os.rename(self.path, self.named)
        except OSError:
            if had:
                os.rename(parked, self.named)
            raise
        _quietly(storage.delete, parked)

    def _move_pointer(self) -> None:
        """Object store: one PUT of the pointer is the swap. What a crash leaves at each point:
        before it, the name still stands for the previous corpus (its pointer, or its pointerless
        files), and this complete build is removed by the next `start`; after it, the name stands
        for this build, and the previous build (or the pointerless files) is removed here or by
        the next `start`. The summary of the run that made the previous corpus goes just before
        the PUT: the job writes this run's once `prepare` returns."""
        previous = _pointed(self.named)
        storage.delete(storage.join(self.named, "summary.json"))
        storage.write_json_atomic(storage.join(self.named, POINTER), {"build": storage.basename(self.path)})
        if previous is not None:
            _quietly(storage.delete, previous)
        for entry in _UNPOINTED:  # the manifest first: these never open again once a pointer is there
            _quietly(storage.delete, storage.join(self.named, entry))


def _build_of(entry: str, name: str) -> bool:
    return re.fullmatch(rf"\.{re.escape(name)}\.build-[0-9a-f]{{12}}", entry) is not None


def _quietly(remove, path: str) -> None:
    """Remove what the swap replaced; a failure only leaves it for the next prepare to remove."""
    try:
        remove(path)
    except OSError as exc:
        log.warning("could not remove '%s' (the next prepare of the corpus will): %s", path, exc)
