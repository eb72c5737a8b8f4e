"""How trials are chosen and stopped: the parameter space and search algorithm (random, grid,
Optuna TPE), the scheduler (ASHA, PBT, FIFO), and the PBT checkpoint pruner that keeps every
checkpoint another trial may still clone.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator

from tune.config import SweepConfig


class PBTCheckpointPruner(tune.Callback):
    """Deletes a PBT trial's checkpoints that no trial can need any more.

    PBT restarts a bottom trial from the checkpoint a top trial had at its last perturbation, possibly
    much later (the paused trial may wait for a free slot). Tune's CheckpointConfig keeps the best N
    or the latest N, so the top trial may delete that checkpoint meanwhile, and the clone fails with
    "Could not recover from checkpoint as it does not exist on storage anymore". Under PBT Tune keeps
    every checkpoint (num_to_keep=None) and this callback prunes, after each save of a trial, all of
    its checkpoints except: the best `keep_best` by the metric, the latest `keep_recent` (PBT's
    recorded clone source is among them), and any checkpoint that a trial will restore from (each
    trial's latest, which is the cloned one for a trial waiting to restart).
    """

    def __init__(self, metric: str, mode: str, keep_best: int, keep_recent: int):
        self.metric, self.mode, self.keep_best, self.keep_recent = metric, mode, keep_best, keep_recent
        self._saved: dict[str, list[tuple[str, float | None]]] = {}  # trial id -> [(path, score)], oldest first

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        latest = trial.latest_checkpoint_result
        if latest is None or latest.checkpoint is None:
            return
        saved = self._saved.setdefault(trial.trial_id, [])
        path = latest.checkpoint.path
        if not saved or saved[-1][0] != path:  # the same save seen again (on_trial_save per pause) is not new
            score = latest.metrics.get(self.metric)
            saved[:] = [s for s in saved if s[0] != path]  # a folder written again holds the newer checkpoint
            saved.append((path, float(score) if isinstance(score, int | float) and score == score else None))
        fs = latest.checkpoint.filesystem
        for stale in prunable(saved, self.mode, self.keep_best, self.keep_recent,
                              in_use={t.checkpoint.path for t in trials if t.checkpoint is not None}):
            saved.remove(next(s for s in saved if s[0] == stale))
            try:
                fs.delete_dir(stale)
            except FileNotFoundError:
                pass

    def get_state(self) -> dict[str, Any]:  # saved with the experiment state: a restored sweep goes on pruning
        return {"saved": self._saved}

    def set_state(self, state: dict[str, Any]) -> None:
        self._saved = {k: [tuple(s) for s in v] for k, v in state.get("saved", {}).items()}


def prunable(saved: list[tuple[str, float | None]], mode: str, keep_best: int, keep_recent: int,
             in_use: set[str]) -> list[str]:
    """Paths of `saved` (oldest first, (path, score)) outside the best keep_best, the latest keep_recent
    and in_use. A checkpoint without a score never counts among the best."""
    scored = [s for s in saved if s[1] is not None]
    best = sorted(scored, key=lambda s: s[1], reverse=mode == "max")[:keep_best]  # stable: ties keep the earlier
    keep = {p for p, _ in best} | {p for p, _ in saved[-keep_recent:]} | in_use
    return [p for p, _ in saved if p not in keep]


def build_scheduler(cfg: SweepConfig, max_steps: int, eval_every: int) -> Any:
    s = cfg.scheduler
    if s.kind == "asha":
        max_t = s.max_t or max_steps
        grace = min(s.grace_period or eval_every, max_t)
        return tune.schedulers.ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace,
                                             reduction_factor=s.reduction_factor)
    if s.kind == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval or eval_every,
            hyperparam_mutations={k: d.to_tune() for k, d in s.mutations.items()},
            quantile_fraction=s.quantile_fraction, synch=False,
        )
    return tune.schedulers.FIFOScheduler()


def build_search(cfg: SweepConfig) -> tuple[dict[str, Any], Any]:
    """(param_space, search algorithm or None)."""
    space = {k: d.to_tune(grid_choices=cfg.search_alg.kind == "grid") for k, d in cfg.search.items()}
    if cfg.scheduler.kind == "pbt":  # PBT starts each trial from a sample of the mutated keys
        space |= {k: d.to_tune() for k, d in cfg.scheduler.mutations.items() if k not in space}
    if cfg.search_alg.kind == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = cfg.objective
        return space, OptunaSearch(metric=metric, mode=mode, sampler=TPESampler(seed=cfg.search_alg.seed))
    if cfg.search_alg.kind == "random" and cfg.search_alg.seed is not None:
        # Tune applies TuneConfig(max_concurrent_trials) only to the generator it builds itself
        # (or by wrapping a Searcher); a generator handed in must carry the limit, or it is ignored.
        return space, BasicVariantGenerator(random_state=cfg.search_alg.seed, max_concurrent=cfg.max_concurrent_trials)
    return space, None
