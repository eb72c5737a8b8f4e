"""Ray Data ingest against reading the shards with pyarrow (DESIGN.md's performance stance).

Both sides read a corpus's training split epoch after epoch, in jobs.pretrain's seeded shard order,
and turn it into the training loop's micro-batches (`CausalLM.collate`: an int64 tensor of
batch_size x block tokens), with no model:

- raylm: Ray Train (cluster.train.launcher) with a worker that iterates `cluster.train.batches.epoch_batches`, the loop's own
  iterator over `get_dataset_shard`, fed by `cluster.data.ingest.train_datasets` with
  `cluster.data.ingest.data_config()`; once with the local shuffle buffer off (like for like) and once
  with the config's default buffer.
- baseline: one process reads each shard with pyarrow (the list column's flat values, zero-copy,
  reshaped to blocks) and slices batches of the same size, carrying partial batches across shards.

Printed per side: tokens/s over the epochs after the first (epoch starts included: each epoch is
a Ray Data pipeline of its own) and the first batch's wait. What a model consumes puts the figures in
scale: the tiny GPT on this VM trains at ~20k tokens/s per worker (bench.train_overhead).

    python -m bench.ingest [--docs 100000] [--shard-mb 4] [--epochs 4] [--batch-size 16] [--corpus PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyarrow_epochs(corpus_path: str, epochs: int, batch_size: int, seed: int) -> list[dict]:
    """The baseline: per epoch, tokens delivered, seconds, and the first batch's wait."""
    import pyarrow.parquet as pq

    from cluster.data.corpus import Corpus
    from cluster.data.ingest import shard_order
    from cluster.objectives.lm import CausalLM

    corpus = Corpus.open(corpus_path)
    shards = corpus.shard_paths("train")
    block = corpus.manifest["block_size"]
    objective = CausalLM(1.0)
    out = []
    for epoch in range(epochs):
        t0, first, tokens, index = time.perf_counter(), None, 0, 0
        carry = np.empty((0, block), dtype=np.int32)
        for s in shard_order(len(shards), seed, epoch):
            column = pq.read_table(shards[s], columns=["input_ids"]).column(0).combine_chunks()
            # Ray's tensor extension type (registered once ray is imported) wraps a list array
            rows = getattr(column, "storage", column).flatten().to_numpy().reshape(-1, block)
            if len(carry):
                rows = np.concatenate([carry, rows])
            full = len(rows) // batch_size * batch_size
            for i in range(0, full, batch_size):
                inputs = objective.collate({"input_ids": rows[i:i + batch_size]}, (seed, epoch, index, 0))
                tokens += int(inputs["input_ids"].numel())
                index += 1
                if first is None:
                    first = time.perf_counter() - t0
            carry = rows[full:]
        out.append({"tokens": tokens, "seconds": time.perf_counter() - t0, "first_batch_s": first})
    return out


def ingest_worker(config: dict) -> None:
    """A Ray Train worker that reads its share of every epoch as the training loop does, and stops
    there. Every rank reports (Ray Train's report is a barrier); each writes its figures to a file."""
    import ray.train

    from cluster.objectives.lm import CausalLM
    from cluster.stages.pretrain import PretrainConfig
    from cluster.train.batches import epoch_batches
    from cluster.train.session import TrainSession

    cfg = PretrainConfig.model_validate(config["cfg"])
    session = TrainSession()
    objective = CausalLM(1.0)
    out = []
    for epoch in range(config["epochs"]):
        t0, first, tokens = time.perf_counter(), None, 0
        for i, batch in enumerate(epoch_batches(session, cfg.train, session.rank, epoch)):
            inputs = objective.collate(batch, (cfg.train.seed, epoch, i, session.rank))
            tokens += int(inputs["input_ids"].numel())
            if first is None:
                first = time.perf_counter() - t0
        out.append({"tokens": tokens, "seconds": time.perf_counter() - t0, "first_batch_s": first})
    with open(os.path.join(config["out"], f"rank-{session.rank}.json"), "w") as f:
        json.dump(out, f)
    ray.train.report({"epochs": len(out)})


