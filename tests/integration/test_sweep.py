"""tune.sweep on the shared local Ray: every task x strategy learns past its trivial baseline, ASHA
stops bad trials and publishes the best, an interrupted sweep resumes, bad sweeps fail before any
trial starts."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from cluster.config import load_config
from tests.conftest import PYTHON, REPO, subprocess_env
from tune import sweep as sweep_job
from tune.config import SweepConfig

TOPIC = os.path.join(REPO, "configs", "tune-topic-tiny.yaml")
# small trials: 600 training rows, evaluations on 5 batches
SMALL = ["finetune.data.train_examples=600", "finetune.data.validation_examples=120", "finetune.train.eval_batches=5",
         "finetune.scaling.threads_per_worker=1", "max_concurrent_trials=2"]


def sweep_config(name: str, *sets: str, path: str = TOPIC) -> SweepConfig:
    return load_config(SweepConfig, path, [f"name={name}", f"publish.name={name}", *SMALL, *sets])


def run_sweep(cfg: SweepConfig) -> dict:
    with open(sweep_job.run(cfg)) as f:
        return json.load(f)


def table(summary: dict) -> list[dict]:
    with open(summary["results"]) as f:
        return list(csv.DictReader(f))


def strategy_grid(name: str, base: str, task: str, synthetic: str, lr: float, steps: int, *extra: str) -> dict:
    cfg = sweep_config(
        name, f"finetune.task={task}", f"finetune.model.checkpoint={base}", f"finetune.data.synthetic={synthetic}",
        f"finetune.optim.lr={lr}", f"finetune.train.max_steps={steps}", f"finetune.train.eval_every={steps // 2}",
        "finetune.strategy.unfreeze_top_k=1", "search={strategy.kind: {grid: [full, frozen, lora]}}",
        "scheduler.kind=fifo", "search_alg.kind=grid", "num_samples=1", "publish.enabled=false", "metric=null",
        "mode=null", *extra,
    )
    return run_sweep(cfg)


@pytest.mark.parametrize("task", ["classification", "tagging", "completion"])
def test_every_strategy_beats_the_trivial_baseline(task, gpt_base):
    if task == "classification":  # GPT with a sequence-classification head; majority class = 25%
        s = strategy_grid("t-sw-cls", gpt_base, task, "topic", 3e-3, 60)
        rows = table(s)
        assert all(float(r["val_accuracy"]) > s["baseline"]["accuracy"] + 0.2 for r in rows), rows
    elif task == "tagging":  # GPT with a token-classification head; all-O tagging finds no entity: F1 0
        s = strategy_grid("t-sw-tag", gpt_base, task, "entities", 1e-2, 60)
        rows = table(s)
        assert s["baseline"]["entity_f1"] == 0.0
        assert all(float(r["val_entity_f1"]) > 0.5 for r in rows), rows
    else:  # GPT; the completion loss falls well below the untuned model's
        s = strategy_grid("t-sw-cmp", gpt_base, task, "topic_completion", 3e-3, 60, "metric=val_loss",
                          "finetune.eval.generate_examples=16", "finetune.eval.max_new_tokens=16")
        rows = table(s)
        assert all(float(r["val_loss"]) < float(r["untuned"]) - 1.0 for r in rows), rows
    assert sorted(r["strategy.kind"] for r in rows) == ["frozen", "full", "lora"]
    assert all(r["status"] == "DONE" for r in rows)
    # 3 trials, 2 at a time: the third ran in a process a finished trial left (reuse_actors), not in
    # a new one importing torch and transformers again; full, frozen and LoRA each still learned
    pids = [json.load(open(f))["pid"] for f in glob.glob(os.path.join(os.path.dirname(s["results"]), "trial_main_*",
                                                                        "workers", "rank-0.json"))]
    assert len(pids) == 3 and len(set(pids)) == 2, pids


@pytest.fixture(scope="module")
def asha_sweep(gpt_base):
    # good learning rates first: ASHA compares a trial at each rung with those that reached it before
    cfg = sweep_config("t-sw-asha", f"finetune.model.checkpoint={gpt_base}", "finetune.train.max_steps=60",
                       "finetune.train.eval_every=10", "search={optim.lr: {grid: [3.0e-3, 1.0e-3, 1.0e-6, 3.0e-7]}}",
                       "search_alg.kind=grid", "num_samples=1", "scheduler.grace_period=10",
                       "scheduler.reduction_factor=2")
    return run_sweep(cfg)


def test_asha_stops_bad_trials_and_publishes_the_best(asha_sweep):
    s = asha_sweep
    rows = table(s)
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    # the two tiny learning rates reach the first rung after both good ones and fall below its median
    assert {1e-6, 3e-7} <= {float(r["optim.lr"]) for r in stopped}, rows
    assert all(int(r["steps"]) < 60 for r in stopped)
    assert s["trial_steps"] < 4 * 60
    assert s["best"]["val_accuracy"] > 0.9 and float(s["best"]["config"]["optim.lr"]) > 1e-4
    assert s["registry"]["published"], s["registry"]
    entry = json.load(open(os.path.join(s["registry"]["path"], "model.json")))
    assert entry["task"] == "classification" and entry["labels"] == ["finance", "science", "sports", "travel"]
    assert entry["metric"] == {"name": "val_accuracy", "value": s["best"]["val_accuracy"], "mode": "max"}
    assert entry["sweep_id"] == f"t-sw-asha/{s['best']['trial_id']}" and entry["source_checkpoint"]
    assert entry["config"]["optim"]["lr"] == s["best"]["config"]["optim.lr"] and entry["created"]
    assert os.path.exists(s["plot"])


def test_published_model_classifies_with_transformers_alone(asha_sweep):
    path = asha_sweep["registry"]["path"]
    script = textwrap.dedent(f"""
        import sys
        from transformers import pipeline
        clf = pipeline("text-classification", model={path!r})
        out = clf(["Shares of Vela Bank rose 12 percent in Calder on May 3 2001."])
        assert "cluster" not in sys.modules  # no raylm code: transformers alone
        print(out[0]["label"])
    """)
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120, cwd="/",
                         env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in {"finance", "science", "sports", "travel"}


def test_a_worse_sweep_does_not_replace_the_published_model(asha_sweep, gpt_base):
    cfg = sweep_config("t-sw-worse", f"finetune.model.checkpoint={gpt_base}", "publish.name=t-sw-asha",
                       "finetune.train.max_steps=10", "finetune.train.eval_every=10",
                       "search={optim.lr: {grid: [1.0e-7]}}", "search_alg.kind=grid", "num_samples=1",
                       "scheduler.kind=fifo")
    s = run_sweep(cfg)
    # 10 steps at lr 1e-7 end below the published model, or (ties go to the earliest evaluation)
    # no better than the untuned model: refused either way
    reason = s["registry"]["reason"]
    assert not s["registry"]["published"] and ("is not better" in reason or "no trial improved" in reason), reason
    entry = json.load(open(os.path.join(asha_sweep["registry"]["path"], "model.json")))
    assert entry["sweep_id"].startswith("t-sw-asha/")


def test_a_trial_with_two_workers_trains_in_a_torchtrainer(gpt_base):
    # Regression: trial.workers > 1 asked Tune for no resources at all and failed before any trial.
    cfg = sweep_config("t-sw-w2", f"finetune.model.checkpoint={gpt_base}", "finetune.train.max_steps=40",
                       "finetune.train.eval_every=20", "search={optim.lr: {grid: [3.0e-3]}}", "search_alg.kind=grid",
                       "num_samples=1", "scheduler.kind=fifo", "trial.workers=2", "max_concurrent_trials=1",
                       "publish.enabled=false")
    s = run_sweep(cfg)
    [row] = table(s)
    assert row["status"] == "DONE" and float(row["val_accuracy"]) > s["baseline"]["accuracy"] + 0.2, row
    # the trial's checkpoints are the TorchTrainer's, under the sweep's train-runs/
    assert row["checkpoint"].startswith(os.path.join(os.path.dirname(s["results"]), "train-runs", ""))
    assert os.path.isfile(os.path.join(row["checkpoint"], "model.safetensors"))


def test_pbt_trials_clone_each_others_checkpoints_without_losing_any(gpt_base):
    # 4 trials, 2 at a time, an exploit/explore step at every evaluation: bottom trials restart from a
    # top trial's checkpoint while that trial goes on checkpointing. No retries: a clone of a checkpoint
    # deleted meanwhile would end its trial in ERROR.
    cfg = sweep_config("t-sw-pbt", f"finetune.model.checkpoint={gpt_base}", "finetune.train.max_steps=60",
                       "finetune.train.eval_every=10", "search={}", "scheduler.kind=pbt",
                       "scheduler.mutations={optim.lr: {loguniform: [1.0e-4, 3.0e-3]}}",
                       "scheduler.perturbation_interval=10", "scheduler.quantile_fraction=0.5", "num_samples=4",
                       "max_failures=0", "publish.enabled=false")
    s = run_sweep(cfg)
    rows = table(s)
    assert not s["errored"] and all(r["status"] == "DONE" for r in rows), rows
    sweep_dir = os.path.dirname(s["results"])
    with open(os.path.join(sweep_dir, "pbt_global.txt")) as f:
        assert any(line.strip() for line in f)  # a trial was cloned
    # checkpoints a clone could still need were kept; the rest down to the best (keep_checkpoints 1),
    # the latest and the few PBT may clone next, not one per evaluation
    for trial_dir in glob.glob(os.path.join(sweep_dir, "trial_main_*")):
        assert len(glob.glob(os.path.join(trial_dir, "checkpoint_*"))) <= 4, trial_dir
    assert os.path.isdir(s["best"]["checkpoint"])


def _finished_trials(sweep_dir: str) -> dict[str, int]:
    """trial dir -> result.json lines, for trials the saved experiment state marks TERMINATED."""
    out = {}
    for state in glob.glob(os.path.join(sweep_dir, "experiment_state-*.json")):
        try:
            trials = [json.loads(t) for t, _ in json.load(open(state))["trial_data"]]
        except (ValueError, KeyError):
            continue  # caught mid-write
        for t in trials:
            if t["status"] == "TERMINATED":
                d = glob.glob(os.path.join(sweep_dir, f"trial_main_{t['trial_id']}_*"))[0]
                out[d] = sum(1 for line in open(os.path.join(d, "result.json")) if line.strip())
    return out


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(gpt_base, ray_session):
    name = "t-sw-resume"
    sets = [f"name={name}", f"finetune.model.checkpoint={gpt_base}", "finetune.train.max_steps=60",
            "finetune.train.eval_every=10", "search={optim.lr: {grid: [3.0e-3, 2.0e-3, 1.0e-3]}}",
            "search_alg.kind=grid", "num_samples=1", "scheduler.kind=fifo", "max_concurrent_trials=1",
            "publish.enabled=false", *SMALL[:-1]]
    args = [PYTHON, "-m", "tune.sweep", "--config", TOPIC] + [a for s in sets for a in ("--set", s)]
    sweep_dir = os.path.join(os.environ["RAYLM_STORAGE"], "tune", name)
    driver = subprocess.Popen(args, cwd=REPO, env=subprocess_env(ray_session), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None and not _finished_trials(sweep_dir):
            time.sleep(0.5)  # until the saved experiment state records a finished trial
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    finished = _finished_trials(sweep_dir)
    assert 1 <= len(finished) < 3
    metrics_before = {d: open(os.path.join(d, "metrics.jsonl")).read() for d in finished}

    s = run_sweep(load_config(SweepConfig, TOPIC, sets))
    assert s["restored"] and s["trials"] == 3 and not s["errored"]
    assert all(r["status"] == "DONE" for r in table(s))
    for d, lines in finished.items():  # finished trials were kept, not run again
        assert sum(1 for line in open(os.path.join(d, "result.json")) if line.strip()) == lines
        assert open(os.path.join(d, "metrics.jsonl")).read() == metrics_before[d]


# ---------------------------------------------------------------- refused before any trial


def test_bad_sweeps_fail_before_any_trial(capsys):
    rc = sweep_job.main(["--config", TOPIC, "--set", "name=t-sw-bad", "--set", "search={}"])
    err = capsys.readouterr().err
    assert rc == 2 and "search: the search space is empty" in err
    rc = sweep_job.main(["--config", TOPIC, "--set", "name=t-sw-bad", "--set", "metric=val_f1",
                         "--set", "search={optim.lrr: {choice: [1.0e-3]}, data.seed: {choice: [1, 2]}}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "metric 'val_f1' is never reported by a classification trial" in err
    assert "search key 'optim.lrr' -> 'optim.lrr': unknown key" in err
    assert "search keys ['data.seed']: the data, base checkpoint and tokenizer are prepared once" in err
    rc = sweep_job.main(["--config", TOPIC, "--set", "name=t-sw-bad", "--set", "search_alg.kind=optuna",
                         "--set", "search={optim.lr: {grid: [1.0e-3, 1.0e-2]}}", "--set", "scheduler.kind=pbt",
                         "--set", "scheduler.mutations={train.batch_size: {choice: [8, 16]}}"])
    err = capsys.readouterr().err
    assert rc == 2 and "use choice instead of grid" in err and "pbt mutates optim.* keys only" in err
    assert not os.path.exists(os.path.join(os.environ.get("RAYLM_STORAGE", ""), "tune", "t-sw-bad"))
