"""Prepare throughput (raw MB/s) against the same trained tokenizer's batch encode, same cores.

    python -m bench.prepare [--docs 240000] [--repeat 3] [--part-mb MiB]

Both sides read the same JSONL file and use the same tokenizer (trained once beforehand, reused by
prepare through tokenizer.path), so the ratio is the cost of raylm's pipeline (reading, cleaning,
hashing/de-dup, split, packing, Parquet writing, Ray Data scheduling) over bare tokenization.
Ray's startup is not counted (a job pays it once, see bench.train_overhead for that).

The default corpus (240,000 documents, 69 MB) is large enough for throughput to dominate: every
prepare also pays ~0.6 s with cores idle (each Ray Data execution's start, the driver's tally, the
two splits' short writes), which is a fifth of a run on 60,000 documents (17 MB) and a twentieth here."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def write_corpus(path: str, docs: int) -> int:
    from cluster.data import synthetic

    with open(path, "w") as f:
        for d in synthetic.documents(docs, seed=123):
            f.write(json.dumps({"text": d.text}) + "\n")
    return os.path.getsize(path)


def busy_cpu_s() -> float | None:
    """CPU-seconds the whole machine has spent busy so far (Linux /proc/stat), or None elsewhere.
    Differences over a run, on an otherwise idle machine, count every process Ray starts too."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def baseline(path: str, tok_dir: str) -> float:
    """Read JSONL, parse, encode_batch with the Rust tokenizer (all cores): seconds."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    t0 = time.perf_counter()
    texts: list[str] = []
    with open(path) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == 4096:
                tok.encode_batch_fast(texts, add_special_tokens=False)
                texts = []
    if texts:
        tok.encode_batch_fast(texts, add_special_tokens=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=240000)
    p.add_argument("--repeat", type=int, default=3,
                   help="baseline/raylm pairs, run alternately so that a slow spell of the machine hits both")
    p.add_argument("--part-mb", type=float, default=None, help="the source's part_mb in MiB (default: auto)")
    args = p.parse_args()
    os.environ.setdefault("RAYLM_DASHBOARD", "0")
    from cluster import runtime
    from cluster.data.tokenizer import TokenizerConfig, save_tokenizer, train_tokenizer
    from cluster.stages.prepare import PrepareConfig, prepare

    work = tempfile.mkdtemp(prefix="raylm-bench-prepare-")
    data = os.path.join(work, "corpus.jsonl")
    size = write_corpus(data, args.docs)
    texts = [json.loads(line)["text"] for _, line in zip(range(5000), open(data), strict=False)]
    tok_dir = os.path.join(work, "tokenizer")
    save_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=2048)), tok_dir)

    runtime.connect()
    cfg = PrepareConfig.model_validate({
        "name": "bench",
        "sources": [{"kind": "files", "paths": [data], **({"part_mb": args.part_mb} if args.part_mb else {})}],
        "tokenizer": {"path": tok_dir}, "pack": {"block_size": 128},
    })
    prepare(cfg, root=work)  # warm: Ray worker processes started, imports done
    mb = size / 2**20
    rows = []
    for _ in range(args.repeat):
        cpu0 = busy_cpu_s()
        base_s = baseline(data, tok_dir)
        cpu1, t0 = busy_cpu_s(), time.perf_counter()
        prepare(cfg, root=work)
        raylm_s, cpu2 = time.perf_counter() - t0, busy_cpu_s()
        rows.append((base_s, raylm_s, None if cpu0 is None else (cpu1 - cpu0, cpu2 - cpu1)))
    print(f"| corpus | {args.docs} docs, {mb:.1f} MB raw JSONL, part_mb {cfg.sources[0].part_mb} |")
    for i, (base_s, raylm_s, cpu) in enumerate(rows, 1):
        line = (f"| pair {i} | baseline (json + tokenizer.encode_batch_fast, all cores) {mb / base_s:.2f} MB/s "
                f"({base_s:.2f} s); raylm prepare (Ray Data, reused tokenizer) {mb / raylm_s:.2f} MB/s "
                f"({raylm_s:.2f} s); ratio {base_s / raylm_s:.2f}")
        if cpu:  # with every core busy on both sides the ratio could reach at most base_cpu / raylm_cpu
            line += f"; CPU-seconds, whole machine: {cpu[0]:.2f} / {cpu[1]:.2f}"
        print(line + " |")
    ratios = sorted(b / r for b, r, _ in rows)
    print(f"| ratio, median of {len(rows)} (goal >= 0.7) | {ratios[len(ratios) // 2]:.2f} |")


if __name__ == "__main__":
    main()