def ray_epochs(corpus_path: str, epochs: int, batch_size: int, shuffle_buffer: int, workers: int,
               work_dir: str) -> list[dict]:
    """raylm's side, summed over ranks per epoch: tokens, the slowest rank's seconds and first wait."""
    from cluster.config import load_config
    from cluster.data.corpus import Corpus
    from cluster.data.ingest import train_datasets
    from cluster.stages.pretrain import PretrainConfig, plan_run
    from cluster.train import launcher

    cfg = load_config(PretrainConfig, None, [
        f"corpus={corpus_path}", f"train.batch_size={batch_size}", f"train.shuffle_buffer={shuffle_buffer}",
        f"train.epochs={epochs}", f"scaling.num_workers={workers}"])
    corpus = Corpus.open(corpus_path)
    plan = plan_run(cfg, corpus, work_dir)
    out = tempfile.mkdtemp(dir=work_dir)
    launcher.fit(ingest_worker, {"cfg": cfg.to_dict(), "epochs": epochs, "out": out}, cfg.scaling,
                 name=os.path.basename(out), storage_path=work_dir, datasets=train_datasets(corpus, plan, cfg.train.seed),
                 keep=1, metric="epochs", mode="max", what="the ingest benchmark")
    ranks = []
    for r in range(workers):
        with open(os.path.join(out, f"rank-{r}.json")) as f:
            ranks.append(json.load(f))
    return [{"tokens": sum(r[e]["tokens"] for r in ranks), "seconds": max(r[e]["seconds"] for r in ranks),
             "first_batch_s": max(r[e]["first_batch_s"] or 0.0 for r in ranks)} for e in range(epochs)]


def steady(epochs: list[dict]) -> float:
    """Tokens/s over every epoch after the first, each epoch's start (its first batch's wait) included."""
    later = epochs[1:]
    return sum(e["tokens"] for e in later) / sum(e["seconds"] for e in later)


def streaming(epochs: list[dict]) -> float:
    """Tokens/s after each epoch's first batch: the rate once a pipeline runs (training hides the
    starts of all but the first epoch: `train.next_epoch_ahead`)."""
    later = epochs[1:]
    return sum(e["tokens"] for e in later) / sum(e["seconds"] - (e["first_batch_s"] or 0.0) for e in later)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=100_000, help="synthetic documents in the bench corpus")
    p.add_argument("--shard-mb", type=float, default=4.0, help="the bench corpus's shard size")
    p.add_argument("--corpus", help="an existing corpus (a causal LM's blocks) instead of the bench corpus")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=256, help="the second raylm run's buffer (the default's)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is start-up")
    work = tempfile.mkdtemp(prefix="raylm-bench-ingest-")
    corpus = args.corpus
    if corpus is None:
        env = {**os.environ, "RAYLM_STORAGE": work, "RAYLM_DASHBOARD": "0", "PYTHONPATH": REPO}
        env.pop("RAY_ADDRESS", None)
        subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml",
                        "--set", "name=bench", "--set", f"sources.0.num_docs={args.docs}",
                        "--set", f"output.shard_mb={args.shard_mb}"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        corpus = os.path.join(work, "prepare", "bench")
    corpus = os.path.abspath(corpus)

    from cluster import runtime
    from cluster.data.corpus import Corpus

    info = Corpus.open(corpus)
    runtime.connect()
    plain = pyarrow_epochs(corpus, args.epochs, args.batch_size * args.workers, 0)
    like = ray_epochs(corpus, args.epochs, args.batch_size, 0, args.workers, work)
    shuffled = ray_epochs(corpus, args.epochs, args.batch_size, args.shuffle_buffer, args.workers, work)
    print(f"corpus: {corpus}, {len(info.shard_paths('train'))} train shards, "
          f"{info.split_info('train')['tokens_packed']:,} tokens; {args.epochs} epochs, "
          f"batch {args.batch_size} x {args.workers} worker(s)")
    print("| epochs 2+ | tokens/s, streaming | ratio | tokens/s, epoch starts included | ratio "
          "| first batch: epoch 1 / later (max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, runs in (("pyarrow, one process", plain), ("Ray Data, shuffle buffer off", like),
                        (f"Ray Data, shuffle buffer {args.shuffle_buffer}", shuffled)):
        later = max(e["first_batch_s"] or 0.0 for e in runs[1:])
        print(f"| {label} | {streaming(runs):,.0f} | {streaming(runs) / streaming(plain):.4f} | {steady(runs):,.0f} "
              f"| {steady(runs) / steady(plain):.4f} | {runs[0]['first_batch_s']:.2f} s / {later:.2f} s |")


if __name__ == "__main__":
    main()
