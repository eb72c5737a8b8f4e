"""Ray Train overhead: steady-state tokens/s of jobs.pretrain (one worker) against the same model,
batches and thread count in a plain single-process PyTorch loop; plus time-to-first-step of the
embedded default and the data-wait fraction.

    python -m bench.train_overhead [--steps 300] [--threads 2]
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


def plain_loop(corpus_path: str, steps: int, threads: int, batch_size: int, warmup: int) -> float:
    """The same model/optimizer/batches in one process, no Ray: steady-state tokens/s."""
    import pyarrow.parquet as pq
    import torch
    from transformers import PreTrainedTokenizerFast

    from cluster.config import load_config
    from cluster.corpus import Corpus
    from cluster.models import ModelConfig, build_model, special_ids
    from cluster.train import param_groups

    torch.set_num_threads(threads)
    corpus = Corpus.open(corpus_path)
    rows = np.concatenate([np.stack(pq.read_table(p).column("input_ids").to_numpy(zero_copy_only=False))
                           for p in corpus.shard_paths("train")])
    tok = PreTrainedTokenizerFast.from_pretrained(corpus.tokenizer_path)
    cfg = load_config(ModelConfig, None, ["family=gpt2", "size=tiny", "max_len=128"])
    model = build_model(cfg, len(tok), special_ids(tok))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    t0, tokens = None, 0
    for step in range(steps):
        if step == warmup:
            t0, tokens = time.perf_counter(), 0
        batch = torch.from_numpy(rows[step * batch_size % (len(rows) - batch_size):][:batch_size].astype(np.int64))
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--set", action="append", default=[], help="extra jobs.pretrain override, e.g. train.shuffle_buffer=0")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="raylm-bench-train-")
    env = {**os.environ, "RAYLM_STORAGE": root, "RAYLM_DASHBOARD": "1", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    py = sys.executable
    subprocess.run([py, "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml", "--set", "name=bench"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    sets = ["corpus=bench", "name=bench", f"train.max_steps={args.steps}", "train.log_every=20",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "train.eval_batches=2",
            f"train.batch_size={args.batch_size}", f"scaling.threads_per_worker={args.threads}", *args.set]
    launched = time.time()
    subprocess.run([py, "-m", "jobs.pretrain", "--config", "configs/gpt-tiny.yaml", *sum([["--set", s] for s in sets], [])],
                   cwd=REPO, env=env, check=True, capture_output=True)
    with open(os.path.join(root, "pretrain", "bench", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"train"' in line]
    first = next(r for r in rows if r["step"] == 1)
    steady = [r for r in rows if r["step"] >= 60 and r["step"] % 20 == 0 and r["step"] != args.steps]
    ray_tok_s = float(np.median([r["tokens_per_s_worker"] for r in steady]))
    wait = float(np.median([r["data_wait_fraction"] for r in steady]))
    plain_tok_s = plain_loop(os.path.join(root, "prepare", "bench"), args.steps, args.threads, args.batch_size, 40)
    print(f"| plain PyTorch loop ({args.threads} threads) | {plain_tok_s:,.0f} tokens/s |")
    print(f"| jobs.pretrain, 1 Ray Train worker ({args.threads} threads) | {ray_tok_s:,.0f} tokens/s |")
    print(f"| ratio (goal >= 0.95) | {ray_tok_s / plain_tok_s:.3f} |")
    print(f"| time to first step, embedded Ray, from process launch (goal <= 15 s) | {first['time'] - launched:.1f} s |")
    print(f"| data-wait fraction, steady state (goal <= 2%) | {wait * 100:.2f}% |")


if __name__ == "__main__":
    main()
