"""jobs.evaluate against a plain loop: the same model scores the same rows of the bench corpus with
the same batch size and thread count, in one process without Ray (the baseline) and through
jobs.evaluate's Ray Data actor pool (one replica, and two replicas of half the threads each).

    python -m bench.evaluate [--rows 2048] [--threads 2] [--batch-size 16]

Each jobs.evaluate setting scores N and 4N rows; the difference gives its steady-state tokens/s with
the fixed start-up cost (actor processes, imports, model load) cancelled out, compared with the
plain loop as a ratio. Also printed: the job's end-to-end time (Ray start included) and the losses,
which must agree with the plain loop's (the same rows, the same sums).
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


def make_model(corpus_path: str, out: str) -> str:
    """A random-init tiny GPT on the corpus's tokenizer: the throughput does not depend on training."""
    from transformers import PreTrainedTokenizerFast

    from cluster.config import load_config
    from cluster.data.corpus import Corpus
    from cluster.train.models import ModelConfig, build_model, special_ids

    corpus = Corpus.open(corpus_path)
    tok = PreTrainedTokenizerFast.from_pretrained(corpus.tokenizer_path)
    model = build_model(load_config(ModelConfig, None, ["family=gpt2", "size=tiny", "max_len=128"]), len(tok),
                        special_ids(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def plain_loop(corpus_path: str, model_dir: str, rows: int, threads: int, batch_size: int) -> tuple[float, float]:
    """(tokens/s, loss) of the first `rows` train rows, in shard order, scored in this process."""
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2LMHeadModel

    from cluster.data.corpus import Corpus

    torch.set_num_threads(threads)
    corpus = Corpus.open(corpus_path)
    blocks = np.concatenate([np.stack(pq.read_table(p, columns=["input_ids"]).column(0).to_numpy(zero_copy_only=False))
                             for p in corpus.shard_paths("train")])[:rows].astype(np.int64)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    nats, t0 = 0.0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[i : i + batch_size])
            logits = model(input_ids=ids, use_cache=False).logits
            nats += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                            ids[:, 1:].reshape(-1), reduction="sum"))
    seconds = time.perf_counter() - t0
    return blocks.size / seconds, nats / (len(blocks) * (blocks.shape[1] - 1))


def run_evaluate(root: str, env: dict, model_dir: str, rows: int, batch_size: int, workers: int, threads: int) -> dict:
    name = f"bench-{workers}"
    sets = [f"name={name}", f"model={model_dir}", "corpus=bench", "split=train", f"max_rows={rows}",
            f"batch_size={batch_size}", f"scaling.workers={workers}", f"scaling.threads_per_worker={threads}"]
    launched = time.time()
    subprocess.run([sys.executable, "-m", "jobs.evaluate", *sum([["--set", s] for s in sets], [])],
                   cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.time() - launched
    with open(os.path.join(root, "evaluate", name, "summary.json")) as f:
        s = json.load(f)
    return {**s, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048, help="rows of the short run; the long run scores 4x as many")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="raylm-bench-eval-")
    env = {**os.environ, "RAYLM_STORAGE": root, "RAYLM_DASHBOARD": "1", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    os.environ["RAYLM_STORAGE"] = root
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/prepare-synthetic.yaml", "--set",
                    "name=bench"], cwd=REPO, env=env, check=True, capture_output=True)
    model_dir = make_model("bench", os.path.join(root, "model"))
    short, long = args.rows, 4 * args.rows
    plain_tok_s, plain_loss = plain_loop("bench", model_dir, long, args.threads, args.batch_size)
    print(f"batch {args.batch_size}, {args.threads} threads in all; plain loop over {long} rows x 128 tokens: "
          f"{plain_tok_s:,.0f} tokens/s, loss {plain_loss:.6f}")
    print("| jobs.evaluate | scoring s, short / long | tokens/s, long run | marginal tokens/s | ratio to plain | "
          "loss, long run | job wall s, long run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for workers in (1, 2):
        a = run_evaluate(root, env, model_dir, short, args.batch_size, workers, max(1, args.threads // workers))
        b = run_evaluate(root, env, model_dir, long, args.batch_size, workers, max(1, args.threads // workers))
        # the fixed cost (actor processes, imports, model load) cancels out between the two runs
        marginal = (b["rows"] - a["rows"]) * 128 / (b["scoring_seconds"] - a["scoring_seconds"])
        print(f"| {workers} replica(s) | {a['scoring_seconds']:.1f} / {b['scoring_seconds']:.1f} | "
              f"{b['rows'] * 128 / b['scoring_seconds']:,.0f} | {marginal:,.0f} | {marginal / plain_tok_s:.2f} | "
              f"{b['metrics']['loss']:.6f} | {b['wall']:.1f} |")


if __name__ == "__main__":
    main()
