"""A job's driver validates configs and starts Ray Train; it never builds a model. Keeping
transformers out of its imports saves ~2 s of every run's time-to-first-step (bench.train_overhead)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_pretrain_driver_does_not_import_transformers():
    code = ("import sys, jobs.pretrain, cluster.stages.pretrain; "
            "cfg = cluster.stages.pretrain.PretrainConfig.model_validate({'corpus': 'c', 'model': {'family': 'bert'}}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.strip() == "[]"
