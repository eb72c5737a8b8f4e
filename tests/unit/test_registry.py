"""The model registry: publish, versions and the pointer, the per-name lock, gc, the layout without
versions, the better-metric rule, validation."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from cluster import registry, registry_versions
from cluster.registry_lock import NameLock
from serve import tiny
from tests.registry_helpers import PUBLISH, STALLED_PUBLISH, reweighted, start


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    return {
        "gpt": tiny.save_gpt(str(base / "gpt")),
        "cls": tiny.save_bert(str(base / "cls"), "classification"),
        "mlm": tiny.save_bert(str(base / "mlm"), "fill-mask"),
        "gpt2": reweighted(str(base / "gpt"), str(base / "gpt2"), seed=2),
    }


def test_publish_and_list(ckpts, tmp_path):
    root = str(tmp_path / "reg")
    path = registry.publish(ckpts["gpt"], "gpt-tiny", "generation", metric={"name": "loss", "value": 2.0,
                                                                            "mode": "min"}, root=root)
    assert path == os.path.join(root, "gpt-tiny", "versions", "1")
    assert {"model.safetensors", "config.json", "tokenizer.json", "model.json"} <= set(os.listdir(path))
    assert sorted(os.listdir(os.path.join(root, "gpt-tiny"))) == ["model.json", "versions"]  # pointer; no lock left
    entry = registry.load_entry("gpt-tiny", root)
    assert entry["version"] == 1 and entry["path"] == path and entry == registry.entry_at(path)
    assert entry["task"] == "generation" and entry["metric"] == {"name": "loss", "value": 2.0, "mode": "min"}
    assert entry["source_checkpoint"] == ckpts["gpt"] and entry["created"].endswith("+00:00")
    assert set(entry) >= {"name", "task", "labels", "metric", "config", "source_checkpoint", "sweep_id", "created"}
    registry.publish(ckpts["cls"], "cls", "classification", root=root)
    assert [m["name"] for m in registry.list_models(root)] == ["cls", "gpt-tiny"]
    assert registry.load_entry("cls", root)["labels"] == tiny.CLASS_LABELS
    with pytest.raises(registry.RegistryError, match="no registry model 'nope'"):
        registry.load_entry("nope", root)


def test_better_metric_rule_and_force(ckpts, tmp_path):
    root = str(tmp_path / "reg")
    acc = lambda v: {"name": "accuracy", "value": v, "mode": "max"}  # noqa: E731
    registry.publish(ckpts["cls"], "c", "classification", metric=acc(0.8), root=root)
    with pytest.raises(registry.RegistryError, match="not better"):
        registry.publish(ckpts["cls"], "c", "classification", metric=acc(0.7), root=root)
    assert registry.load_entry("c", root)["metric"]["value"] == 0.8
    registry.publish(ckpts["cls"], "c", "classification", metric=acc(0.9), sweep_id="s1", root=root)
    assert registry.load_entry("c", root)["sweep_id"] == "s1"
    registry.publish(ckpts["cls"], "c", "classification", metric=acc(0.1), force=True, root=root)
    assert registry.load_entry("c", root)["metric"]["value"] == 0.1
    # a refused publish takes no version number and leaves no temporary folder or lock behind
    assert os.listdir(root) == ["c"] and sorted(os.listdir(os.path.join(root, "c"))) == ["model.json", "versions"]
    assert [(v["version"], v["metric"]["value"], v["current"]) for v in registry.list_versions("c", root)] == [
        (1, 0.8, False), (2, 0.9, False), (3, 0.1, True)]
    assert sorted(os.listdir(os.path.join(root, "c", "versions"))) == ["1", "2", "3"]


def test_atomic_publish_leaves_old_entry_on_failure(ckpts, tmp_path, monkeypatch):
    root = str(tmp_path / "reg")
    registry.publish(ckpts["gpt"], "g", "generation", root=root)

    def boom(src, dst):
        os.makedirs(dst)
        raise OSError("disk full")

    monkeypatch.setattr(registry, "copy_tree", boom)
    with pytest.raises(OSError):
        registry.publish(ckpts["gpt"], "g", "generation", force=True, root=root)
    assert os.listdir(root) == ["g"] and registry.load_entry("g", root)["version"] == 1
    assert os.listdir(os.path.join(root, "g", "versions")) == ["1"]  # the half copy is gone
    assert registry.verify("g", root) == []


def test_wrong_family_missing_weights_and_bad_input(ckpts, tmp_path):
    root = str(tmp_path / "reg")
    with pytest.raises(registry.RegistryError, match=r"cannot serve task 'classification'") as exc:
        registry.publish(ckpts["gpt"], "x", "classification", root=root)
    assert ckpts["gpt"] in str(exc.value)
    with pytest.raises(registry.RegistryError, match="cannot serve task 'generation'"):
        registry.publish(ckpts["mlm"], "x", "generation", root=root)
    registry.publish(ckpts["mlm"], "mlm", "fill-mask", root=root)
    with pytest.raises(registry.RegistryError, match="does not exist"):
        registry.publish(str(tmp_path / "missing"), "x", "generation", root=root)
    with pytest.raises(registry.RegistryError, match="task 'chat'"):
        registry.publish(ckpts["gpt"], "x", "chat", root=root)
    with pytest.raises(ValueError, match="not a valid run name"):
        registry.publish(ckpts["gpt"], "../escape", "generation", root=root)
    with pytest.raises(registry.RegistryError, match="metric"):
        registry.publish(ckpts["gpt"], "x", "generation", metric={"value": 1}, root=root)


def test_pickle_weights_refused_and_never_copied(ckpts, tmp_path):
    import shutil

    root = str(tmp_path / "reg")
    pickled = tmp_path / "pickled"
    shutil.copytree(ckpts["gpt"], pickled)
    os.rename(pickled / "model.safetensors", pickled / "pytorch_model.bin")
    with pytest.raises(registry.RegistryError, match="no model.safetensors"):
        registry.publish(str(pickled), "x", "generation", root=root)
    both = tmp_path / "both"
    shutil.copytree(ckpts["gpt"], both)
    (both / "pytorch_model.bin").write_bytes(b"not loaded")
    os.makedirs(both / "train_state")
    path = registry.publish(str(both), "both", "generation", root=root)
    assert "pytorch_model.bin" not in os.listdir(path) and "train_state" not in os.listdir(path)


def test_publish_cli(ckpts, tmp_path, capsys):
    from jobs.publish import main

    root = str(tmp_path / "reg")
    assert main([ckpts["gpt"], "--name", "gpt-tiny", "--task", "generation", "--metric", "loss=2.5",
                 "--mode", "min", "--root", root]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == os.path.join(root, "gpt-tiny", "versions", "1")
    printed = json.loads("\n".join(out[:-1]))  # the entry of the version just published
    assert printed["version"] == 1 and printed["path"] == out[-1] and printed["metric"]["value"] == 2.5
    assert main([ckpts["gpt"], "--name", "gpt-tiny", "--task", "generation", "--metric", "loss=3",
                 "--mode", "min", "--root", root]) == 1
    assert "not better" in capsys.readouterr().err
    assert main([ckpts["gpt"], "--name", "gpt-tiny", "--task", "generation", "--root", root, "--force"]) == 0
    with open(os.path.join(root, "gpt-tiny", "model.json")) as f:
        assert json.load(f)["metric"] is None


def test_corrupted_weights_are_refused_at_publish_and_at_load(ckpts, tmp_path):
    import shutil

    from serve import engines

    root = str(tmp_path / "reg")
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpts["cls"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(registry.RegistryError, match="model.safetensors is corrupted"):
        registry.publish(str(truncated), "t", "classification", root=root)
    assert registry.list_models(root) == []

    path = registry.publish(ckpts["cls"], "cls", "classification", root=root)
    entry = registry.load_entry("cls", root)
    assert entry["weights_sha256"] == registry.weights_sha256(ckpts["cls"])
    engines.load(entry)  # intact: loads
    weights = os.path.join(path, "model.safetensors")
    flipped = bytearray(open(weights, "rb").read())
    flipped[-5] ^= 0xFF  # one bit pattern inside a tensor: the header still parses
    open(weights, "wb").write(bytes(flipped))
    registry.check_weights(path)  # the header alone cannot tell ...
    with pytest.raises(registry.RegistryError, match="does not match the sha256 recorded when it was published"):
        engines.load(entry)  # ... the digest recorded at publish can: never served


def test_the_task_is_the_one_the_architecture_serves_unless_named(ckpts, tmp_path):
    import shutil

    root = str(tmp_path / "reg")
    for key, task in (("gpt", "generation"), ("mlm", "fill-mask"), ("cls", "classification")):
        registry.publish(ckpts[key], key, None, root=root)
        assert registry.load_entry(key, root)["task"] == task
    odd = tmp_path / "odd"
    shutil.copytree(ckpts["gpt"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2Model"]}))
    with pytest.raises(registry.RegistryError, match=r"cannot tell which task checkpoint .* from its architecture "
                       r"\['GPT2Model'\]; name it \(--task generation\|fill-mask"):
        registry.publish(str(odd), "odd", None, root=root)


def _finished_run(storage_root, job, name, checkpoint, **summary):
    run = storage_root / job / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"job": job, "name": name, "final": {"checkpoint": checkpoint},
                                                  "best": {"checkpoint": checkpoint}, **summary}))
    return run


def test_publish_cli_takes_a_run_by_name_or_folder(ckpts, tmp_path, monkeypatch, capsys):
    from jobs.publish import main

    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path / "store"))
    reg = str(tmp_path / "store" / "registry")
    run = _finished_run(tmp_path / "store", "finetune", "topic", ckpts["cls"])
    assert main(["topic", "--name", "topic-cls"]) == 0
    entry = registry.load_entry("topic-cls", reg)
    assert entry["task"] == "classification" and entry["source_checkpoint"] == ckpts["cls"]
    assert f"publishing {ckpts['cls']}" in capsys.readouterr().err
    assert main([str(run), "--name", "by-folder"]) == 0
    assert registry.load_entry("by-folder", reg)["source_checkpoint"] == ckpts["cls"]

    _finished_run(tmp_path / "store", "tune", "sweep", ckpts["cls"])  # a sweep: its best trial's
    assert main(["sweep", "--name", "from-sweep"]) == 0
    assert registry.load_entry("from-sweep", reg)["source_checkpoint"] == ckpts["cls"]
    _finished_run(tmp_path / "store", "pretrain", "topic", ckpts["gpt"])
    assert main(["topic", "--name", "x"]) == 1
    assert "'topic' names 2 runs" in capsys.readouterr().err
    (tmp_path / "store" / "pretrain" / "half").mkdir()
    assert main(["half", "--name", "x"]) == 1
    assert "has no summary.json: it has not finished" in capsys.readouterr().err
    assert main(["nothing", "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint 'nothing' does not exist, and no run of that name is under" in err
    assert not os.path.exists(os.path.join(reg, "x"))


def test_a_published_run_records_its_metric(ckpts, tmp_path, monkeypatch, capsys):
    # Regression: `raylm publish <run>` recorded metric null, so any later model replaced it and a
    # sweep's better-metric rule had nothing to compare with.
    from jobs.publish import main

    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path / "store"))
    reg = str(tmp_path / "store" / "registry")
    best = {"checkpoint": ckpts["cls"], "metrics": {"val_loss": 0.31, "val_accuracy": 0.9, "step": 40}}
    _finished_run(tmp_path / "store", "finetune", "ft", ckpts["cls"], task="classification", best=best)
    assert main(["ft", "--name", "topic"]) == 0
    assert registry.load_entry("topic", reg)["metric"] == {"name": "val_accuracy", "value": 0.9, "mode": "max"}
    assert "metric from the run's summary: val_accuracy=0.9 (max)" in capsys.readouterr().err
    # completion without generated examples has no ROUGE-L: its val_loss, lower is better
    best = {"checkpoint": ckpts["gpt"], "metrics": {"val_loss": 1.7, "val_perplexity": 5.5}}
    _finished_run(tmp_path / "store", "finetune", "cmp", ckpts["gpt"], task="completion", best=best)
    assert main(["cmp", "--name", "cmp"]) == 0
    assert registry.load_entry("cmp", reg)["metric"] == {"name": "val_loss", "value": 1.7, "mode": "min"}
    # a sweep records its objective; a worse sweep result is refused like a worse sweep
    _finished_run(tmp_path / "store", "tune", "sw", ckpts["cls"], metric="val_accuracy", mode="max",
                  best={"checkpoint": ckpts["cls"], "val_accuracy": 0.8, "best_step": 30})
    assert main(["sw", "--name", "topic"]) == 1
    err = capsys.readouterr().err
    assert "metric from the run's summary: val_accuracy=0.8 (max)" in err and "is not better" in err
    # --metric wins; a pretraining run without a best checkpoint records its final val_loss
    _finished_run(tmp_path / "store", "pretrain", "pt", ckpts["gpt"], best=None,
                  final={"checkpoint": ckpts["gpt"], "metrics": {"val_loss": 3.2, "step": 80}})
    assert main(["pt", "--name", "pt"]) == 0
    assert registry.load_entry("pt", reg)["metric"] == {"name": "val_loss", "value": 3.2, "mode": "min"}
    assert main(["pt", "--name", "pt2", "--metric", "bpb=1.5", "--mode", "min"]) == 0
    assert registry.load_entry("pt2", reg)["metric"] == {"name": "bpb", "value": 1.5, "mode": "min"}


def test_a_published_checkpoint_records_the_config_it_was_trained_with(ckpts, tmp_path):
    # the registry's config was null unless the caller passed one; a raylm checkpoint saves its
    # training config beside the weights (train_state/config.json)
    import shutil

    root = str(tmp_path / "reg")
    assert registry.entry_at(registry.publish(ckpts["cls"], "plain", None, root=root))["config"] is None
    ckpt = tmp_path / "trained"
    shutil.copytree(ckpts["cls"], ckpt)
    (ckpt / "train_state").mkdir()
    (ckpt / "train_state" / "config.json").write_text(json.dumps({"task": "classification", "optim": {"lr": 3e-4}}))
    registry.publish(str(ckpt), "trained", None, root=root)
    entry = registry.load_entry("trained", root)
    assert entry["config"] == {"task": "classification", "optim": {"lr": 3e-4}}
    assert not os.path.exists(os.path.join(entry["path"], "train_state"))  # recorded, not copied
    registry.publish(str(ckpt), "given", None, config={"optim": {"lr": 1e-3}}, root=root)
    assert registry.load_entry("given", root)["config"] == {"optim": {"lr": 1e-3}}


# ---------------------------------------------------------------- versions, the pointer, the lock, gc


def _versions(name: str, root: str) -> list[tuple[int, bool, bool]]:
    """(version, complete, current) of each version of `name`."""
    return [(v["version"], v["complete"], v["current"]) for v in registry.list_versions(name, root)]


def test_a_republish_leaves_the_version_a_deployment_pinned_loadable(ckpts, tmp_path):
    from serve import engines

    root = str(tmp_path / "reg")
    registry.publish(ckpts["gpt"], "g", None, root=root)
    [pinned] = registry.list_models(root)  # what build_app binds into a deployment
    v2 = registry.publish(ckpts["gpt2"], "g", None, force=True, root=root)
    now = registry.load_entry("g", root)
    assert now["path"] == v2 and now["version"] == 2 and now["weights_sha256"] != pinned["weights_sha256"]
    assert engines.load(pinned).path == pinned["path"]  # a replica started now still loads version 1, intact
    assert engines.load(now).path == v2
    assert registry.verify("g", root) == []


def test_concurrent_publishes_of_one_name_take_turns_on_the_better_metric_rule(ckpts, tmp_path):
    root = str(tmp_path / "reg")
    values = [0.1, 0.4, 0.2, 0.3]
    barrier, outcome = threading.Barrier(len(values)), {}

    def publish(value: float) -> None:
        barrier.wait()
        try:
            outcome[value] = registry.publish(ckpts["cls"], "c", None, root=root,
                                              metric={"name": "acc", "value": value, "mode": "max"})
        except registry.RegistryError as exc:
            outcome[value] = exc

    threads = [threading.Thread(target=publish, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [e for e in outcome.values() if not isinstance(e, str)]
    assert len(outcome) == 4 and all("is not better" in str(e) for e in refused), outcome
    assert registry.load_entry("c", root)["metric"]["value"] == 0.4  # the best, in whatever order they ran
    versions = registry.list_versions("c", root)
    assert [v["version"] for v in versions] == list(range(1, 5 - len(refused)))
    metrics = [v["metric"]["value"] for v in versions]
    assert metrics == sorted(metrics) and len(set(metrics)) == len(metrics)  # each one beat the one before
    assert sorted(p for p in outcome.values() if isinstance(p, str)) == [v["path"] for v in versions]
    assert registry.verify("c", root) == []


def test_two_processes_publishing_one_name_leave_one_pointer_and_both_versions(ckpts, tmp_path):
    from tests.registry_helpers import start_together

    root = str(tmp_path / "reg")
    runs = [(ckpts[k], "g", root, f"proc-{k}") for k in ("gpt", "gpt2")]
    results = start_together(PUBLISH, str(tmp_path / "go"), runs)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    paths = [r[1].strip().splitlines()[-1] for r in results]
    assert sorted(paths) == [os.path.join(root, "g", "versions", n) for n in ("1", "2")]
    for (ckpt, _, _, sweep_id), path in zip(runs, paths, strict=True):
        entry = registry.entry_at(path)
        assert entry["sweep_id"] == sweep_id and entry["weights_sha256"] == registry.weights_sha256(ckpt)
    current = registry.load_entry("g", root)
    assert current == registry.entry_at(current["path"])  # the pointer is one whole version's model.json
    assert sorted(os.listdir(os.path.join(root, "g"))) == ["model.json", "versions"]
    assert registry.verify("g", root) == []


def _crash(entry_dir, entry):
    raise OSError("killed between the version and the pointer")


def test_a_publish_stopped_before_the_pointer_leaves_the_previous_version_current(ckpts, tmp_path, monkeypatch):
    from serve import engines

    root = str(tmp_path / "reg")
    registry.publish(ckpts["gpt"], "g", None, root=root)
    monkeypatch.setattr(registry_versions, "move_pointer", _crash)
    with pytest.raises(OSError, match="killed between"):
        registry.publish(ckpts["gpt2"], "g", None, force=True, root=root)
    monkeypatch.undo()
    entry = registry.load_entry("g", root)
    assert entry["version"] == 1 and engines.load(entry).path == entry["path"]
    assert _versions("g", root) == [(1, True, True), (2, True, False)]  # written whole, never current
    # the lock went with the failed publish: the next one goes ahead at once, under a new number
    assert registry.publish(ckpts["gpt2"], "g", None, force=True, root=root) == os.path.join(root, "g", "versions", "3")
    assert registry.verify("g", root) == []


def test_a_publish_killed_before_the_pointer_leaves_the_previous_version_current(ckpts, tmp_path, monkeypatch):
    from serve import engines

    root, marker = str(tmp_path / "reg"), str(tmp_path / "stalled")
    registry.publish(ckpts["gpt"], "g", None, root=root)
    proc = start(STALLED_PUBLISH, ckpts["gpt2"], "g", root, "killed", marker)
    deadline = time.monotonic() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    entry = registry.load_entry("g", root)
    assert entry["version"] == 1 and engines.load(entry).path == entry["path"]
    assert _versions("g", root) == [(1, True, True), (2, True, False)]
    lock = os.path.join(root, "g", registry_versions.LOCK)
    assert json.load(open(lock))["pid"] == proc.pid  # the killed publish's lock is left behind ...
    monkeypatch.setenv("RAYLM_REGISTRY_LOCK_WAIT_S", "10")  # far below the stale timeout (120 s)
    v3 = registry.publish(ckpts["gpt2"], "g", None, force=True, root=root)  # ... stale at once: its owner is gone
    assert registry.load_entry("g", root)["path"] == v3 == os.path.join(root, "g", "versions", "3")
    assert registry.verify("g", root) == [] and not os.path.exists(lock)


def _lock_file(path: str, host: str, pid: int, age_s: float = 0.0, pid_namespace: str = "") -> None:
    """A lock as another publish leaves it: its owner, and last refreshed `age_s` seconds ago."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"host": host, "pid_namespace": pid_namespace, "pid": pid, "token": "theirs",
                   "taken": time.time() - age_s}, f)
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_held_lock_makes_a_publish_fail_naming_its_holder_and_a_stale_one_is_broken(ckpts, tmp_path, monkeypatch):
    root = str(tmp_path / "reg")
    lock = os.path.join(root, "g", registry_versions.LOCK)
    _lock_file(lock, "other-host", 4242)
    monkeypatch.setenv("RAYLM_REGISTRY_LOCK_WAIT_S", "0.5")
    with pytest.raises(registry.RegistryError, match=r"registry model 'g' is locked by another publish or gc \(host "
                       r"other-host, pid 4242, taken \d+ s ago, refreshed \d+ s ago; lock file '.*\.publish\.lock'\), "
                       r"still held after 0\.5 s of waiting"):
        registry.publish(ckpts["gpt"], "g", None, root=root)
    assert registry.list_models(root) == [] and not os.path.exists(os.path.join(root, "g", "versions"))
    _lock_file(lock, "other-host", 4242, age_s=1000)  # not refreshed for longer than the stale timeout
    assert registry.publish(ckpts["gpt"], "g", None, root=root) == os.path.join(root, "g", "versions", "1")
    assert not os.path.exists(lock)


