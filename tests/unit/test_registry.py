"""The model registry: publish, atomic replace, the better-metric rule, validation."""

from __future__ import annotations

import json
import os

import pytest

from cluster import registry
from serve import tiny


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    return {
        "gpt": tiny.save_gpt(str(base / "gpt")),
        "cls": tiny.save_bert(str(base / "cls"), "classification"),
        "mlm": tiny.save_bert(str(base / "mlm"), "fill-mask"),
    }


def test_publish_and_list(ckpts, tmp_path):
    root = str(tmp_path / "reg")
    path = registry.publish(ckpts["gpt"], "gpt-tiny", "generation", metric={"name": "loss", "value": 2.0,
                                                                            "mode": "min"}, root=root)
    assert path == os.path.join(root, "gpt-tiny")
    assert {"model.safetensors", "config.json", "tokenizer.json", "model.json"} <= set(os.listdir(path))
    entry = registry.load_entry("gpt-tiny", root)
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
    # the replace leaves no temporary or old folders behind
    assert os.listdir(root) == ["c"]


def test_atomic_publish_leaves_old_entry_on_failure(ckpts, tmp_path, monkeypatch):
    root = str(tmp_path / "reg")
    registry.publish(ckpts["gpt"], "g", "generation", root=root)

    def boom(src, dst):
        os.makedirs(dst)
        raise OSError("disk full")

    monkeypatch.setattr(registry, "copy_tree", boom)
    with pytest.raises(OSError):
        registry.publish(ckpts["gpt"], "g", "generation", force=True, root=root)
    assert os.listdir(root) == ["g"] and registry.load_entry("g", root)["task"] == "generation"


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
    assert out[-1] == os.path.join(root, "gpt-tiny")
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
    assert registry.load_entry(os.path.basename(registry.publish(ckpts["cls"], "plain", None, root=root)),
                               root)["config"] is None
    ckpt = tmp_path / "trained"
    shutil.copytree(ckpts["cls"], ckpt)
    (ckpt / "train_state").mkdir()
    (ckpt / "train_state" / "config.json").write_text(json.dumps({"task": "classification", "optim": {"lr": 3e-4}}))
    registry.publish(str(ckpt), "trained", None, root=root)
    entry = registry.load_entry("trained", root)
    assert entry["config"] == {"task": "classification", "optim": {"lr": 3e-4}}
    assert not os.path.exists(os.path.join(root, "trained", "train_state"))  # recorded, not copied
    registry.publish(str(ckpt), "given", None, config={"optim": {"lr": 1e-3}}, root=root)
    assert registry.load_entry("given", root)["config"] == {"optim": {"lr": 1e-3}}
