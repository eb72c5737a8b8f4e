"""Compression: a `small`-shape topic classifier (the teacher, fp32) against its distilled student and
both with int8 Linear layers, each scored and timed through Serve's own engine (serve.engines),
in this process.

    python -m bench.compress [--student-layers 2] [--steps 150] [--rounds 5] [--threads 2]

The teacher is a BERT of the `small` preset (6 blocks, width 512) fine-tuned from random weights
on the synthetic topic task (jobs.finetune); the student is distilled from it (jobs.distill,
`teacher_layers`: every k-th block). Both run on an embedded Ray; then, without Ray, each variant's
accuracy on 400 held-out rows (through the engine's classify) and, alternating the
variants `--rounds` times so the VM's drift falls on all of them alike: throughput (texts/s in
batches of 32) and p50 latency of one text. Ratios are against the teacher in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS_PER_BATCH = 32


def make_base(path: str) -> str:
    """A random-init BERT of the `small` preset (6 blocks, width 512, 8 heads) with a WordPiece
    tokenizer trained on synthetic topic texts other than the task's rows."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from cluster.data import synthetic_tasks
    from cluster.data.tokenizer import TokenizerConfig, train_tokenizer
    from cluster.train.models import SIZES

    texts = [r["text"] for r in synthetic_tasks.topic_classification(4000, seed=99)]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=2000, min_frequency=1,
                                                 model_max_length=128))
    layers, heads, width, ff = SIZES["small"]
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=ff, max_position_embeddings=128,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(storage: str, steps: int, student_layers: int, threads: int) -> tuple[dict, dict]:
    """The teacher's and the student's run summaries."""
    from cluster.config import load_config
    from cluster.stages.distill import DistillConfig
    from cluster.stages.finetune import FinetuneConfig
    from jobs import distill as distill_job
    from jobs import finetune as finetune_job

    base = make_base(os.path.join(storage, "small-bert"))
    common = [f"train.max_steps={steps}", f"scaling.threads_per_worker={threads}", "train.eval_every=50",
              "train.checkpoint_every=50", "data.max_length=96"]
    teacher = load_config(FinetuneConfig, os.path.join(REPO, "configs", "finetune-topic-tiny.yaml"),
                          ["name=bench-teacher", f"model.checkpoint={base}", "optim.lr=3e-4", *common])
    t = json.load(open(finetune_job.run(teacher)))
    student = load_config(DistillConfig, os.path.join(REPO, "configs", "distill-topic-tiny.yaml"),
                          ["name=bench-student", "teacher=bench-teacher", f"student.layers={student_layers}",
                           "compare_baseline=false", "optim.lr=3e-4", *common])
    s = json.load(open(distill_job.run(student)))
    return t, s


def accuracy(engine, rows: list[dict]) -> float:
    right = 0
    for i in range(0, len(rows), TEXTS_PER_BATCH):
        chunk = rows[i: i + TEXTS_PER_BATCH]
        out = engine.classify([r["text"] for r in chunk], [None] * len(chunk))
        right += sum(o["label"] == r["label"] for o, r in zip(out, chunk, strict=True))
    return right / len(rows)


def timed(engine, texts: list[str], batches: int, singles: int) -> tuple[float, list[float]]:
    """(texts/s over `batches` batches of 32, latencies in ms of `singles` one-text calls)."""
    t0 = time.perf_counter()
    for b in range(batches):
        chunk = [texts[(b * TEXTS_PER_BATCH + j) % len(texts)] for j in range(TEXTS_PER_BATCH)]
        engine.classify(chunk, [None] * TEXTS_PER_BATCH)
    rate = batches * TEXTS_PER_BATCH / (time.perf_counter() - t0)
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        engine.classify([texts[i % len(texts)]], [None])
        lat.append((time.perf_counter() - t) * 1000)
    return rate, lat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="fine-tuning and distillation steps")
    p.add_argument("--student-layers", type=int, default=2, help="the student's blocks (the teacher has 6)")
    p.add_argument("--rounds", type=int, default=5, help="alternations of the four variants")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and inference")
    p.add_argument("--storage", help="where the runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    storage = args.storage or tempfile.mkdtemp(prefix="raylm-bench-compress-")
    os.environ["RAYLM_STORAGE"] = storage
    os.environ.setdefault("RAYLM_DASHBOARD", "0")

    from cluster import registry, runtime
    from cluster.data import synthetic_tasks
    from cluster.entry import setup_logging

    setup_logging()
    t0 = time.time()
    runtime.connect()
    teacher, student = train(storage, args.steps, args.student_layers, args.threads)
    import ray

    ray.shutdown()
    train_s = time.time() - t0

    import torch

    from serve import engines

    torch.set_num_threads(args.threads)
    reg = os.path.join(storage, "registry")
    for name, summary in (("teacher", teacher), ("student", student)):
        registry.publish((summary["best"] or summary["final"])["checkpoint"], name, "classification", root=reg,
                         force=True)
    variants = {f"{who} {mode}": engines.load(registry.load_entry(who, reg), None if mode == "fp32" else "int8")
                for who in ("teacher", "student") for mode in ("fp32", "int8")}
    rows = synthetic_tasks.topic_classification(400, seed=7)  # held out: fine-tuning drew its rows with seed 0
    texts = [r["text"] for r in rows]
    acc = {name: accuracy(e, rows) for name, e in variants.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    lats: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, engine in variants.items():
            rate, lat = timed(engine, texts, batches=6, singles=30)
            rates[name].append(rate)
            lats[name] += lat
    base_rate = statistics.median(rates["teacher fp32"])
    result = {"train_s": round(train_s, 1), "threads": args.threads, "rounds": args.rounds,
              "teacher_layers": student["teacher"]["layers"], "student_layers": student["student"]["layers"],
              "params": {"teacher": student["teacher"]["params"], "student": student["student"]["params"]},
              "variants": {}}
    print(f"{'variant':<14} {'accuracy':>8} {'texts/s':>9} {'x teacher':>9} {'p50 ms':>8}")
    for name in variants:
        rate, p50 = statistics.median(rates[name]), statistics.median(lats[name])
        result["variants"][name] = {"accuracy": acc[name], "texts_per_s": round(rate, 1),
                                    "throughput_ratio": round(rate / base_rate, 2), "p50_ms": round(p50, 2),
                                    "rates": [round(r, 1) for r in rates[name]]}
        print(f"{name:<14} {acc[name]:>8.3f} {rate:>9.1f} {rate / base_rate:>9.2f} {p50:>8.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
