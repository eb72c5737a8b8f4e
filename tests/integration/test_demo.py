"""`python -m jobs.demo`, what `make demo` runs, on the shared local Ray: every stage succeeds and the
console shows no traceback and no error line. One demo run prints each stage's console (prepare,
pretrain, sampling, sweep, evaluate, distil, serve) in about 2-3 minutes on 2 cores; a test per stage would
first have to run most of the stages before it again."""

from __future__ import annotations

import os
import re
import subprocess

from tests.conftest import PYTHON, REPO, subprocess_env

# A traceback; Ray's C++ log lines at error or fatal level ("[2026-01-02 10:11:12,345 E 123 456]
# core_worker.cc:..."), also when a worker's are forwarded; Python log records at ERROR or CRITICAL
# level in raylm's, Ray's and Serve's formats.
ERROR_LINE = re.compile(r"Traceback|\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]|(^|\s)(ERROR|CRITICAL)\s")


def test_error_line_matches_what_ray_and_python_print_on_errors():
    assert ERROR_LINE.search("[2026-12-06 08:17:47,644 E 25556 25556] core_worker.cc:2465: Actor with class name")
    assert ERROR_LINE.search("(RayTrainWorker pid=1) [2026-12-06 08:17:47,644 F 2 3] raylet_client.cc:1: down")
    assert ERROR_LINE.search("2026-12-06 08:16:18,683\tERROR worker.py:1 -- Unhandled error")
    assert ERROR_LINE.search("ERROR 2026-12-06 08:18:04,638 serve 25556 -- replica failed")
    assert ERROR_LINE.search("Traceback (most recent call last):")
    for fine in ("2026-12-06 08:16:18,683\tWARNING authentication_token_setup.py:85 -- Token authentication",
                 "08:17:57 INFO cluster.stages.evaluate: 400 rows: loss=1.379, accuracy=0.2875",
                 "   classify   > 'Shares of Vela Bank rose 12 percent in Calder.': finance (0.27)"):
        assert not ERROR_LINE.search(fine), fine


def test_the_demo_runs_every_stage_with_no_error_on_its_console(ray_session, tmp_path):
    env = subprocess_env(ray_session)
    env["RAYLM_STORAGE"] = str(tmp_path)  # its corpus, runs and registry apart from the other tests'
    proc = subprocess.run([PYTHON, "-m", "jobs.demo", "--steps", "30", "--docs", "2000",
                                                "--distill-steps", "30"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert [n for n in range(1, 8) if f"== {n}. " not in out] == [], out[-6000:]
    assert "   student int8 " in out and "demo-topic-student" in out
    assert "   classify   > " in out and out.rstrip().endswith(os.path.join(str(tmp_path), "tune", "demo-topic",
                                                                             "summary.json"))
    lines = out.splitlines()
    errors = [i for i, line in enumerate(lines) if ERROR_LINE.search(line)]
    # each error line with what follows it (a traceback's frames and exception), to say what failed
    assert errors == [], "\n----\n".join("\n".join(lines[max(0, i - 3):i + 30]) for i in errors)
