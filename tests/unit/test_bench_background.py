"""bench.ray_background's bookkeeping: which processes it freezes and how it sorts the windows."""

import math

from bench.ray_background import descendants, label, others, window_medians


def test_descendants_walks_the_whole_tree_below_the_root_only():
    parents = {10: 1, 11: 10, 12: 10, 13: 11, 14: 13, 20: 1, 21: 20}
    assert descendants(10, parents) == {11, 12, 13, 14}
    assert descendants(13, parents) == {14}
    assert descendants(14, parents) == set()


def test_others_is_the_drivers_ray_minus_what_the_worker_needs():
    ray = "/venv/lib/python3.11/site-packages/ray"
    table = {  # pid: (parent, command line, ticks)
        100: (1, "python -m jobs.pretrain --config configs/gpt-tiny.yaml", 0),
        101: (100, f"{ray}/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", 0),
        102: (100, f"{ray}/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/raylet", 0),
        103: (102, "ray::RayTrainWorker", 0),
        104: (102, "ray::SplitCoordinator", 0),
        105: (102, "ray::TrainController.run", 0),
        106: (102, "ray::IDLE", 0),
        107: (100, f"python {ray}/dashboard/dashboard.py --host=127.0.0.1", 0),
        200: (1, "ray::IDLE", 0),  # another Ray on the machine: not this run's
        201: (1, "python -m bench.ray_background", 0),
    }
    assert others(100, table) == {100, 101, 105, 106, 107}


def test_window_medians_sorts_windows_by_the_state_they_ran_in():
    rows = [{"step": s, "tokens_per_s_worker": t, "data_wait_fraction": w}
            for s, t, w in [(60, 100.0, 0.01), (80, 120.0, 0.0), (100, 90.0, 0.02), (120, 130.0, 0.0),
                            (140, 110.0, 0.03)]]
    frozen = {60: False, 80: True, 100: False, 120: True, 140: False, 160: True}  # 160: no row (run ended)
    med = window_medians(rows, frozen)
    assert med[False] == {"windows": 3, "tokens_per_s": 100.0, "data_wait": 0.02}
    assert med[True] == {"windows": 2, "tokens_per_s": 125.0, "data_wait": 0.0}
    assert math.isnan(window_medians(rows, {60: False})[True]["tokens_per_s"])


def test_label_names_ray_workers_modules_scripts_and_binaries():
    ray = "/venv/lib/python3.11/site-packages/ray"
    assert label("ray::TrainController.run") == "ray::TrainController.run"
    assert label("ray-dashboard-NodeHead-0 (/venv/bin/python -B -c ...)") == "ray-dashboard-NodeHead-0"
    assert label("/venv/bin/python -m jobs.pretrain --config c.yaml") == "python -m jobs.pretrain"
    assert label(f"/venv/bin/python -u {ray}/_private/log_monitor.py --session-dir=/tmp") == "log_monitor.py"
    assert label(f"{ray}/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray") == "gcs_server"
    assert label("") == "?"