def test_a_lock_whose_owner_on_this_host_is_gone_is_stale_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    from cluster.registry_lock import _pid_namespace

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = str(tmp_path / "lock")
    _lock_file(path, socket.gethostname(), gone.pid, pid_namespace=_pid_namespace())
    with NameLock(path, "model 'x'", wait_s=1, stale_s=3600) as lock:
        assert lock.held()
    assert not os.path.exists(path)
    # the same pid number in another PID namespace (another container) is not this host's process: kept
    _lock_file(path, socket.gethostname(), gone.pid, pid_namespace="pid:[other]")
    with pytest.raises(registry.RegistryError, match="locked by another publish"):
        NameLock(path, "model 'x'", wait_s=0.3, stale_s=3600).acquire()
    # a live owner (this process) is waited for
    _lock_file(path, socket.gethostname(), os.getpid(), pid_namespace=_pid_namespace())
    with pytest.raises(registry.RegistryError, match=rf"pid {os.getpid()}"):
        NameLock(path, "model 'x'", wait_s=0.3, stale_s=3600).acquire()


def test_a_held_lock_is_refreshed_so_a_long_publish_never_looks_stale(tmp_path):
    path = str(tmp_path / "lock")
    with NameLock(path, "model 'x'", stale_s=0.8) as held:
        time.sleep(1.6)  # twice the stale timeout: the holder's thread refreshed it meanwhile
        with pytest.raises(registry.RegistryError, match="locked by another publish"):
            NameLock(path, "model 'x'", wait_s=0.3, stale_s=0.8).acquire()
        assert held.held()


