"""The sweep's driver: check the config, prepare the data once (for a distillation sweep also resolve
the teacher and check every searched student shape against it), run (or restore) the Tuner, then
write the results table and plot and publish the best trial's checkpoint to the registry.

Re-running an interrupted sweep (same name, same config) restores it with `Tuner.restore`: finished
trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator

from cluster import registry, storage
from cluster.checkpoints import TASKS
from cluster.config import same_config
from cluster.errors import JobError
from cluster.runs import RunDir
from cluster.stages.finetune import TaskSetup, plan_run, setup
from tune.config import SweepConfig, check_sweep, trial_config
from tune.results import format_table, plot_sweep, trial_rows, write_table
from tune.search import PBTCheckpointPruner, build_scheduler, build_search
from tune.trial import concurrent_trials, trial_main, trial_resources

log = logging.getLogger(__name__)


def tune_env_defaults(environ: MutableMapping[str, str]) -> None:
    """Tune settings read by the driver when the sweep starts; a user's own values win."""
    # Tune saves the experiment state at most every 10 s by default; a trial that finished since the
    # last save would run again after an interrupted driver is restored. Save more often.
    environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Trials checkpoint at every evaluation (to publish the best, and for PBT to clone), and Tune
    # forces a state snapshot whenever it deletes one, which keeps a restored sweep consistent. With
    # evaluations seconds apart Tune printed a 4-line warning per snapshot (14 in a 4-trial sweep),
    # advising to keep more checkpoints or save fewer: both chosen against here.
    environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def sweep(cfg: SweepConfig, root: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    check_sweep(cfg)
    metric, mode = cfg.objective
    run = RunDir("tune", cfg.name, root)
    previous = storage.read_text(run.file("config.yaml")) if storage.exists(run.file("config.yaml")) else None
    restoring = tune.Tuner.can_restore(run.path)
    if restoring and previous is not None and not same_config(previous, cfg):
        raise JobError(f"sweep '{cfg.name}' already exists at '{run.path}' with a different config; use another "
                       "name, or delete that folder to start over")
    concurrency: dict[str, int] = {}
    ts, meta, ft = base_setup(cfg, root, run, fits=lambda: concurrency.update(trials=concurrent_trials(cfg)))
    run.begin(cfg)
    fitted = cfg.model_copy(update={"max_concurrent_trials": concurrency["trials"]})
    base_plan = plan_run(ft, meta, run.path, cfg.trial.workers)
    trainable = tune.with_parameters(
        trial_main, base=cfg.base.to_dict(), meta=meta, data={"train": ts.train, "validation": ts.validation},
        trial={**cfg.trial.to_dict(), "metric": metric, "mode": mode, "base": cfg.base_key}, sweep_dir=run.path,
    )
    trainable = tune.with_resources(trainable, trial_resources(cfg.trial))
    tune_env_defaults(os.environ)
    pbt = cfg.scheduler.kind == "pbt"
    # PBT clones the checkpoint a top trial had at its last perturbation; it saves one per evaluation
    interval = cfg.scheduler.perturbation_interval or cfg.base.train.eval_every
    keep_recent = -(-interval // cfg.base.train.eval_every) + 1
    if restoring:
        log.info("restoring sweep '%s' from %s", cfg.name, run.path)
        tuner = tune.Tuner.restore(run.path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        space, search_alg = build_search(fitted)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=cfg.num_samples,
                # a generator of our own carries the limit (build_search); Tune applies it to the rest
                max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator) else fitted.max_concurrent_trials,
                scheduler=build_scheduler(cfg, base_plan.max_steps, cfg.base.train.eval_every),
                search_alg=search_alg, reuse_actors=cfg.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=storage.join(root or storage.storage_root(), "tune"),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                # under PBT every checkpoint stays with Tune and PBTCheckpointPruner deletes the ones no
                # clone can need; Tune's own num_to_keep would delete a checkpoint PBT is about to clone
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else cfg.keep_checkpoints,
                                                        checkpoint_score_attribute=metric,
                                                        checkpoint_score_order=mode),
                callbacks=[PBTCheckpointPruner(metric, mode, cfg.keep_checkpoints, keep_recent)] if pbt else None,
                verbose=1,
            ),
        )
    results = tuner.fit()
    return finish(cfg, run, ts, meta, results, base_plan.max_steps, t0, restored=restoring)


