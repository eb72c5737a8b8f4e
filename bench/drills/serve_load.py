"""Serving under load: a bounded closed-loop load on loopback against the generation and
classification endpoints (errors, p50/p99 latency), then the same load while one replica of the
model is killed (failed requests, time until two replicas serve again)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import httpx

from bench.drills.common import Finding
from cluster.runtime import free_ports

BODIES = {
    "generation": ("/v1/completions", {"model": "gpt-tiny", "prompt": "the cat sat", "max_tokens": 8,
                                       "temperature": 0}),
    "classification": ("/v1/classify", {"model": "bert-cls", "inputs": "a good day in Paris"}),
}


def deploy(registry: str, name: str, args: dict[str, Any], port: int | None = None) -> str:
    """Serve the registry's tiny models as application `name`; returns its base URL."""
    from ray import serve

    from serve.app import build_app

    port = port or free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"registry": registry, **args}), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve.context._global_client.http_config.port}/{name}"


async def _load(url: str, path: str, body: dict, total: int, concurrency: int,
                statuses: list[int] | None = None) -> tuple[list[float], list[int]]:
    """Closed loop: `concurrency` clients send `total` requests in all; (latencies s, statuses).
    `statuses` fills as answers arrive, so another thread can watch progress."""
    latencies: list[float] = []
    statuses = [] if statuses is None else statuses
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent
            while sent < total:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)  # no answer at all counts as a failure too
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def steady(url: str, task: str, total: int, concurrency: int) -> list[Finding]:
    path, body = BODIES[task]
    t0 = time.perf_counter()
    lat, statuses = asyncio.run(_load(url, path, body, total, concurrency))
    wall = time.perf_counter() - t0
    errors = sum(s != 200 for s in statuses)
    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
    return [Finding(f"load: {task}, {total} requests at concurrency {concurrency}",
                    f"{errors} errors; p50 {p50:.0f} ms, p99 {p99:.0f} ms, {total / wall:.0f} req/s", "0 errors",
                    errors == 0, {"errors": errors, "p50_ms": p50, "p99_ms": p99, "rps": total / wall})]


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def replica_kill(url: str, app: str, deployment: str, task: str, total: int, concurrency: int) -> list[Finding]:
    """The same load while one of two replicas is killed a third of the way in."""
    import ray

    path, body = BODIES[task]
    statuses: list[int] = []
    killed: dict[str, Any] = {}

    def kill_one() -> None:
        try:
            while len(statuses) < total // 3:
                time.sleep(0.05)
            # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id> (no dashboard needed)
            prefix = f"SERVE_REPLICA::{app}#{deployment}#"
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
            handle = ray.get_actor(names[0], namespace="serve")
            killed["at"] = time.perf_counter()
            ray.kill(handle, no_restart=True)  # as if its process died: Serve's controller must replace it

            def replaced() -> bool:  # a new replica, not the killed one, and two of them running
                now = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}
                return names[0] not in now and bool(now - set(names)) and _running_replicas(app, deployment) >= 2

            while not replaced() and time.perf_counter() - killed["at"] < 120:
                time.sleep(0.2)
            killed["back"] = time.perf_counter()
        except Exception as exc:  # reported as a failed drill, never as a quiet pass
            killed["error"] = f"{type(exc).__name__}: {exc}"

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    t0 = time.perf_counter()
    asyncio.run(_load(url, path, body, total, concurrency, statuses))
    killer.join(timeout=180)
    wall = time.perf_counter() - t0
    failed = sum(s != 200 for s in statuses)
    if "at" not in killed:
        return [Finding(f"replica killed under load: {task}", f"no replica was killed: {killed.get('error')}",
                        "a replica killed", False)]
    recovery = killed.get("back", float("inf")) - killed["at"]
    return [
        Finding(f"replica killed under load: {task}", f"{failed} of {total} requests failed "
                f"({100 * failed / total:.2f}%)", "<= 1%", failed <= 0.01 * total,
                {"failed": failed, "statuses": sorted(set(statuses)), "seconds": wall, **killed}),
        Finding(f"replica killed under load: {task}", f"capacity back (2 replicas running) {recovery:.1f} s after "
                "the kill", "<= 15 s", recovery <= 15, {"recovery_s": recovery}),
    ]


def run(registry: str, total: int = 5000, concurrency: int = 32) -> list[Finding]:
    """Both endpoints, steady and with a replica killed; models from serve.tiny in `registry`."""
    from ray import serve

    findings: list[Finding] = []
    args = {"model": {"num_cpus": 0.25, "num_replicas": 2, "max_batch_size": 16, "max_ongoing_requests": 64},
            "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 512}}
    url = deploy(registry, "load", {**args, "models": ["gpt-tiny", "bert-cls"]})
    for task, deployment in (("generation", "model-gpt-tiny"), ("classification", "model-bert-cls")):
        findings += steady(url, task, total, concurrency)
        findings += replica_kill(url, "load", deployment, task, total, concurrency)
    serve.delete("load")
    return findings
