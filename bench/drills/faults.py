"""Faults during training, jobs and sweeps, on a local multi-node cluster (bench.drills.local_cluster).

- a training worker process killed at a random step, over several seeds; a whole worker node killed
  (and replaced, as an autoscaler would): runs completed, steps lost per fault, final validation
  loss against an uninterrupted run with the same seed, checkpoints that fail to load;
- a `ray job submit` pretraining job stopped mid-run and submitted again: it resumes;
- a training worker killed while a checkpoint is being written: the previous checkpoint stays intact
  and is the one resumed;
- a sweep whose trial process is killed: the trial is retried from its checkpoint, the sweep publishes.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import time

from bench.drills.common import Finding
from bench.drills.local_cluster import DrillCluster, python

CKPT_EVERY = 10
STEPS = 60
CORPUS = "drill"


def _pretrain_args(name: str, seed: int, *extra: str) -> list[str]:
    sets = [f"name={name}", f"corpus={CORPUS}", f"train.seed={seed}", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.eval_every=30", f"train.checkpoint_every={CKPT_EVERY}",
            "train.keep_checkpoints=10", "train.eval_batches=10", "train.batch_size=8", "scaling.num_workers=2",
            "scaling.placement_strategy=STRICT_SPREAD", "scaling.threads_per_worker=1", "max_failures=3", *extra]
    return [python(), "-m", "jobs.pretrain", "--config", "configs/gpt-tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def _run_dir(c: DrillCluster, name: str) -> str:
    return os.path.join(c.storage, "pretrain", name)


def _metrics(c: DrillCluster, name: str) -> list[dict]:
    path = os.path.join(_run_dir(c, name), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def _last_step(c: DrillCluster, name: str) -> int:
    return max((r["step"] for r in _metrics(c, name) if r.get("split") == "train"), default=0)


def _final_val_loss(c: DrillCluster, name: str) -> float | None:
    summary = os.path.join(_run_dir(c, name), "summary.json")
    if not os.path.exists(summary):
        return None
    return json.load(open(summary))["final"]["metrics"].get("val_loss")


def _checkpoints(c: DrillCluster, name: str) -> list[str]:
    """Checkpoint folders (`checkpoint_0000010`), not Ray Train's `checkpoint_manager_snapshot.json`."""
    found = glob.glob(os.path.join(_run_dir(c, name), "checkpoint_[0-9]*"))
    return sorted(p for p in found if os.path.isdir(p))