def test_a_lost_lock_is_noticed_and_breaking_never_removes_a_newer_lock(tmp_path):
    path = str(tmp_path / "lock")
    first = NameLock(path, "model 'x'", wait_s=1, stale_s=60)
    first.acquire()
    os.remove(path)  # as a waiter that judged it stale does
    second = NameLock(path, "model 'x'", wait_s=1, stale_s=60)
    second.acquire()
    with pytest.raises(registry.RegistryError, match=r"model 'x': lost the lock '.*lock' \(another publish or gc judged it stale: not "
                       r"refreshed for 60 s, or its owner gone\); nothing was made current"):
        first.check_held()
    first.release()
    assert second.held()  # releasing a lost lock leaves the new holder's alone
    NameLock(path, "model 'x'")._break({"token": "judged-stale-earlier", "age_s": 999.0})
    assert second.held()  # a waiter that judged an older lock stale puts back the one it finds
    second.release()
    assert not os.path.exists(path) and not os.listdir(tmp_path)


def test_lock_timeouts_from_the_environment_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_REGISTRY_LOCK_STALE_S", "soon")
    with pytest.raises(registry.RegistryError, match="RAYLM_REGISTRY_LOCK_STALE_S='soon' is not a positive number"):
        NameLock(str(tmp_path / "lock"), "model 'x'")


