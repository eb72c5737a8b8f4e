"""Sweep wall time with and without Tune reusing trial processes (`reuse_actors`), in one run: the
shipped tiny ASHA sweep (configs/tune-topic-tiny.yaml: 6 trials, 2 at a time) on the same base
model, alternately with reuse off (Tune's default) and on, `--repeat` pairs. Reported: wall time,
trial-steps and best metric of each sweep, and the median time ratio on / off.

    python -m bench.sweep_reuse [--repeat 2] [--base demo-gpt]

The base model is a pretrain run name, checkpoint or registry name; without one, a tiny GPT is
pretrained first (a couple of minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.tune_efficiency import REPO, ensure_base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2, help="off/on pairs")
    p.add_argument("--base", default=None, help="base model (default: pretrain one now)")
    args = p.parse_args()
    os.environ.setdefault("RAYLM_STORAGE", tempfile.mkdtemp(prefix="raylm-bench-reuse-"))
    from cluster import runtime
    from cluster.config import load_config
    from tune.config import SweepConfig
    from tune.driver import sweep

    runtime.connect()
    base = ensure_base(args.base)
    rows = []
    for pair in range(args.repeat):
        # alternate which goes first: this VM's speed drifts within minutes
        order = (False, True) if pair % 2 == 0 else (True, False)
        runs = {}
        for reuse in order:
            cfg = load_config(SweepConfig, os.path.join(REPO, "configs/tune-topic-tiny.yaml"), [
                f"name=bench-reuse-{int(time.time())}-{reuse}", f"finetune.model.checkpoint={base}",
                "publish.enabled=false", f"reuse_actors={str(reuse).lower()}"])
            t0 = time.time()
            s = sweep(cfg)
            runs[reuse] = {"seconds": time.time() - t0, "trial_steps": s["trial_steps"], "best": s["best"][s["metric"]]}
        rows.append(runs)
    print("\n| pair | reuse off: s / trial-steps / best | reuse on: s / trial-steps / best | on / off (time) |")
    print("| --- | --- | --- | --- |")
    for i, r in enumerate(rows, 1):
        off, on = r[False], r[True]
        print(f"| {i} | {off['seconds']:.1f} / {off['trial_steps']} / {off['best']:.4f} | "
              f"{on['seconds']:.1f} / {on['trial_steps']} / {on['best']:.4f} | {on['seconds'] / off['seconds']:.2f} |")
    print(f"\nmedian time ratio on / off: {statistics.median(r[True]['seconds'] / r[False]['seconds'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
