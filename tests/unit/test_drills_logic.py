"""The reliability drills' own bookkeeping (bench/drills), without Ray."""

from __future__ import annotations

import os

from bench.drills import faults
from bench.drills.common import Finding
from bench.drills.local_cluster import DrillCluster
from bench.drills.run import _guarded


def test_checkpoints_are_the_step_folders_not_rays_snapshot_file(tmp_path):
    # Regression: `checkpoint_*` also matched Ray Train's checkpoint_manager_snapshot.json, which the
    # kill-during-checkpoint drill then parsed as a step (ValueError) and the load check counted as broken.
    run = tmp_path / "pretrain" / "r"
    for step in (10, 20):
        (run / f"checkpoint_{step:07d}").mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    c = DrillCluster(state_file=str(tmp_path / "state.json"), storage=str(tmp_path))
    assert [os.path.basename(p) for p in faults._checkpoints(c, "r")] == ["checkpoint_0000010", "checkpoint_0000020"]


def test_a_drill_that_raises_is_a_failed_figure_not_a_lost_group():
    def broken():
        raise ValueError("boom")

    (finding,) = _guarded(broken)
    assert not finding.passed and "ValueError: boom" in finding.figure
    ok = [Finding("d", "f", "g", True)]
    assert _guarded(lambda: ok) == ok