def test_gc_keeps_the_current_and_the_newest_versions(ckpts, tmp_path, monkeypatch):
    root = str(tmp_path / "reg")
    versions_dir = os.path.join(root, "g", "versions")
    for _ in range(3):
        registry.publish(ckpts["gpt"], "g", None, force=True, root=root)
    monkeypatch.setattr(registry_versions, "move_pointer", _crash)
    with pytest.raises(OSError):  # version 4: the newest, never made current
        registry.publish(ckpts["gpt2"], "g", None, force=True, root=root)
    monkeypatch.undo()
    os.makedirs(os.path.join(versions_dir, ".tmp-5-deadbeef"))  # a local copy a killed publish left
    registry.publish(ckpts["cls"], "c", None, root=root)
    assert [r["version"] for r in registry.gc(["g"], keep=1, root=root, dry_run=True)] == [1, 2]
    assert sorted(os.listdir(versions_dir)) == [".tmp-5-deadbeef", "1", "2", "3", "4"]  # a dry run removes nothing
    assert [r["version"] for r in registry.gc(["g"], keep=1, root=root)] == [1, 2]
    assert sorted(os.listdir(versions_dir)) == ["3", "4"]  # the current one and the newest
    assert [r["version"] for r in registry.gc(["g"], keep=0, root=root)] == [4]
    assert _versions("g", root) == [(3, True, True)] and registry.verify("g", root) == []
    assert registry.gc(keep=0, root=root) == [] and _versions("c", root) == [(1, True, True)]
    with pytest.raises(registry.RegistryError, match=r"no registry models \['nope'\] under .* \(published: c, g\)"):
        registry.gc(["nope"], root=root)
    with pytest.raises(registry.RegistryError, match="keep must be 0 or more"):
        registry.gc(keep=-1, root=root)


