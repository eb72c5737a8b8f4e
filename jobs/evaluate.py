"""jobs.evaluate: score a trained checkpoint on a prepared corpus or on labelled data, with Ray Data
actors holding the model (batch inference); the metrics are the ones its training reported.

    python -m jobs.evaluate --set model=<run, registry model or checkpoint> --set corpus=<corpus>
    python -m jobs.evaluate --config configs/evaluate-topic-tiny.yaml --set model=topic-cls
    ray job submit --working-dir . -- python -m jobs.evaluate --config ... --set scaling.workers=4
"""

from __future__ import annotations

import sys

from cluster.entry import run_job
from cluster.runs import RunDir
from cluster.stages.evaluate import EvaluateConfig, evaluate


def run(cfg: EvaluateConfig) -> str:
    summary = evaluate(cfg)
    return RunDir("evaluate", cfg.name).write_summary(summary)


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.evaluate", EvaluateConfig, argv, run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
