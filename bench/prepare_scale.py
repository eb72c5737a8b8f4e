"""Does jobs.prepare's driver stay small as the corpus grows? Peak driver RSS and throughput, small
corpus against large, one run.

    python -m bench.prepare_scale [--docs 60000 480000] [--near-dedup] [--part-mb auto]

Each size is prepared by its own process (a fresh interpreter and embedded Ray, so the large run
inherits nothing from the small one), from a synthetic JSONL corpus with 2% exact duplicates and
2% near-duplicates (one word changed) injected, training its tokenizer as a first prepare does.
A thread samples the driver process's RSS every 50 ms; Ray's own processes are not the driver
and are not counted. Goals (issue 41): peak driver RSS grows by less than 10% from the small
corpus to the large one, and the large corpus's MB/s is at least 0.9x the small one's. The
issue's sizes are 0.25 GB and 2 GB (--docs 870000 7000000); the default is 8x apart and fits
this 2-core machine in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def write_corpus(path: str, docs: int) -> int:
    """Synthetic documents, every 50th followed by an exact copy of an earlier one and every 50th
    (offset 25) by a copy of an earlier one with one word changed."""
    from cluster.data import synthetic

    kept: list[str] = []
    with open(path, "w") as f:
        for i, d in enumerate(synthetic.documents(docs, seed=123)):
            f.write(json.dumps({"text": d.text}) + "\n")
            if i % 1000 == 0:
                kept.append(d.text)
            if i % 50 == 0 and kept:
                f.write(json.dumps({"text": kept[-1]}) + "\n")
            elif i % 50 == 25 and kept:
                words = kept[-1].split()
                words[len(words) // 2] = "zebra"
                f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return os.path.getsize(path)


def one(docs: int, near_dedup: bool, part_mb: str) -> dict:
    """Prepare a corpus of `docs` documents in this process: peak driver RSS, seconds, MB."""
    import psutil

    os.environ.setdefault("RAYLM_DASHBOARD", "0")
    from cluster import runtime
    from cluster.stages.prepare import PrepareConfig, prepare

    work = tempfile.mkdtemp(prefix="raylm-bench-scale-")
    data = os.path.join(work, "corpus.jsonl")
    size = write_corpus(data, docs)
    runtime.connect()
    me = psutil.Process()
    rss_before = me.memory_info().rss
    peak, done = [rss_before], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], me.memory_info().rss)

    clean = {"near_dedup": {"threshold": 0.8}} if near_dedup else {}
    cfg = PrepareConfig.model_validate({"name": "scale", "sources": [{"kind": "files", "paths": [data], "part_mb": _part_mb(part_mb)}],
                                        "tokenizer": {"vocab_size": 2048}, "pack": {"block_size": 128}, "clean": clean})
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = prepare(cfg, root=work)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    documents = summary.get("documents") or {}
    return {"docs": docs, "mb": size / 2**20, "seconds": seconds, "rss_before_mb": rss_before / 2**20,
            "rss_peak_mb": peak[0] / 2**20, "dropped": documents.get("dropped")}


def _part_mb(value: str) -> float | str:
    return value if value == "auto" else float(value)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, nargs=2, default=[60000, 480000], metavar=("SMALL", "LARGE"))
    p.add_argument("--near-dedup", action="store_true", help="also remove near-duplicates (clean.near_dedup)")
    p.add_argument("--part-mb", default="auto", help="the source's part_mb (read parts, hence blocks): MiB or auto")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.near_dedup, args.part_mb)), flush=True)
        return
    results = []
    for docs in args.docs:
        cmd = [sys.executable, "-m", "bench.prepare_scale", "--one", str(docs), "--part-mb", str(args.part_mb)]
        cmd += ["--near-dedup"] * args.near_dedup
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"prepare of {docs} documents failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[0][len("RESULT "):]))
    small, large = results
    for r in results:
        print(f"| {r['docs']} docs, {r['mb']:.0f} MB | {r['seconds']:.1f} s, {r['mb'] / r['seconds']:.2f} MB/s | "
              f"driver RSS {r['rss_before_mb']:.0f} MB before, {r['rss_peak_mb']:.0f} MB peak | dropped {r['dropped']} |")
    growth = large["rss_peak_mb"] / small["rss_peak_mb"] - 1
    speed = (large["mb"] / large["seconds"]) / (small["mb"] / small["seconds"])
    print(f"| peak driver RSS growth, small -> large (goal < 10%) | {100 * growth:+.1f}% |")
    print(f"| throughput, large / small (goal >= 0.9) | {speed:.2f} |")


if __name__ == "__main__":
    main()