def test_the_registry_command_lists_versions_and_collects_old_ones(ckpts, tmp_path, capsys):
    from jobs.cli import main as raylm

    root = str(tmp_path / "reg")
    assert raylm(["registry", "--root", root, "list"]) == 0
    assert capsys.readouterr().out.strip() == "no models in the registry"
    for loss in (2.0, 1.0, 0.5):
        registry.publish(ckpts["gpt"], "g", None, metric={"name": "loss", "value": loss, "mode": "min"}, root=root)
    assert raylm(["registry", "--root", root, "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "g  generation  current: 3"
    assert out[0].split()[:3] == ["ver", "created", "metric"] and len(out) == 5
    assert (out[2].split()[:2], out[3].split()[0], out[4].split()[0]) == (["*", "3"], "2", "1")
    assert "loss=0.5 (min)" in out[2] and "loss=2 (min)" in out[4] and out[2].endswith(os.path.join("versions", "3"))
    assert raylm(["registry", "--root", root, "list", "--json"]) == 0
    [model] = json.loads(capsys.readouterr().out)
    assert (model["name"], model["current"], [v["version"] for v in model["versions"]]) == ("g", 3, [1, 2, 3])
    assert raylm(["registry", "--root", root, "gc"]) == 0  # keeps 2 by default
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed g version 1: {os.path.join(root, 'g', 'versions', '1')}",
                   f"removed 1 version(s) from registry '{root}'"]
    assert raylm(["registry", "--root", root, "gc", "nope"]) == 1
    assert "error: no registry models ['nope']" in capsys.readouterr().err


def _legacy(ckpt: str, root: str, name: str, metric: dict) -> str:
    """An entry in the layout without versions: model.json and the model files in registry/<name>/."""
    dest = os.path.join(root, name)
    registry.copy_tree(ckpt, dest)
    meta = {"name": name, "task": "generation", "labels": None, "metric": metric, "config": None,
            "source_checkpoint": ckpt, "sweep_id": None, "created": "2025-01-01T00:00:00+00:00",
            "weights_sha256": registry.weights_sha256(ckpt)}
    with open(os.path.join(dest, "model.json"), "w") as f:
        json.dump(meta, f)
    return dest


def test_an_entry_without_versions_is_read_served_and_kept_until_gc(ckpts, tmp_path):
    from cluster.config import build
    from serve import engines
    from serve.app import select_models
    from serve.options import AppArgs

    root = str(tmp_path / "reg")
    old = _legacy(ckpts["gpt"], root, "old", {"name": "loss", "value": 2.0, "mode": "min"})
    pinned = registry.load_entry("old", root)
    assert pinned["version"] == 0 and pinned["path"] == old and pinned["metric"]["value"] == 2.0
    assert [e["path"] for e in select_models(build(AppArgs, {"registry": root}))] == [old]  # served as it is
    assert engines.load(pinned).path == old and _versions("old", root) == [(0, True, True)]
    with pytest.raises(registry.RegistryError, match="not better"):
        registry.publish(ckpts["gpt2"], "old", None, metric={"name": "loss", "value": 3.0, "mode": "min"}, root=root)
    v1 = registry.publish(ckpts["gpt2"], "old", None, metric={"name": "loss", "value": 1.0, "mode": "min"}, root=root)
    assert v1 == os.path.join(old, "versions", "1") and registry.load_entry("old", root)["version"] == 1
    assert engines.load(pinned).path == old  # the old copy still loads, its weights as they were
    assert [(v["version"], v["current"], v["metric"]["value"]) for v in registry.list_versions("old", root)] == [
        (0, False, 2.0), (1, True, 1.0)]
    assert registry.verify("old", root) == []
    assert [r["version"] for r in registry.gc(["old"], keep=0, root=root)] == [0]
    assert sorted(os.listdir(old)) == ["model.json", "versions"]
    assert _versions("old", root) == [(1, True, True)] and registry.verify("old", root) == []


def test_fine_tuning_and_evaluation_take_a_registry_name_as_its_current_version(ckpts, tmp_path):
    from cluster.checkpoints import resolve_checkpoint
    from cluster.stages.evaluate import resolve_model

    base = str(tmp_path)
    registry.publish(ckpts["cls"], "topic", None, root=os.path.join(base, "registry"))
    v2 = registry.publish(ckpts["cls"], "topic", None, force=True, root=os.path.join(base, "registry"))
    assert resolve_checkpoint("topic", base) == v2 and resolve_model("topic", base) == v2
    assert resolve_checkpoint("org/model", base) == "org/model"  # a hub id, never a registry name
