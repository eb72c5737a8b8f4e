"""`make gpu-check`: what only a GPU can prove, in one command of at most about 8 minutes.

    python -m bench.gpu_check [--steps 200] [--budget-s 480]   # one CUDA GPU
    python -m bench.gpu_check --rehearse                       # the same steps, tiny, on the CPU

1. GPT-2 124M (configs/gpt2-124m.yaml: bf16, torch.compile, 1024-token rows) through Ray Train on
   one GPU: tokens/s and MFU against the GPU's dense bf16 peak; then the same model, batches and
   precision in a plain process: the ratio (goal >= 0.97; MFU goal >= 45% on an H100).
2. The same run with FSDP2 (`scaling.strategy: fsdp`): both runs lower the loss, and FSDP's
   validation loss at the last step is within 2% of DDP's.
3. A worker killed mid-run: FailureConfig restarts it from the latest checkpoint on the GPU (its
   optimizer state restored onto the GPU parameters) and the loss curve continues.
4. The DDP run's checkpoint published and served on the GPU with a BERT classifier beside it:
   /v1/models says where each runs, completion tokens/s at concurrency 1 and 32, classification
   requests/s at concurrency 32 with batching on and off (goal >= 3x).

Every step prints its figure as it finishes; the figures go to bench/results/gpu-check.json and
BENCHMARKS.md's GPU section. On a machine without CUDA it exits 2 at once, naming what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "gpu-check.json")


def require_gpu() -> str:
    """The GPU's name, or exit 2 with what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu-check: needs PyTorch with CUDA (pip install torch with a CUDA build) and one NVIDIA GPU")
    if not torch.cuda.is_available():
        sys.exit(f"gpu-check: needs one CUDA GPU; torch {torch.__version__} sees none "
                 f"(CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU node, or --rehearse on the CPU.")
    return torch.cuda.get_device_name(0)


class Check:
    """The shared state of one run: storage, settings, the time budget and the figures so far."""

    def __init__(self, args: argparse.Namespace, device: str):
        self.rehearse, self.steps, self.device = args.rehearse, args.steps, device
        self.deadline = time.time() + args.budget_s
        self.root = tempfile.mkdtemp(prefix="raylm-gpu-check-")
        os.environ["RAYLM_STORAGE"] = self.root
        self.results: dict[str, Any] = {"device": device, "date": time.strftime("%Y-%m-%d"), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, step: str, figures: dict[str, Any]) -> None:
        self.results["steps"][step] = figures
        print(f"[{step}] " + ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()), flush=True)

    def train_sets(self, name: str, *extra: str) -> list[str]:
        """jobs.pretrain overrides for a one-GPU run of `self.steps` steps (tiny on the CPU)."""
        common = [f"name={name}", "corpus=gpu-check", f"train.max_steps={self.steps}", "train.log_every=10",
                  f"train.eval_every={self.steps}", f"train.checkpoint_every={self.steps}", "train.eval_batches=10",
                  "scaling.num_workers=1", "max_failures=0"]
        if self.rehearse:
            return [*common, "model.size=tiny", "model.max_len=128", "model.compile=false", "train.batch_size=8",
                    "train.grad_accum=1", "train.precision=bf16", "scaling.use_gpu=false",
                    "scaling.cpus_per_worker=1", "optim.warmup_steps=10", *extra]
        return [*common, "train.batch_size=16", "train.grad_accum=1", "scaling.use_gpu=true",
                "scaling.cpus_per_worker=4", "optim.warmup_steps=50", *extra]


def _fmt(v: Any) -> str:
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def prepare_corpus(check: Check) -> None:
    from cluster.config import load_config
    from cluster.stages.prepare import PrepareConfig
    from jobs.prepare import run

    sets = ["name=gpu-check", "sources.0.num_docs=8000" if check.rehearse else "sources.0.num_docs=60000",
            f"pack.block_size={128 if check.rehearse else 1024}", "split.validation_fraction=0.05"]
    run(load_config(PrepareConfig, os.path.join(REPO, "configs", "prepare-synthetic.yaml"), sets))


def pretrain(check: Check, name: str, *extra: str) -> dict[str, Any]:
    """One jobs.pretrain run on the shared Ray; its summary and train rows."""
    from cluster.config import load_config
    from cluster.stages.pretrain import PretrainConfig
    from jobs.pretrain import run

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "gpt2-124m.yaml"), check.train_sets(name, *extra))
    with open(run(cfg)) as f:
        summary = json.load(f)
    summary["rows"] = metrics_rows(check, name)
    return summary