def base_setup(cfg: SweepConfig, root: str | None, run: RunDir, fits: Any) -> tuple[TaskSetup, dict[str, Any], Any]:
    """(the data prepared once, what every trial reads of it, the fine-tuning config it was prepared
    for). A distillation sweep prepares it as jobs.distill does, on the teacher's tokenizer, after
    the teacher is resolved and the base student and every searched student.* / distill.hidden value
    (ranges at their bounds) are planned against it: a shape no trial could build fails here."""
    if cfg.finetune is not None:
        ts = setup(cfg.finetune, root, run, fits=fits)
        return ts, ts.meta, cfg.finetune
    from cluster.stages import distill as D

    d = cfg.distill
    teacher, teacher_cfg, student = D.teacher_and_student(d, root)
    for key, domain in cfg.search.items():
        if key.startswith("student.") or key == "distill.hidden":
            for value in domain.values():
                try:
                    D.plan_student(D.DistillConfig.model_validate(trial_config(d.to_dict(), {key: value})), teacher,
                                   teacher_cfg)
                except JobError as exc:
                    raise JobError(f"search key '{key}' -> {value!r}: {exc}") from None
    ft = d.as_finetune(teacher)
    ts = setup(ft, root, run, fits=fits)
    D.check_labels(teacher_cfg, ts.meta["labels"], teacher)
    return ts, {**ts.meta, "teacher": teacher, "teacher_config": teacher_cfg, "student": student}, ft


def publish_best(cfg: SweepConfig, ts: TaskSetup, best: dict[str, Any], trial_cfg: dict[str, Any]) -> dict[str, Any]:
    metric, mode = cfg.objective
    name = cfg.publish.name or cfg.name
    if not cfg.publish.enabled:
        return {"published": False, "reason": "publish.enabled is false"}
    if not best.get("checkpoint"):
        return {"published": False, "reason": "no trial left a checkpoint"}
    if best.get("best_step") == 0:  # the evaluation before any step: the base model with an untrained head
        return {"published": False, "name": name,
                "reason": f"no trial improved on the untuned model ({metric} {best[metric]:.4g} before any step); "
                          f"train longer ({cfg.base_key}.train.max_steps) or search other learning rates"}
    try:
        path = registry.publish(
            best["checkpoint"], name, TASKS[cfg.base.task][1],
            metric={"name": metric, "value": best[metric], "mode": mode}, labels=ts.meta["labels"],
            config=trial_cfg, sweep_id=f"{cfg.name}/{best['trial_id']}", force=cfg.publish.force,
        )
    except registry.RegistryError as exc:
        return {"published": False, "name": name, "reason": str(exc)}
    return {"published": True, "name": name, "path": path}


def finish(cfg: SweepConfig, run: RunDir, ts: TaskSetup, meta: dict[str, Any], results: Any, max_steps: int,
           t0: float, restored: bool) -> dict[str, Any]:
    metric, mode = cfg.objective
    rows = trial_rows(cfg, results, max_steps)
    keys = ["trial_id", *cfg.search, *[k for k in cfg.scheduler.mutations if k not in cfg.search], "untuned", metric,
            "best_step", "steps", "status"]
    print(f"\n# sweep {cfg.name}: {len(rows)} trials, {metric} ({mode})\n{format_table(rows, keys)}\n", flush=True)
    table = write_table(rows, run.file("results.csv"))
    plot = plot_sweep(cfg, rows, run.file("results.png"))
    scored = [r for r in rows if r.get(metric) is not None and r.get("checkpoint")]
    best = scored[0] if scored else None
    errors = [r["trial_id"] for r in rows if r["status"] == "ERROR"]
    if best is None:
        raise JobError(f"sweep '{cfg.name}': no trial reported '{metric}' with a checkpoint "
                       f"({len(errors)} of {len(rows)} trials failed; see {run.path})")
    searched = [*cfg.search, *cfg.scheduler.mutations]
    trial_cfg = trial_config(cfg.base.to_dict(), {k: best[k] for k in searched if best.get(k) is not None})
    published = publish_best(cfg, ts, best, trial_cfg)
    print(f"published '{published['name']}': {published['path']}" if published["published"]
          else f"not published: {published['reason']}", flush=True)
    distilled = {}
    if cfg.distill is not None:
        from cluster.stages import distill as D

        student = D.plan_student(D.DistillConfig.model_validate(trial_cfg), meta["teacher"], meta["teacher_config"])
        distilled = {"teacher": {"checkpoint": meta["teacher"], "params": student["teacher_params"],
                                 "layers": student["teacher_layers"]},
                     "student": {k: student[k] for k in ("init", "layers", "params")}}
    return {
        "task": cfg.base.task, "metric": metric, "mode": mode, "restored": restored,
        "trials": len(rows), "errored": errors, "stopped_early": sum(r["status"] == "STOPPED" for r in rows),
        "trial_steps": sum(r["steps"] for r in rows), "max_steps_per_trial": max_steps,
        "best": {k: best[k] for k in ("trial_id", metric, "best_step", "checkpoint")} | {
            "config": {k: best[k] for k in [*cfg.search, *cfg.scheduler.mutations] if k in best}},
        "baseline": ts.baseline, **distilled, "registry": published, "results": table, "plot": plot,
        "seconds": round(time.time() - t0, 2),
    }
