"""`ModelServer`, the Serve deployment that holds one registry model (with `multiplex`, the models
the requests name, loaded on demand) and answers the Gateway's calls in dynamic batches; and
`InProcess`, through which a Gateway calls a ModelServer in its own replica (`colocate`) the way
it calls a deployment's handle.
"""

import asyncio
import inspect
import json
import logging
import time
import types
from collections.abc import Callable
from typing import Any

from ray import serve

from serve.schemas import ApiError, error_body

log = logging.getLogger("raylm.serve")


class InProcess:
    """A model server in the ingress's own process, called the way the Gateway calls a
    `DeploymentHandle`: `.complete.remote(...)` gives an awaitable with `cancel()`,
    `.options(stream=True).stream.remote(...)` an async generator."""

    def __init__(self, server: Any):
        self.server = server

    def options(self, stream: bool = False) -> "InProcess":
        return self

    def __getattr__(self, method: str) -> Any:
        fn = getattr(self.server, method)

        def remote(*args: Any) -> Any:
            out = fn(*args)
            return out if inspect.isasyncgen(out) else asyncio.ensure_future(out)

        return types.SimpleNamespace(remote=remote)


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"error": exc.body()["error"], "status": exc.status}
    log.exception("model call failed")
    return {"error": error_body(500, f"model error: {type(exc).__name__}: {exc}")["error"], "status": 500}


