"""Ray Train overhead: steady-state tokens/s of jobs.pretrain (one worker) against the same model,
batches and thread count in a plain single-process PyTorch loop; plus time-to-first-step of the
embedded default and the data-wait fraction.

    python -m bench.train_overhead [--steps 300] [--threads 2] [--repeat 3]

Both sides report the same statistic: the median of the 20-step windows that end at step 60 and
later, the last step's excluded (it also evaluates and checkpoints). The pairs run
alternately (jobs.pretrain, then the plain loop) and the medians are reported, because this VM's
speed drifts by 10-30% within minutes and a drift that hits one side of a single pair moves its
ratio more than Ray's overhead does.
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


WINDOW = 20  # steps per logged window (jobs.pretrain's train.log_every below)
FIRST_WINDOW_END = 60  # windows ending before this step are warm-up on both sides


def steady_windows(steps: int) -> list[int]:
    """The steps whose windows count as steady state: every WINDOW-th from FIRST_WINDOW_END, the last
    step excluded (jobs.pretrain's final step also evaluates and checkpoints)."""
    return list(range(FIRST_WINDOW_END, steps, WINDOW))


def bench_corpus() -> tuple[str, dict[str, str]]:
    """A fresh storage root holding the synthetic bench corpus (`configs/prepare-synthetic.yaml`, name
    `bench`), and the environment the jobs run in there: embedded Ray with its dashboard, as by default."""
    root = tempfile.mkdtemp(prefix="raylm-bench-train-")
    env = {**os.environ, "RAYLM_STORAGE": root, "RAYLM_DASHBOARD": "1", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml",
                    "--set", "name=bench"], cwd=REPO, env=env, check=True, capture_output=True)
    return root, env


def pretrain_command(name: str, steps: int, threads: int, batch_size: int, extra: list[str]) -> list[str]:
    """jobs.pretrain on the bench corpus, one worker, logging every WINDOW steps, evaluating and
    checkpointing only at the last step."""
    sets = ["corpus=bench", f"name={name}", f"train.max_steps={steps}", f"train.log_every={WINDOW}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.eval_batches=2",
            f"train.batch_size={batch_size}", f"scaling.threads_per_worker={threads}", *extra]
    return [sys.executable, "-m", "jobs.pretrain", "--config", "configs/gpt-tiny.yaml",
            *sum([["--set", s] for s in sets], [])]


def train_rows(root: str, name: str) -> list[dict]:
    """The train rows of run `name`'s metrics.jsonl so far ([] before the file exists); a line still
    being written (no newline yet) is left for the next call."""
    try:
        with open(os.path.join(root, "pretrain", name, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n") and '"train"' in line]
    except FileNotFoundError:
        return []


def plain_loop(corpus_path: str, steps: int, threads: int, batch_size: int) -> float:
    """The same model/optimizer/batches in one process, no Ray: steady-state tokens/s, the median of
    the same windows jobs.pretrain's median is taken over."""
    import pyarrow.parquet as pq
    import torch
    from transformers import PreTrainedTokenizerFast

    from cluster.config import load_config
    from cluster.data.corpus import Corpus
    from cluster.train.models import ModelConfig, build_model, special_ids
    from cluster.train.optim import param_groups

    torch.set_num_threads(threads)
    corpus = Corpus.open(corpus_path)
    rows = np.concatenate([np.stack(pq.read_table(p).column("input_ids").to_numpy(zero_copy_only=False))
                           for p in corpus.shard_paths("train")])
    tok = PreTrainedTokenizerFast.from_pretrained(corpus.tokenizer_path)
    cfg = load_config(ModelConfig, None, ["family=gpt2", "size=tiny", "max_len=128"])
    model = build_model(cfg, len(tok), special_ids(tok))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    ends, rates = set(steady_windows(steps)), []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.from_numpy(rows[(step - 1) * batch_size % (len(rows) - batch_size):][:batch_size].astype(np.int64))
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % WINDOW == 0:
            now = time.perf_counter()
            if step in ends:
                rates.append(WINDOW * batch.numel() / (now - t0))
            t0 = now
    return float(np.median(rates))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--set", action="append", default=[], help="extra jobs.pretrain override, e.g. train.shuffle_buffer=0")
    p.add_argument("--repeat", type=int, default=3,
                   help="jobs.pretrain/plain-loop pairs, run alternately so that a slow spell of the machine hits both")
    args = p.parse_args()
    if args.steps < FIRST_WINDOW_END + WINDOW:
        p.error(f"--steps must be at least {FIRST_WINDOW_END + WINDOW}: steady state is measured from step "
                f"{FIRST_WINDOW_END}, before the last step")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    root, env = bench_corpus()
    ends = set(steady_windows(args.steps))
    pairs = []
    for i in range(1, args.repeat + 1):
        name = f"bench-{i}"
        launched = time.time()
        subprocess.run(pretrain_command(name, args.steps, args.threads, args.batch_size, args.set),
                       cwd=REPO, env=env, check=True, capture_output=True)
        rows = train_rows(root, name)
        first = next(r for r in rows if r["step"] == 1)
        steady = [r for r in rows if r["step"] in ends]
        ray_tok_s = float(np.median([r["tokens_per_s_worker"] for r in steady]))
        wait = float(np.median([r["data_wait_fraction"] for r in steady]))
        plain_tok_s = plain_loop(os.path.join(root, "prepare", "bench"), args.steps, args.threads, args.batch_size)
        pairs.append((plain_tok_s, ray_tok_s, first["time"] - launched, wait))

    def cells(values, fmt):
        return " | ".join(fmt.format(v) for v in values) + f" | **{fmt.format(float(np.median(values)))}**"

    plain, ray_, ttfs, waits = zip(*pairs, strict=True)
    print(f"| {args.steps} steps, batch {args.batch_size}, {args.threads} threads | "
          + " | ".join(f"pair {i}" for i in range(1, len(pairs) + 1)) + " | median |")
    print("| --- " * (len(pairs) + 2) + "|")
    print(f"| plain PyTorch loop, tokens/s | {cells(plain, '{:,.0f}')} |")
    print(f"| jobs.pretrain, 1 Ray Train worker, tokens/s | {cells(ray_, '{:,.0f}')} |")
    print(f"| ratio (goal >= 0.95) | {cells([r / p for p, r in zip(plain, ray_, strict=True)], '{:.3f}')} |")
    print(f"| time to first step, embedded Ray, from process launch (goal <= 15 s) | {cells(ttfs, '{:.1f} s')} |")
    print(f"| data-wait fraction, steady state (goal <= 2%) | {cells([w * 100 for w in waits], '{:.2f}%')} |")


if __name__ == "__main__":
    main()
