"""The jobs as processes, without Ray: each `python -m <job>` reports bad input before it connects,
a job follows its working directory when Ray replaces it, and the pretrain driver's imports. Each
needs a fresh interpreter (its own exit status, environment, working directory and sys.modules),
so they are here rather than in tests/unit; none of them starts Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import BAD_JOB_INPUT, REPO

_REPLACE = textwrap.dedent("""
    import os, shutil, sys, time
    from cluster.entry import follow_replaced_cwd
    work = sys.argv[1]
    os.makedirs(work)
    os.chdir(work)
    if sys.argv[2] == "follow":
        follow_replaced_cwd(interval_s=0.05)
    shutil.rmtree(work)  # what Ray does to a job's working_dir when it unpacks the package again
    os.makedirs(work)
    open(os.path.join(work, "marker"), "w").close()
    deadline = time.time() + float(sys.argv[3])
    while time.time() < deadline and not os.path.exists("marker"):
        time.sleep(0.05)
    print(os.path.exists("marker"), os.getcwd() if os.path.exists("marker") else "-")
""")


def _run(tmp_path: Path, mode: str, wait_s: float) -> str:
    out = subprocess.run([sys.executable, "-c", _REPLACE, str(tmp_path / "pkg"), mode, str(wait_s)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_job_follows_its_working_directory_when_ray_replaces_it(tmp_path):
    """`ray job submit --working-dir` jobs start inside a directory Ray may rmtree and unpack again
    under the running driver; the entry point re-enters the new one (relative paths and
    os.getcwd() work again) instead of staying in the deleted one."""
    assert _run(tmp_path, "follow", wait_s=20) == f"True {tmp_path / 'pkg'}"
    assert _run(tmp_path / "again", "stay", wait_s=1) == "False -"  # what a driver without it is left with


@pytest.mark.parametrize("module, args, error, run_folder", BAD_JOB_INPUT)
def test_bad_input_to_python_m_job_is_reported_before_it_connects_to_ray(tmp_path, module, args, error, run_folder):
    # What tests/unit/test_entry.py checks in-process, through `python -m <job>` as users run it: its
    # exit status, its stderr, and a fresh process that no test has connected to Ray. RAY_ADDRESS
    # names a port nothing listens on: a job that connected first would fail (or wait) on that; it
    # must fail on its input, start no Ray of its own and leave no run folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="127.0.0.1:9", RAYLM_STORAGE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode in (1, 2), out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(error), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / run_folder).exists()


def test_the_pretrain_driver_does_not_import_transformers():
    """A job's driver validates configs and starts Ray Train; it never builds a model. Keeping
    transformers out of its imports saves ~2 s of every run's time-to-first-step
    (bench.train_overhead)."""
    code = ("import sys, jobs.pretrain, cluster.stages.pretrain; "
            "cfg = cluster.stages.pretrain.PretrainConfig.model_validate({'corpus': 'c', 'model': {'family': 'bert'}}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.strip() == "[]"
