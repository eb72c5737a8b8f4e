"""What Ray's own processes cost a training run on this machine: one jobs.pretrain run (one worker,
embedded Ray, the settings of bench.train_overhead) in which every process of its Ray but the
training worker, the raylet and the split coordinator is frozen (SIGSTOP) in alternate 20-step
windows. Linux only.

    python -m bench.ray_background [--steps 500] [--threads 2]

Prints the median tokens/s of the windows with those processes running and frozen, and what each
of them used of a core while running. Alternate windows of one run see the same machine, so the
ratio is not moved by this VM's drift, which moves whole runs by 10-30%.

The worker keeps what it needs: its batches come from the split coordinator through the raylet's
object store, and neither is frozen. Everything else (GCS, dashboard and its agent, log monitor,
Ray Train's controller and helper actors, Ray Data's actors, idle pool workers, the job's driver)
has nothing the worker waits for within a window, which the data-wait column checks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np

from bench.train_overhead import REPO, WINDOW, bench_corpus, pretrain_command, train_rows

FIRST_TOGGLE = 40  # freezing starts after this step's row: steps before it are warm-up
# Process titles the training worker needs while it trains (Ray names worker processes ray::<Actor>).
KEEP = ("ray::RayTrainWorker", "ray::SplitCoordinator", "/raylet/raylet ")


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """Every process below `root` in a {pid: parent pid} map (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes() -> dict[int, tuple[int, str, int]]:
    """{pid: (parent pid, command line, CPU ticks used)} of every process readable now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        out[int(entry)] = (int(fields[1]), cmd, int(fields[11]) + int(fields[12]))
    return out


def others(driver: int, table: dict[int, tuple[int, str, int]]) -> set[int]:
    """The driver and every process it started (its Ray), minus what the training worker needs."""
    tree = descendants(driver, {pid: row[0] for pid, row in table.items()}) | {driver}
    return {pid for pid in tree if pid in table and not any(k in table[pid][1] + " " for k in KEEP)}


def label(cmd: str) -> str:
    """A short name for a process: Ray's title for its workers and dashboard modules, else the
    Python module or script, else the binary."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith(("ray::", "ray-dashboard-")):
        return words[0]
    if "-m" in words[:-1]:
        return "python -m " + words[words.index("-m") + 1]
    script = next((w for w in words[1:] if w.endswith(".py")), None)
    return os.path.basename(script or words[0])


def window_medians(rows: list[dict], frozen: dict[int, bool]) -> dict[bool, dict[str, float]]:
    """Median tokens/s and data-wait fraction of the windows (by the step that ends them) that ran
    with the others frozen (True) or running (False)."""
    by_step = {r["step"]: r for r in rows}
    out = {}
    for state in (False, True):
        sel = [by_step[s] for s, f in frozen.items() if f == state and s in by_step]
        out[state] = {"windows": len(sel),
                      "tokens_per_s": float(np.median([r["tokens_per_s_worker"] for r in sel])) if sel else float("nan"),
                      "data_wait": float(np.median([r["data_wait_fraction"] for r in sel])) if sel else float("nan")}
    return out


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run(steps: int, threads: int, batch_size: int) -> None:
    root, env = bench_corpus()
    name = "background"
    log = open(os.path.join(root, "pretrain.log"), "w+")  # a file, not a pipe: nothing reads it while the job runs
    driver = subprocess.Popen(pretrain_command(name, steps, threads, batch_size, []), cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    hz = os.sysconf("SC_CLK_TCK")
    frozen_in: dict[int, bool] = {}  # window end step -> frozen during that window
    touched: set[int] = set()  # every pid ever stopped, all continued at the end whatever happens
    cpu_running: dict[str, float] = {}  # process -> CPU-seconds over the running windows
    running_s, seen, frozen, mark = 0.0, 0, False, None
    try:
        while driver.poll() is None:
            rows = train_rows(root, name)
            last = rows[-1]["step"] if rows else 0
            if last >= FIRST_TOGGLE and last != seen:
                seen = last
                table, now = processes(), time.perf_counter()
                if mark is not None and not frozen:  # the window just ended ran with the others running
                    t0, before = mark
                    running_s += now - t0
                    for pid, (_, cmd, ticks) in table.items():
                        if pid in before:
                            key = label(cmd)
                            cpu_running[key] = cpu_running.get(key, 0.0) + (ticks - before[pid]) / hz
                targets = others(driver.pid, table)
                frozen = not frozen and last + 2 * WINDOW < steps  # the last windows run as normal
                if frozen:
                    touched |= targets
                    signal_all(targets, signal.SIGSTOP)
                else:
                    signal_all(touched, signal.SIGCONT)
                # The worker times its windows itself; this switch lands ~10-30 ms (polling, the row's
                # write) into the next one, so each window's first ~2% runs in the previous state.
                if last + WINDOW < steps:  # the last step also evaluates and checkpoints: not counted
                    frozen_in[last + WINDOW] = frozen
                mark = (time.perf_counter(), {pid: table[pid][2] for pid in targets})
            time.sleep(0.01)
    finally:
        signal_all(touched, signal.SIGCONT)
    if driver.returncode != 0:
        log.seek(0)
        sys.exit(f"jobs.pretrain failed (exit {driver.returncode}):\n{log.read()[-3000:]}")
    med = window_medians(train_rows(root, name), frozen_in)
    run_, frz = med[False], med[True]
    print(f"| {steps} steps, batch {batch_size}, {threads} threads, 1 worker | others running | others frozen |")
    print("| --- | --- | --- |")
    print(f"| 20-step windows | {run_['windows']} | {frz['windows']} |")
    print(f"| tokens/s, median | {run_['tokens_per_s']:,.0f} | {frz['tokens_per_s']:,.0f} |")
    print(f"| data-wait fraction, median | {run_['data_wait'] * 100:.2f}% | {frz['data_wait'] * 100:.2f}% |")
    print(f"\nrunning / frozen: {run_['tokens_per_s'] / frz['tokens_per_s']:.3f}")
    total = sum(cpu_running.values()) / max(running_s, 1e-9) * 100
    print(f"the others ({len(touched)} processes) used {total:.1f}% of one core over the running windows "
          f"({running_s:.1f} s); the largest:")
    for key, cpu_s in sorted(cpu_running.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {cpu_s / running_s * 100:5.2f}%  {key}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    if args.steps < FIRST_TOGGLE + 4 * WINDOW:
        p.error(f"--steps must be at least {FIRST_TOGGLE + 4 * WINDOW}: windows alternate from step "
                f"{FIRST_TOGGLE} and the last two run as normal")
    if not os.path.isdir("/proc/self"):
        p.error("needs Linux /proc to find and freeze Ray's processes")
    run(args.steps, args.threads, args.batch_size)


if __name__ == "__main__":
    main()
