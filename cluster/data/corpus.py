"""A prepared corpus as later stages open it: `shards/*.parquet`, `tokenizer/`, `config.yaml` and
`manifest.json`. The manifest is written last, so a directory without one is an unfinished or
failed corpus, and `Corpus.open` refuses it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from cluster import storage
from cluster.errors import CorpusError

SPLITS = ("train", "validation")


MANIFEST = "manifest.json"


@dataclass
class Corpus:
    """A prepared corpus directory, opened by name (under RAYLM_STORAGE/prepare/) or by path."""

    path: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, name_or_path: str, root: str | None = None) -> Corpus:
        candidates = [name_or_path]
        if "/" not in name_or_path and not storage.is_uri(name_or_path):
            candidates.insert(0, storage.join(root or storage.storage_root(), "prepare", name_or_path))
        for path in candidates:
            if storage.exists(storage.join(path, MANIFEST)):
                return cls(path, storage.read_json(storage.join(path, MANIFEST)))
        for path in candidates:
            if storage.exists(path):
                raise CorpusError(
                    f"corpus '{path}' has no {MANIFEST}: its prepare run did not finish; re-run jobs.prepare"
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
