"""The model registry on an object store (s3:// against moto's S3 server, tests/conftest.py: s3_env):
versions, the pointer, the lock through the filesystem, gc and the layout without versions, no Ray."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from cluster import registry, registry_versions, storage
from cluster.registry_lock import NameLock
from serve import tiny
from tests.conftest import S3_BUCKET
from tests.registry_helpers import PUBLISH, reweighted, start_together


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    gpt = tiny.save_gpt(str(base / "gpt"))
    return {"gpt": gpt, "gpt2": reweighted(gpt, str(base / "gpt2"), seed=2)}


@pytest.fixture
def s3_root(s3_env, monkeypatch) -> str:
    # the lock's wait for a racing PUT, shorter than the default 1 s against a server on loopback (the
    # two-process race below keeps the default)
    monkeypatch.setenv("RAYLM_REGISTRY_LOCK_SETTLE_S", "0.2")
    return f"s3://{S3_BUCKET}/registry-{uuid.uuid4().hex[:8]}"


def _versions(name: str, root: str) -> list[tuple[int, bool, bool]]:
    return [(v["version"], v["complete"], v["current"]) for v in registry.list_versions(name, root)]


def test_publish_list_load_and_gc_on_s3(ckpts, s3_root):
    from serve import engines

    v1 = registry.publish(ckpts["gpt"], "g", None, metric={"name": "loss", "value": 2.0, "mode": "min"}, root=s3_root)
    assert v1 == f"{s3_root}/g/versions/1"
    [pinned] = registry.list_models(s3_root)  # what a deployment binds
    assert pinned["path"] == v1 and pinned == registry.load_entry("g", s3_root) == registry.entry_at(v1)
    v2 = registry.publish(ckpts["gpt2"], "g", None, metric={"name": "loss", "value": 1.0, "mode": "min"}, root=s3_root)
    now = registry.load_entry("g", s3_root)
    assert now["path"] == v2 == f"{s3_root}/g/versions/2" and now["weights_sha256"] != pinned["weights_sha256"]
    assert storage.listdir(f"{s3_root}/g") == ["model.json", "versions"]  # no lock left
    # a replica started after the republish copies the pinned version from the store, digest intact
    assert engines.load(pinned).tokenizer is not None
    assert _versions("g", s3_root) == [(1, True, False), (2, True, True)] and registry.verify("g", s3_root) == []
    assert [r["version"] for r in registry.gc(keep=1, root=s3_root)] == [1]
    assert storage.listdir(f"{s3_root}/g/versions") == ["2"] and registry.verify("g", s3_root) == []


def test_a_publish_stopped_before_the_pointer_on_s3_leaves_the_previous_version(ckpts, s3_root, monkeypatch):
    registry.publish(ckpts["gpt"], "g", None, root=s3_root)

    def crash(entry_dir, entry):
        raise OSError("killed between the version and the pointer")

    monkeypatch.setattr(registry_versions, "move_pointer", crash)
    with pytest.raises(OSError, match="killed between"):
        registry.publish(ckpts["gpt2"], "g", None, force=True, root=s3_root)
    monkeypatch.undo()
    assert registry.load_entry("g", s3_root)["version"] == 1 and registry.verify("g", s3_root) == []
    assert _versions("g", s3_root) == [(1, True, True), (2, True, False)]
    # a version folder a publish stopped inside (no model.json yet): incomplete, skipped, and removed by gc
    storage.write_text_atomic(f"{s3_root}/g/versions/3/config.json", "{}")
    assert _versions("g", s3_root)[-1] == (3, False, False)
    assert registry.publish(ckpts["gpt2"], "g", None, force=True, root=s3_root) == f"{s3_root}/g/versions/4"
    assert [r["version"] for r in registry.gc(["g"], keep=0, root=s3_root)] == [1, 2, 3]
    assert _versions("g", s3_root) == [(4, True, True)]


def test_two_processes_publishing_one_name_on_s3(ckpts, s3_root, tmp_path, monkeypatch):
    monkeypatch.delenv("RAYLM_REGISTRY_LOCK_SETTLE_S")
    runs = [(ckpts[k], "g", s3_root, f"proc-{k}") for k in ("gpt", "gpt2")]
    results = start_together(PUBLISH, str(tmp_path / "go"), runs)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    paths = sorted(r[1].strip().splitlines()[-1] for r in results)
    assert paths == [f"{s3_root}/g/versions/1", f"{s3_root}/g/versions/2"]
    assert {registry.entry_at(p)["sweep_id"] for p in paths} == {"proc-gpt", "proc-gpt2"}
    current = registry.load_entry("g", s3_root)
    assert current == registry.entry_at(current["path"]) and registry.verify("g", s3_root) == []


def test_the_lock_on_s3_names_its_holder_and_goes_stale(s3_root):
    path = f"{s3_root}/g/{registry_versions.LOCK}"
    holder = NameLock(path, "registry model 'g'", wait_s=1, stale_s=60, settle_s=0.1)
    holder.acquire()
    with pytest.raises(registry.RegistryError, match=r"registry model 'g' is locked by another publish or gc \(host "
                       rf"\S+, pid \d+, .*lock file '{path}'\)"):
        NameLock(path, "registry model 'g'", wait_s=0.5, stale_s=60, settle_s=0.1).acquire()
    holder._stop.set()  # its owner hangs: no more refreshes
    holder._refresher.join()
    time.sleep(2.5)  # the store's modification times count whole seconds
    taker = NameLock(path, "registry model 'g'", wait_s=5, stale_s=1, settle_s=0.1)
    taker.acquire()
    assert taker.held() and not holder.held()
    with pytest.raises(registry.RegistryError, match="lost the lock"):
        holder.check_held()
    holder.release()  # leaves the new holder's lock alone
    assert taker.held()
    taker.release()
    assert not storage.exists(path)


def test_an_entry_without_versions_on_s3_is_read_and_kept_until_gc(ckpts, s3_root):
    from serve import engines

    old = f"{s3_root}/old"
    registry.copy_tree(ckpts["gpt"], old)
    storage.write_json_atomic(f"{old}/model.json", {"name": "old", "task": "generation", "labels": None,
                                                    "metric": None, "weights_sha256": registry.weights_sha256(ckpts["gpt"])})
    pinned = registry.load_entry("old", s3_root)
    assert pinned["version"] == 0 and pinned["path"] == old and registry.list_models(s3_root) == [pinned]
    registry.publish(ckpts["gpt2"], "old", None, root=s3_root)
    assert registry.load_entry("old", s3_root)["path"] == f"{old}/versions/1"
    local = engines.load(pinned).path  # the old copy still loads: copied here without the versions beside it
    assert "versions" not in os.listdir(local) and "model.safetensors" in os.listdir(local)
    assert _versions("old", s3_root) == [(0, True, False), (1, True, True)] and registry.verify("old", s3_root) == []
    assert [r["version"] for r in registry.gc(keep=0, root=s3_root)] == [0]
    assert storage.listdir(old) == ["model.json", "versions"] and registry.verify("old", s3_root) == []