def _unloadable(paths: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM

    bad = []
    for path in paths:
        try:
            AutoModelForCausalLM.from_pretrained(path)
        except Exception as exc:  # any failure to load is what this counts
            bad.append(f"{os.path.basename(path)}: {type(exc).__name__}")
    return bad


def _registered_steps(c: DrillCluster, name: str) -> list[int]:
    """Checkpoint steps Ray Train has registered (the ones a restart may resume from)."""
    snaps = glob.glob(os.path.join(_run_dir(c, name), "checkpoint_manager_snapshot.json"))
    if not snaps:
        return []
    try:
        text = open(snaps[0]).read()
    except OSError:
        return []
    return sorted({int(s) for s in __import__("re").findall(r"checkpoint_(\d{7})", text)})


def _wait_for_step(c: DrillCluster, name: str, step: int, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = _last_step(c, name)
        if last >= step:
            return last
        time.sleep(0.2)
    raise TimeoutError(f"run {name} did not reach step {step} in {timeout} s")


def _resumed_from(c: DrillCluster, name: str, since: float) -> int | None:
    """The step training picked up from after a fault: the first `resume` row the loop logged after
    `since` (a time.time()); a restart with no checkpoint to resume from logs none, and starts at 0."""
    rows = _metrics(c, name)
    resumes = [r for r in rows if r.get("split") == "resume" and r.get("time", 0) >= since]
    if resumes:
        return resumes[0]["step"]
    after = [r["step"] for r in rows if r.get("split") == "train" and r.get("time", 0) >= since + 1]
    return 0 if after and min(after) == 1 else None


def prepare_corpus(c: DrillCluster) -> None:
    sid = c.submit([python(), "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml", "--set",
                    f"name={CORPUS}", "--set", "sources.0.num_docs=4000", "--set", "tokenizer.train_docs=1000"],
                   "drill-prepare")
    if c.wait(sid) != "SUCCEEDED":
        raise RuntimeError(f"preparing the drill corpus failed:\n{c.job('logs', sid)[-3000:]}")


def worker_kills(c: DrillCluster, seeds: list[int]) -> list[Finding]:
    """Per seed: an uninterrupted run and one whose rank-1 worker is SIGKILLed at a random step."""
    completed, lost, gaps, unloadable, detail = 0, [], [], [], []
    for seed in seeds:
        base = c.submit(_pretrain_args(f"base-{seed}", seed), f"base-{seed}")
        ok_base = c.wait(base) == "SUCCEEDED"
        name = f"fault-{seed}"
        sid = c.submit(_pretrain_args(name, seed), name)
        kill_at = random.Random(seed).randint(CKPT_EVERY + 2, STEPS - 5)
        _wait_for_step(c, name, kill_at)
        pid = json.load(open(os.path.join(_run_dir(c, name), "workers", "rank-1.json")))["pid"]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        reached = _last_step(c, name)  # the last step logged before the dead worker stalled the run
        status = c.wait(sid)
        resumed = _resumed_from(c, name, t_kill)
        steps_lost = reached - resumed if resumed is not None else None
        completed += status == "SUCCEEDED"
        lost.append(steps_lost)
        ref, got = _final_val_loss(c, f"base-{seed}"), _final_val_loss(c, name)
        gap = abs(got - ref) / ref if ok_base and ref and got else None
        gaps.append(gap)
        unloadable += _unloadable(_checkpoints(c, name))
        detail.append({"seed": seed, "killed_at_step": reached, "resumed_from": resumed, "status": status,
                       "val_loss": got, "uninterrupted_val_loss": ref})
    known_lost = [x for x in lost if x is not None]
    worst_gap = max((g for g in gaps if g is not None), default=float("inf"))
    return [
        Finding("training worker killed (SIGKILL, random step)", f"{completed} of {len(seeds)} runs completed",
                "all", completed == len(seeds), {"runs": detail}),
        Finding("training worker killed (SIGKILL, random step)", f"steps lost per fault: {lost}",
                f"<= checkpoint interval ({CKPT_EVERY})",
                len(known_lost) == len(seeds) and max(known_lost) <= CKPT_EVERY),
        Finding("training worker killed (SIGKILL, random step)", "final val loss vs uninterrupted, same seed: "
                f"worst {100 * worst_gap:.2f}%", "within 2%", worst_gap <= 0.02,
                {"gaps": gaps}),
        Finding("training worker killed (SIGKILL, random step)", f"checkpoints that fail to load: {len(unloadable)}",
                "0", not unloadable, {"unloadable": unloadable}),
    ]


def node_kill(c: DrillCluster, seed: int) -> list[Finding]:
    """Worker node 2 crashes (all its processes SIGKILLed) mid-run; a replacement node joins."""
    name = f"node-{seed}"
    sid = c.submit(_pretrain_args(name, seed), name)
    kill_at = random.Random(seed + 100).randint(CKPT_EVERY + 2, STEPS - 15)
    _wait_for_step(c, name, kill_at)
    t0 = time.time()
    killed = c.kill_node("worker-2")
    time.sleep(0.5)
    reached = _last_step(c, name)
    c.add_node(f"worker-{len(c.state().nodes)}")
    status = c.wait(sid)
    resumed = _resumed_from(c, name, t0)
    # time from the crash to training running again: the first step logged after the resume
    rows = [r for r in _metrics(c, name) if r.get("split") == "train" and r.get("time", 0) > t0 + 1]
    back = min((r["time"] for r in rows), default=float("inf")) - t0
    ref, got = _final_val_loss(c, f"base-{seed}"), _final_val_loss(c, name)
    gap = abs(got - ref) / ref if ref and got else float("inf")
    unloadable = _unloadable(_checkpoints(c, name))
    lost = reached - resumed if resumed is not None else None
    return [Finding("worker node killed (all its processes) and replaced",
                    f"run {status.lower()}; {killed} processes killed; steps lost {lost}; training again after "
                    f"{back:.0f} s; val loss vs uninterrupted {100 * gap:.2f}%; unloadable checkpoints "
                    f"{len(unloadable)}", f"completes, lost <= {CKPT_EVERY}, within 2%, 0 unloadable",
                    status == "SUCCEEDED" and lost is not None and lost <= CKPT_EVERY and gap <= 0.02
                    and not unloadable, {"killed_at_step": reached, "resumed_from": resumed})]


def job_stop_and_resubmit(c: DrillCluster) -> list[Finding]:
    """`ray job stop` after the first checkpoints, then the same command again."""
    name = "job-stop"
    args = _pretrain_args(name, 7)
    sid = c.submit(args, name)
    deadline = time.time() + 600
    while time.time() < deadline and not [s for s in _registered_steps(c, name) if s >= 2 * CKPT_EVERY]:
        time.sleep(0.5)
    c.job("stop", sid)
    first = c.wait(sid)
    before = _registered_steps(c, name)
    stopped_at = _last_step(c, name)
    t_resubmit = time.time()
    sid2 = c.submit(args, name)
    status = c.wait(sid2)
    resumed = _resumed_from(c, name, t_resubmit)
    ok = first == "STOPPED" and status == "SUCCEEDED" and resumed is not None and resumed == max(before, default=-1)
    return [Finding("`ray job stop` mid-run, same command resubmitted", f"stopped at step {stopped_at}, "
                    f"resumed at step {resumed} (latest registered checkpoint {max(before, default=None)}), "
                    f"second run {status.lower()}", "resumes from the latest checkpoint and completes", ok,
                    {"first_status": first, "registered": before})]


def kill_during_checkpoint(c: DrillCluster, attempts: int = 3) -> list[Finding]:
    """Rank 0 is SIGKILLed the moment a new checkpoint folder appears in storage (while Ray Train
    is still persisting it). A larger model makes that window wide enough to hit."""
    for attempt in range(attempts):
        name = f"ckpt-kill-{attempt}"
        sid = c.submit(_pretrain_args(name, 11, "model.size=mini", "train.batch_size=4"), name)
        deadline, seen = time.time() + 600, set()
        target = None
        while time.time() < deadline and target is None:
            current = set(_checkpoints(c, name))
            new = sorted(current - seen)
            if seen and new:
                target = new[-1]
            seen |= current
            time.sleep(0.002)
        rank0 = json.load(open(os.path.join(_run_dir(c, name), "workers", "rank-0.json")))["pid"]
        t_kill = time.time()
        os.kill(rank0, signal.SIGKILL)
        reached = int(os.path.basename(target).split("_")[1])
        time.sleep(3)  # had the write finished, Ray Train would have registered it by now
        registered = _registered_steps(c, name)
        partial = reached not in registered
        previous = max((s for s in registered if s < reached), default=None)
        status = c.wait(sid)
        resumed = _resumed_from(c, name, t_kill)
        prev_ok = previous is not None and not _unloadable([os.path.join(_run_dir(c, name), f"checkpoint_{previous:07d}")])
        if partial or attempt == attempts - 1:
            ok = partial and status == "SUCCEEDED" and prev_ok and resumed == previous
            return [Finding("training worker killed while a checkpoint is written",
                            f"kill {'inside' if partial else 'after'} the write of step {reached} (attempt "
                            f"{attempt + 1}); previous checkpoint (step {previous}) loads: {prev_ok}; resumed from "
                            f"step {resumed}; run {status.lower()}",
                            "previous checkpoint intact and the one resumed", ok,
                            {"registered_after_kill": registered})]
    return []


def sweep_trial_kill(c: DrillCluster, base: str) -> list[Finding]:
    """A sweep's trial process is SIGKILLed mid-trial; with max_failures 1 it is retried from its
    checkpoint and the sweep still publishes. `base`: a pretraining run's folder (fine-tuning takes
    its best checkpoint)."""
    name = "drill-sweep"
    sets = [f"name={name}", f"finetune.model.checkpoint={base}", "finetune.train.max_steps=60",
            "finetune.train.eval_every=10", "finetune.data.train_examples=600", "finetune.data.validation_examples=120",
            "finetune.train.eval_batches=5", "search={optim.lr: {grid: [1.0e-3, 3.0e-3]}}", "search_alg.kind=grid",
            "num_samples=1", "scheduler.kind=fifo", "max_concurrent_trials=1", "max_failures=1",
            f"publish.name={name}"]
    sid = c.submit([python(), "-m", "tune.sweep", "--config", "configs/tune-topic-tiny.yaml",
                    *[a for s in sets for a in ("--set", s)]], name)
    sweep_dir = os.path.join(c.storage, "tune", name)
    deadline, killed, polled = time.time() + 600, None, time.time()
    while time.time() < deadline and killed is None:
        if time.time() - polled > 5:  # a sweep that failed at start must not be waited on for 10 minutes
            polled = time.time()
            if c.ended(sid):
                break
        for rank0 in glob.glob(os.path.join(sweep_dir, "trial_main_*", "workers", "rank-0.json")):
            metrics = os.path.join(os.path.dirname(os.path.dirname(rank0)), "metrics.jsonl")
            steps = [json.loads(line).get("step", 0) for line in open(metrics)] if os.path.exists(metrics) else []
            if steps and max(steps) >= 25:
                os.kill(json.load(open(rank0))["pid"], signal.SIGKILL)
                killed = os.path.dirname(os.path.dirname(rank0))
                break
        time.sleep(0.2)
    status = c.wait(sid)
    if status != "SUCCEEDED" and killed is None:
        return [Finding("sweep trial process killed mid-trial", f"sweep {status.lower()} before a trial could be "
                        f"killed: {c.job('logs', sid)[-300:].strip()}", "trial retried, sweep publishes", False)]
    summary_path = os.path.join(sweep_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    rows = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))] if killed else []
    resumes = [r["step"] for r in rows if r.get("split") == "resume"]
    retried = bool(resumes)  # the retried trial restored its checkpoint and logged where it resumed
    published = (summary.get("registry") or {}).get("published", False)
    return [Finding("sweep trial process killed mid-trial", f"sweep {status.lower()}; errored trials "
                    f"{summary.get('errored')}; killed trial retried from its checkpoint: {retried}; published: "
                    f"{published}", "trial retried, sweep publishes", status == "SUCCEEDED" and retried and published
                    and not summary.get("errored"), {"killed_trial": killed, "resumed_at": resumes})]
