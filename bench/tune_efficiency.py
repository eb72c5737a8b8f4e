"""Sweep efficiency: ASHA against the full grid over the same space, in one run, on the synthetic
topic task. Both sweeps run the same grid points (learning rate x strategy); the grid runs every
trial to the end, ASHA stops the weak ones at its rungs. Reported: the best validation metric of
each, the trial-steps each spent, wall time, and the ratios (goal: ASHA's best within 1% of the
grid's best with <= 40% of its trial-steps).

    python -m bench.tune_efficiency [--steps 120] [--rungs 12] [--base demo-gpt]

The base model is a pretrain run name, checkpoint or registry name; without one, a tiny GPT is
pretrained first (a couple of minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = [1.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]
STRATEGIES = ["full", "frozen", "lora"]


def ensure_base(base: str | None) -> str:
    """A pretrained tiny GPT to fine-tune: the given one, or one made now in this storage."""
    from cluster.checkpoints import resolve_checkpoint
    from cluster.config import load_config
    from cluster.stages.prepare import PrepareConfig
    from cluster.stages.pretrain import PretrainConfig
    from jobs import prepare as prepare_job
    from jobs import pretrain as pretrain_job

    if base:
        return resolve_checkpoint(base)
    prepare_job.run(load_config(PrepareConfig, os.path.join(REPO, "configs/prepare-synthetic.yaml"),
                                ["name=bench-tune", "sources.0.num_docs=6000"]))
    pretrain_job.run(load_config(PretrainConfig, os.path.join(REPO, "configs/gpt-tiny.yaml"),
                                 ["name=bench-tune-gpt", "corpus=bench-tune", "train.max_steps=150"]))
    return resolve_checkpoint("bench-tune-gpt")


def sweep_config(name: str, base: str, steps: int, eval_every: int, scheduler: dict, metric: str, concurrency: int):
    from cluster.config import load_config
    from tune.config import SweepConfig

    return load_config(SweepConfig, os.path.join(REPO, "configs/tune-topic-tiny.yaml"), [
        f"name={name}", f"finetune.model.checkpoint={base}", f"finetune.train.max_steps={steps}",
        f"finetune.train.eval_every={eval_every}", "finetune.data.train_examples=1000",
        "finetune.data.validation_examples=300", "finetune.train.eval_batches=19", "finetune.train.batch_size=8",
        "finetune.strategy.unfreeze_top_k=0", f"search={json.dumps({'optim.lr': {'grid': LRS}, 'strategy.kind': {'grid': STRATEGIES}})}",
        "search_alg.kind=grid", "num_samples=1", f"max_concurrent_trials={concurrency}", f"metric={metric}",
        "mode=null", f"scheduler={json.dumps(scheduler)}", "publish.enabled=false",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120, help="steps of a full trial")
    p.add_argument("--rungs", type=int, default=12, help="evaluations per full trial; ASHA's first rung is the first")
    p.add_argument("--base", default=None, help="base model (default: pretrain one now)")
    p.add_argument("--metric", default="val_macro_f1")
    p.add_argument("--concurrency", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAYLM_STORAGE", tempfile.mkdtemp(prefix="raylm-bench-tune-"))
    from cluster import runtime
    from tune.driver import sweep

    runtime.connect()
    base = ensure_base(args.base)
    out = {}
    for name, scheduler in (("grid", {"kind": "fifo"}),
                            ("asha", {"kind": "asha", "grace_period": args.steps // args.rungs, "reduction_factor": 3})):
        t0 = time.time()
        s = sweep(sweep_config(f"bench-{name}-{int(t0)}", base, args.steps, args.steps // args.rungs, scheduler,
                               args.metric, args.concurrency))
        out[name] = {"best": s["best"][args.metric], "config": s["best"]["config"], "trial_steps": s["trial_steps"],
                     "stopped": s["stopped_early"], "trials": s["trials"], "seconds": time.time() - t0}
    g, a = out["grid"], out["asha"]
    best_ratio, steps_ratio = a["best"] / g["best"], a["trial_steps"] / g["trial_steps"]
    print(f"\n{len(LRS) * len(STRATEGIES)} grid points (lr {LRS} x strategy {STRATEGIES}), {args.steps} steps per "
          f"full trial, evaluated every {args.steps // args.rungs}, {args.metric}; ASHA grace "
          f"{args.steps // args.rungs} steps, reduction factor 3\n")
    print("| | full grid | ASHA | ASHA / grid |\n|---|---|---|---|")
    print(f"| best {args.metric} | {g['best']:.4f} | {a['best']:.4f} | {best_ratio:.3f} |")
    print(f"| trial-steps | {g['trial_steps']} | {a['trial_steps']} | {steps_ratio:.2f} |")
    print(f"| wall time (s) | {g['seconds']:.0f} | {a['seconds']:.0f} | {a['seconds'] / g['seconds']:.2f} |")
    print(f"| trials stopped early | {g['stopped']} / {g['trials']} | {a['stopped']} / {a['trials']} | |")
    print(f"\nbest config: grid {g['config']}, ASHA {a['config']}")
    met = best_ratio >= 0.99 and steps_ratio <= 0.40
    print(f"goal (best within 1% of the grid's with <= 40% of its trial-steps): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