@serve.deployment
class ModelServer:
    """One registry model, or with `shared` (`multiplex`) the models a request names, loaded on
    demand. Each request's inputs are validated alone, then joined with other requests' for the
    same model into dynamic batches (`@serve.batch`); errors come back as values, never raised."""

    def __init__(self, entry: dict[str, Any] | None, options: dict[str, Any],
                 shared: dict[str, dict[str, Any]] | None = None):
        import torch

        from serve import engines

        torch.set_num_threads(max(1, round(options["num_cpus"])))
        self.engine = None if shared else engines.load(entry)
        if shared:  # `multiplex`: registry entries by name; each request names one (its multiplexed model id)
            async def _load_registry_model(name: str) -> Any:
                return await asyncio.to_thread(engines.load, shared[name])  # the loop keeps answering meanwhile

            self._load = serve.multiplexed(max_num_models_per_replica=options["max_models_per_replica"])(
                _load_registry_model)
        self.max_tokens = options["max_tokens"]
        self._generate_batch.set_max_batch_size(options["max_batch_size"])
        self._encode_batch.set_max_batch_size(options["max_batch_size"])
        self.batch_wait_s = options["batch_wait_timeout_s"]
        self.compute_in_thread = options["compute_in_thread"]
        self.slow_batch_s = options["health_check_timeout_s"]
        self.in_flight = 0  # batched requests (complete/encode calls) in this replica now

    async def _batched(self, fn: Any, items: list[Any]) -> list[Any]:
        """One request's `items` through `fn` (a `@serve.batch` method), one result per item.

        Serve's batcher holds a batch's first request for the whole wait; on an idle replica that
        is pure latency (nothing else is coming), so only while other requests are in the replica
        (a batch runs or just finished, and more are arriving) does a batch wait to fill. Serve
        reads the wait when a batch opens. A lone one-item request on an idle replica skips the
        batcher's queue and tasks and runs `fn`'s body on the event loop itself: the same call a
        batch of one makes, ~1 ms sooner on the 2-core box (BENCHMARKS.md, Serve). Serve's batch
        metrics (serve_batch_*) count only the requests that went through the batcher."""
        self.in_flight += 1
        try:
            if len(items) == 1 and self.in_flight == 1 and not self.compute_in_thread:
                await asyncio.sleep(0)  # requests delivered with this one count themselves first
                if self.in_flight == 1:  # still alone; compute blocks the loop, so no batch can open meanwhile
                    return await fn.__wrapped__(self, items)
            fn.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight > 1 else 0.0)
            return list(await asyncio.gather(*(fn(item) for item in items)))
        finally:
            self.in_flight -= 1

    async def _engine(self) -> Any:
        """This replica's model; with `multiplex`, the one the request names, loaded on first use,
        the least recently used unloaded to make room. A request passes it on to its batch."""
        if self.engine is not None:
            return self.engine
        return await self._load(serve.get_multiplexed_model_id())

    async def placement(self) -> dict[str, str]:
        """Where this replica runs its model (multiplexed: any model it loads), for /v1/models."""
        from cluster.train.placement import inference_placement
        from serve import engines

        if self.engine is not None:
            return self.engine.placement()
        return engines.describe(*inference_placement())

    def _check_params(self, params: dict[str, Any]) -> None:
        if params["max_tokens"] > self.max_tokens:
            raise ApiError(400, f"max_tokens {params['max_tokens']} exceeds this server's cap of {self.max_tokens}",
                           "max_tokens", "max_tokens_exceeded")

    async def complete(self, prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        try:
            self._check_params(params)
            engine = await self._engine()
            ids = [engine.encode(p, params["max_tokens"]) for p in prompts]
            results = await self._batched(self._generate_batch, [(engine, i, params) for i in ids])
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error value
            return _error(exc)
        choices = [c for per_prompt in results for c in per_prompt]
        return {"choices": choices, "prompt_tokens": sum(len(i) for i in ids),
                "completion_tokens": sum(c["tokens"] for c in choices)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple[Any, list[int], dict]]) -> list[list[dict]]:
        # Requests with the same sampling params run as one padded batch; seeded ones run alone
        # so their output does not depend on what they were batched with.
        groups: dict[str, list[int]] = {}
        for k, (_, _, params) in enumerate(items):
            key = f"seed-{k}" if params.get("seed") is not None else json.dumps(params, sort_keys=True)
            groups.setdefault(key, []).append(k)
        out: list[Any] = [None] * len(items)
        # Serve splits batches by multiplexed model id: every item carries the same model. The one
        # its request already holds, not a fresh lookup, which with multiplex could load it again.
        engine = items[0][0]
        for members in groups.values():
            params = items[members[0]][2]
            results = await self._compute(engine.generate, [items[k][1] for k in members], params)
            for k, r in zip(members, results, strict=False):
                out[k] = r
        return out

    async def stream(self, prompts: list[str], params: dict[str, Any]):
        try:
            self._check_params(params)
            engine = await self._engine()
            ids = [engine.encode(p, params["max_tokens"]) for p in prompts]
        except Exception as exc:  # noqa: BLE001
            yield _error(exc)
            return
        n, index = params["n"], 0
        for prompt_ids in ids:
            for j in range(n):
                seed = params["seed"] + j if params.get("seed") is not None else None
                tokens = engine.stream(prompt_ids, {**params, "seed": seed})
                first = True
                while True:
                    item = await asyncio.to_thread(next, tokens, None)
                    if item is None:
                        break
                    # the prompt's tokens ride on its first chunk, once per prompt (usage counts them once)
                    yield {**item, "index": index, "first": first, "prompt_tokens": len(prompt_ids) if first and not j else 0}
                    first = False
                index += 1

    async def encode(self, items: list[tuple[str, str | None, int]]) -> dict[str, Any]:
        try:
            engine = await self._engine()
            engine.validate([t for t, _, _ in items], [p for _, p, _ in items])
            results = await self._batched(self._encode_batch, [(engine, *item) for item in items])
        except Exception as exc:  # noqa: BLE001
            return _error(exc)
        return {"results": results}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, items: list[tuple[Any, str, str | None, int]]) -> list[Any]:
        engine = items[0][0]  # one model per batch (see _generate_batch)
        texts, pairs, top_k = [t for _, t, _, _ in items], [p for _, _, p, _ in items], [k for _, _, _, k in items]
        if engine.task == "fill-mask":
            return await self._compute(engine.fill_mask, texts, top_k)
        if engine.task == "classification":
            return await self._compute(engine.classify, texts, pairs)
        return await self._compute(engine.tag, texts)

    async def _compute(self, fn: Callable, *args: Any) -> Any:
        """One batch's model call: on the event loop, or in a worker thread with `compute_in_thread`.
        On the loop, requests that arrive meanwhile wait in Ray's queues and join the next batch."""
        if self.compute_in_thread:
            return await asyncio.to_thread(fn, *args)
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            took = time.perf_counter() - start
            if took > self.slow_batch_s:
                log.warning("a batch computed for %.1f s on the event loop, longer than health_check_timeout_s "
                            "(%.1f s): Serve restarts a replica after 3 unanswered health checks in a row; "
                            "set compute_in_thread: true for this model", took, self.slow_batch_s)
