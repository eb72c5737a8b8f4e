"""Serve latency and throughput against baselines in the same run.

    python -m bench.serve [--requests 64] [--max-tokens 16] [--concurrency 1 8 32] [--pairs 1] [--batch-wait S]
                          [--classifier-size mini|small|124m]

For generation (tiny GPT-2) and classification (tiny BERT, or BERT with a preset's layers), at each
concurrency: p50/p99 latency and requests/s for (1) the engine called in-process (threads), (2) a
plain FastAPI + uvicorn server of the same engine in its own process, (3) Ray Serve with dynamic
batching and (4) without it, (5) Ray Serve with batching and `colocate` (each model in its own app,
inside the ingress replica); (3) and (5) alternate `--pairs` times and the table shows medians with
each run's figures.
Prints a table; timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PROMPT, TEXT = "the cat sat on the", "a happy dog near the river"


def _stats(lat: list[float], wall: float) -> dict[str, float]:
    lat = sorted(lat)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return {"p50_ms": statistics.median(lat) * 1e3, "p99_ms": p99 * 1e3, "rps": len(lat) / wall}


def bench_inprocess(fn, n: int, conc: int) -> dict[str, float]:
    def one(_):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        lat = list(pool.map(one, range(n)))
    return _stats(lat, time.perf_counter() - start)


def bench_http(url: str, body: dict, n: int, conc: int) -> dict[str, float]:
    import httpx

    async def run() -> dict[str, float]:
        sem, lat = asyncio.Semaphore(conc), []
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=conc)) as client:
            async def one():
                async with sem:
                    t = time.perf_counter()
                    r = await client.post(url, json=body)
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return _stats(lat, time.perf_counter() - start)

    return asyncio.run(run())


def plain_server(entries: dict[str, dict], port: int, max_tokens: int) -> None:
    """The baseline: the same engines behind FastAPI + uvicorn, one process, no batching."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from serve import engines

    torch.set_num_threads(1)
    gen, cls = engines.load(entries["gpt"]), engines.load(entries["cls"])
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        params = {"max_tokens": body["max_tokens"], "temperature": 0, "top_p": 1.0, "n": 1, "stop": None,
                  "seed": None}
        ids = gen.encode(body["prompt"], params["max_tokens"])
        return {"choices": (await asyncio.to_thread(gen.generate, [ids], params))[0]}

    @app.post("/v1/classify")
    async def classify(body: dict) -> dict:
        return {"results": await asyncio.to_thread(cls.classify, [body["inputs"]], [None])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _wait(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64, help="requests per cell")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--pairs", type=int, default=1,
                   help="times the batching and colocated Serve rows run, alternately (medians printed)")
    p.add_argument("--classifier-size", choices=["mini", "small", "124m"], default=None,
                   help="the classifier's layers as this cluster.train.models preset (default: serve.tiny's 2 layers "
                        "of width 32, whose compute is small next to a request's overhead)")
    p.add_argument("--batch-wait", type=float, default=None,
                   help="Serve rows' batch_wait_timeout_s (default: serve.options' default)")
    ns = p.parse_args(argv)

    import torch

    from cluster import registry, runtime
    from serve import engines, tiny

    root = tempfile.mkdtemp(prefix="raylm-bench-")
    os.environ["RAYLM_STORAGE"] = root
    os.environ.setdefault("RAYLM_DASHBOARD", "0")
    registry.publish(tiny.save_gpt(os.path.join(root, "ck-gpt")), "gpt", "generation")
    registry.publish(tiny.save_bert(os.path.join(root, "ck-cls"), "classification",
                                      size=ns.classifier_size), "cls", "classification")
    entries = {m["name"]: m for m in registry.list_models()}
    gen_body = {"model": "gpt", "prompt": PROMPT, "max_tokens": ns.max_tokens, "temperature": 0}
    cls_body = {"model": "cls", "inputs": TEXT}
    rows: list[tuple[str, str, int, dict[str, float]]] = []

    # 1. in-process
    torch.set_num_threads(1)
    gen, cls = engines.load(entries["gpt"]), engines.load(entries["cls"])
    params = {"max_tokens": ns.max_tokens, "temperature": 0, "top_p": 1.0, "n": 1, "stop": None, "seed": None}
    ids = gen.encode(PROMPT, ns.max_tokens)
    for c in ns.concurrency:
        rows.append(("generation", "in-process", c, bench_inprocess(lambda: gen.generate([ids], params), ns.requests, c)))
        rows.append(("classify", "in-process", c, bench_inprocess(lambda: cls.classify([TEXT], [None]), ns.requests, c)))

    # 2. plain FastAPI + uvicorn
    (port,) = runtime.free_ports(1)
    proc = mp.get_context("spawn").Process(target=plain_server, args=(entries, port, ns.max_tokens), daemon=True)
    proc.start()
    try:
        _wait(f"http://127.0.0.1:{port}/docs")
        for c in ns.concurrency:
            rows.append(("generation", "fastapi", c, bench_http(f"http://127.0.0.1:{port}/v1/completions", gen_body, ns.requests, c)))
            rows.append(("classify", "fastapi", c, bench_http(f"http://127.0.0.1:{port}/v1/classify", cls_body, ns.requests, c)))
    finally:
        proc.terminate()
        proc.join()

    # 3./4./5. Ray Serve: batching, colocated (batching; one app per model, the model's replica
    # is its ingress), batching off. The first two alternate `--pairs` times: this VM drifts.
    from ray import serve

    from serve.app import build_app

    runtime.connect()
    (port,) = runtime.free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    wait = {} if ns.batch_wait is None else {"batch_wait_timeout_s": ns.batch_wait}

    def two_hop(batch: int) -> dict[str, str]:
        """Both models behind one ingress; returns each model's route prefix."""
        serve.run(build_app({"model": {"num_cpus": 1, "max_batch_size": batch, **wait},
                             "ingress": {"num_cpus": 0.1}, "max_tokens": 256}), name="raylm", route_prefix="/")
        return {"gpt": "", "cls": ""}

    def colocated() -> dict[str, str]:
        for model in ("gpt", "cls"):
            serve.run(build_app({"models": [model], "colocate": True, "model": {"num_cpus": 1, **wait},
                                 "max_tokens": 256}), name=f"colo-{model}", route_prefix=f"/{model}")
        return {"gpt": "/gpt", "cls": "/cls"}

    def measure(label: str, deploy: Any) -> None:
        prefix = deploy()
        urls = {"generation": (f"{base}{prefix['gpt']}/v1/completions", gen_body),
                "classify": (f"{base}{prefix['cls']}/v1/classify", cls_body)}
        bench_http(urls["generation"][0], gen_body, 4, 1)  # warm up
        for c in ns.concurrency:
            for task, (url, body) in urls.items():
                rows.append((task, label, c, bench_http(url, body, ns.requests, c)))
        for app in serve.status().applications:
            serve.delete(app)

    for _ in range(ns.pairs):
        measure("serve", lambda: two_hop(8))
        measure("serve-colocated", colocated)
    measure("serve-nobatch", lambda: two_hop(1))
    serve.shutdown()

    cells: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for task, server, c, st in rows:
        cells.setdefault((task, c, server), []).append(st)
    print(f"\n{'task':<11} {'server':<15} {'conc':>4} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8}   (median of runs)")
    for (task, c, server), runs in sorted(cells.items()):
        med = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "rps")}
        each = "" if len(runs) == 1 else "   runs p50/req/s: " + ", ".join(
            f"{r['p50_ms']:.1f}/{r['rps']:.0f}" for r in runs)
        print(f"{task:<11} {server:<15} {c:>4} {med['p50_ms']:>9.1f} {med['p99_ms']:>9.1f} {med['rps']:>8.1f}{each}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