def metrics_rows(check: Check, name: str) -> list[dict]:
    path = os.path.join(check.root, "pretrain", name, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def steady(rows: list[dict], key: str) -> float:
    """The median of `key` over train rows after the first third (compile and warm-up excluded)."""
    import numpy as np

    train = [r for r in rows if r.get("split") == "train" and key in r]
    return float(np.median([r[key] for r in train[len(train) // 3:]])) if train else float("nan")


def plain_loop(check: Check, steps: int) -> float:
    """The Ray Train run's model, batches, precision and compile in one plain process: tokens/s."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import PreTrainedTokenizerFast

    from cluster.config import load_config
    from cluster.data.corpus import Corpus
    from cluster.objectives.lm import CausalLM
    from cluster.stages.pretrain import PretrainConfig
    from cluster.train.models import build_model, special_ids
    from cluster.train.optim import build_optimizer

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "gpt2-124m.yaml"), check.train_sets("plain"))
    corpus = Corpus.open("gpu-check")
    rows = np.concatenate([np.stack(pq.read_table(p).column("input_ids").to_numpy(zero_copy_only=False))
                           for p in corpus.shard_paths("train")])
    tok = PreTrainedTokenizerFast.from_pretrained(corpus.local_tokenizer_dir())
    device = torch.device("cuda" if torch.cuda.is_available() and not check.rehearse else "cpu")
    model = build_model(cfg.model, len(tok), special_ids(tok)).to(device)
    optimizer, _ = build_optimizer(model, cfg.optim, steps, device)
    forward = torch.compile(model) if cfg.model.compile else model
    objective, batch, rates = CausalLM(1.0), cfg.train.batch_size, []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        start = (step - 1) * batch % (len(rows) - batch)
        inputs = {"input_ids": torch.from_numpy(rows[start:start + batch].astype(np.int64)).to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective.forward(forward, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(10 * inputs["input_ids"].numel() / (now - t0))
            t0 = now
    return float(np.median(rates[len(rates) // 3:]))


def step_throughput(check: Check) -> dict[str, Any]:
    ddp = pretrain(check, "ddp")
    ray_rate = steady(ddp["rows"], "tokens_per_s_worker")
    plain = plain_loop(check, check.steps)
    figures = {"ray_train_tokens_per_s": ray_rate, "plain_tokens_per_s": plain, "ratio": ray_rate / plain,
               "ratio_goal": 0.97}
    mfu = steady(ddp["rows"], "mfu")
    if mfu == mfu:  # a known GPU: the loop logs MFU against its dense bf16 peak
        figures |= {"mfu": mfu, "mfu_goal": 0.45}
    check.record("1 throughput", figures)
    return ddp


def step_fsdp(check: Check, ddp: dict[str, Any]) -> None:
    fsdp = pretrain(check, "fsdp", "scaling.strategy=fsdp")

    def first_last(rows: list[dict]) -> tuple[float, float]:
        train = [r["train_loss"] for r in rows if r.get("split") == "train" and "train_loss" in r]
        return train[0], train[-1]

    ddp_val, fsdp_val = ddp["final"]["metrics"]["val_loss"], fsdp["final"]["metrics"]["val_loss"]
    (d0, d1), (f0, f1) = first_last(ddp["rows"]), first_last(fsdp["rows"])
    check.record("2 fsdp vs ddp", {
        "ddp_loss_first_last": f"{d0:.3f} -> {d1:.3f}", "fsdp_loss_first_last": f"{f0:.3f} -> {f1:.3f}",
        "ddp_val_loss": ddp_val, "fsdp_val_loss": fsdp_val, "relative_gap": abs(fsdp_val - ddp_val) / ddp_val,
        "fsdp_tokens_per_s": steady(fsdp["rows"], "tokens_per_s_worker"),
        "met": bool(d1 < d0 and f1 < f0 and abs(fsdp_val - ddp_val) / ddp_val <= 0.02)})


def step_resume(check: Check) -> None:
    """A run killed at its 30th step (after a checkpoint at 20) restarts there on the GPU."""
    name, result = "resume", {}
    sets = ("train.max_steps=60", "train.checkpoint_every=20", "train.eval_every=20", "train.log_every=1",
            "max_failures=2", "model.compile=false")

    def run() -> None:
        try:
            result["summary"] = pretrain(check, name, *sets)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and not any(r.get("step", 0) >= 30 and r.get("split") == "train"
                                        for r in metrics_rows(check, name)):
        time.sleep(0.5)
    with open(os.path.join(check.root, "pretrain", name, "workers", "rank-0.json")) as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)
    thread.join()
    if "error" in result:
        raise result["error"]
    rows = metrics_rows(check, name)
    resumed = [r["step"] for r in rows if r.get("split") == "resume"]
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("split") == "train"]
    before = max(loss for step, loss in train if 15 <= step <= 20)
    after = [loss for step, loss in train if step > 20][-1]
    check.record("3 kill and resume", {"resumed_at": resumed, "loss_at_20": before, "final_loss": after,
                                       "met": bool(resumed == [20] and after < before)})


def step_serve(check: Check, ddp: dict[str, Any]) -> None:
    from ray import serve

    from cluster import registry
    from serve import tiny
    from serve.app import build_app

    registry.publish(ddp["final"]["checkpoint"], "gpu-gpt", "generation", force=True)
    tiny.publish_all(tempfile.mkdtemp(prefix="raylm-gpu-tiny-"))  # bert-cls among them
    from cluster.runtime import free_ports

    serve.start(http_options={"host": "127.0.0.1", "port": free_ports(1)[0]})
    gpus = 0 if check.rehearse else 0.4
    url = _deploy(serve, build_app, "batched", gpus, batch=32)
    cards = {c["id"]: f"{c.get('device')}/{c.get('dtype')}" for c in _get(url + "/v1/models")["data"]}
    gen_1 = _completion_rate(url, 1, 8)
    gen_32 = _completion_rate(url, 32, 64)
    cls_on = _classify_rate(url, 32, 256)
    serve.delete("batched")
    url = _deploy(serve, build_app, "unbatched", gpus, batch=1)
    cls_off = _classify_rate(url, 32, 256)
    serve.delete("unbatched")
    check.record("4 serve", {"gpu-gpt": cards.get("gpu-gpt"), "classifier": cards.get("bert-cls"),
                             "completion_tokens_per_s_c1": gen_1, "completion_tokens_per_s_c32": gen_32,
                             "classify_rps_c32_batched": cls_on, "classify_rps_c32_unbatched": cls_off,
                             "batching_speedup": cls_on / cls_off, "batching_goal": 3.0})


def _deploy(serve: Any, build_app: Any, name: str, gpus: float, batch: int) -> str:
    args = {"models": ["gpu-gpt", "bert-cls"], "model": {"num_gpus": gpus, "num_cpus": 1, "max_batch_size": batch}}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve.context._global_client.http_config.port}/{name}"


def _get(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=60).json()


def _completion_rate(url: str, concurrency: int, requests: int) -> float:
    body = {"model": "gpu-gpt", "prompt": "The market", "max_tokens": 64, "temperature": 0}
    answers, wall = _load(url + "/v1/completions", body, concurrency, requests)
    return sum(a["usage"]["completion_tokens"] for a in answers) / wall


def _classify_rate(url: str, concurrency: int, requests: int) -> float:
    answers, wall = _load(url + "/v1/classify", {"model": "bert-cls", "inputs": "a happy dog near the river"},
                          concurrency, requests)
    return len(answers) / wall


def _load(url: str, body: dict, concurrency: int, total: int) -> tuple[list[dict], float]:
    """`total` requests from `concurrency` clients in a closed loop: the answers and the wall time."""
    import httpx

    async def run() -> tuple[list[dict], float]:
        answers: list[dict] = []
        queue = list(range(total))
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
            async def worker() -> None:
                while queue:
                    queue.pop()
                    r = await client.post(url, json=body)
                    r.raise_for_status()
                    answers.append(r.json())

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return answers, time.perf_counter() - t0

    return asyncio.run(run())


def write_results(check: Check) -> str:
    """bench/results/gpu-check.json and BENCHMARKS.md's GPU section; a rehearsal's figures stay in its
    storage folder, never on the page."""
    path = os.path.join(check.root, "gpu-check.json") if check.rehearse else RESULTS
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(check.results, f, indent=2)
    if not check.rehearse:
        from bench.gpu_report import update_benchmarks

        update_benchmarks(check.results, os.path.join(REPO, "BENCHMARKS.md"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="steps of each throughput run")
    p.add_argument("--budget-s", type=float, default=480, help="later steps are skipped once this is spent")
    p.add_argument("--rehearse", action="store_true", help="the same steps with a tiny model on the CPU")
    args = p.parse_args(argv)
    device = "cpu (rehearsal)" if args.rehearse else require_gpu()
    if args.rehearse:
        args.steps = min(args.steps, 40)
    from cluster import runtime
    from cluster.entry import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request of the load steps
    runtime.connect()
    check = Check(args, device)
    print(f"gpu-check on {device}, storage {check.root}", flush=True)
    prepare_corpus(check)
    ddp = step_throughput(check)
    for step in (lambda: step_fsdp(check, ddp), lambda: step_resume(check), lambda: step_serve(check, ddp)):
        if check.left() < 60:
            print(f"budget spent: {check.left():.0f} s left, later steps skipped", flush=True)
            break
        step()
    print(write_results(check), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
