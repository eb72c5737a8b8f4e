"""`ModelServer`, the Serve deployment that holds one registry model (with `multiplex`, the models
the requests name, loaded on demand) and answers the Gateway's calls in dynamic batches; and
`InProcess`, through which a Gateway calls a ModelServer in its own replica (`colocate`) the way
it calls a deployment's handle.

Each request is checked against the work budget (AppArgs: max_batch_inputs, max_request_tokens,
max_masks_per_input, max_top_k) before it joins a batch, and carries a `Deadline`
(request_timeout_s) that stops its generation between decoding steps, in a batch or a stream.
"""

import asyncio
import concurrent.futures
import inspect
import json
import logging
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

from ray import serve

from serve.schemas import (
    GREEDY_BELOW,
    SEED_MAX,
    ApiError,
    Deadline,
    check_inputs,
    check_request_tokens,
    internal_error,
)

log = logging.getLogger("raylm.serve")

# Where a batch's model call runs. Serve's health check waits on the replica's event loop (in
# throughput-optimised mode user code shares that loop), and after 3 checks in a row unanswered
# for health_check_timeout_s Serve restarts the replica and fails what it was running. So a call
# that may be long runs in a worker thread. A short one runs on the loop: in a thread it contends
# for the GIL with the loop, which is busy receiving the next requests: on the 2-core box
# gpt-tiny's 16-token generation at concurrency 32 served 98-103 requests/s this way against 65-85
# with every call in a thread (compute_in_thread, alternating runs). "Short" is predicted from
# this replica's own measured seconds per token of work (a replica's first call, with nothing
# measured yet, runs in a thread); under LOOP_BUDGET_S the loop is held for a small fraction of a
# health check's timeout, and streams pause that long.
LOOP_BUDGET_S = 0.25


def request_id() -> str:
    """The id Serve gave this request (the X-Request-Id the client gets, in the ingress's access
    log); a fresh one outside a request."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - no Serve request context here
        rid = ""
    return rid or uuid.uuid4().hex


def _error(exc: Exception) -> dict[str, Any]:
    """An error value for the Gateway: a client error as it is; anything else logged here with the
    request id and answered as a generic 500 naming that id."""
    if isinstance(exc, ApiError):
        return {"error": exc.body()["error"], "status": exc.status}
    rid = request_id()
    log.error("request %s: the model call failed", rid, exc_info=exc)
    return {"error": internal_error(rid).body()["error"], "status": 500}


def _raise_first_error(results: list[Any]) -> list[Any]:
    """A batch answers each item with its result or, for one that failed alone (its deadline
    passed), the exception: raised here, in that item's request."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


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
        self.engine = None if shared else engines.load(entry, options.get("quantize"))
        if shared:  # `multiplex`: registry entries by name; each request names one (its multiplexed model id)
            async def _load_registry_model(name: str) -> Any:
                # the loop keeps answering meanwhile
                return await asyncio.to_thread(engines.load, shared[name], options.get("quantize"))

            self._load = serve.multiplexed(max_num_models_per_replica=options["max_models_per_replica"])(
                _load_registry_model)
        self._generate_batch.set_max_batch_size(options["max_batch_size"])
        self._encode_batch.set_max_batch_size(options["max_batch_size"])
        self.configure(options)

    def configure(self, options: dict[str, Any]) -> None:
        """The request limits and the batching and compute settings, from the deployment's options."""
        self.limits = {key: options[key] for key in ("max_tokens", "max_batch_inputs", "max_request_tokens",
                                                     "max_masks_per_input", "max_top_k", "request_timeout_s")}
        self.batch_wait_s = options["batch_wait_timeout_s"]
        self.compute_in_thread = options["compute_in_thread"]
        self.slow_batch_s = options["health_check_timeout_s"]
        self.in_flight = 0  # batched requests (complete/encode calls) in this replica now
        self.rates: dict[tuple[str, str], float] = {}  # (model, call) -> seconds per token of work, measured
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="model-call")
        self.running: set[concurrent.futures.Future] = set()  # model calls in worker threads now

    async def _batched(self, fn: Any, items: list[Any]) -> list[Any]:
        """One request's `items` through `fn` (a `@serve.batch` method), one result per item.

        Serve's batcher holds a batch's first request for the whole wait; on an idle replica that
        is pure latency (nothing else is coming), so only while other requests are in the replica
        (a batch runs or just finished, and more are arriving) does a batch wait to fill. Serve
        reads the wait when a batch opens. A lone one-item request on an idle replica skips the
        batcher's queue and tasks and runs `fn`'s body itself: the same call a batch of one makes,
        ~1 ms sooner on the 2-core box (BENCHMARKS.md, Serve). Serve's batch metrics (serve_batch_*)
        count only the requests that went through the batcher."""
        self.in_flight += 1
        try:
            if len(items) == 1 and self.in_flight == 1 and not self.compute_in_thread:
                await asyncio.sleep(0)  # requests delivered with this one count themselves first
                if self.in_flight == 1:  # still alone
                    return _raise_first_error(await fn.__wrapped__(self, items))
            fn.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight > 1 else 0.0)
            return _raise_first_error(list(await asyncio.gather(*(fn(item) for item in items))))
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

    async def _tokenized(self, prompts: list[str], params: dict[str, Any]) -> tuple[Any, list[list[int]]]:
        """The engine and each prompt's tokens, once the request is within the work budget."""
        check_inputs(len(prompts), self.limits["max_batch_inputs"], "prompt")
        if params["max_tokens"] > self.limits["max_tokens"]:
            raise ApiError(400, f"max_tokens {params['max_tokens']} exceeds this server's cap of "
                           f"{self.limits['max_tokens']}", "max_tokens", "max_tokens_exceeded")
        engine = await self._engine()
        ids = [engine.encode(p, params["max_tokens"]) for p in prompts]
        check_request_tokens([len(i) for i in ids], self.limits["max_request_tokens"], params["n"],
                             params["max_tokens"])
        return engine, ids

    async def complete(self, prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        deadline = Deadline(self.limits["request_timeout_s"])
        try:
            engine, ids = await self._tokenized(prompts, params)
            results = await self._batched(self._generate_batch, [(engine, i, params, deadline) for i in ids])
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error value
            return _error(exc)
        finally:
            deadline.release()  # whatever of this request still runs in a batch stops at its next step
        choices = [c for per_prompt in results for c in per_prompt]
        return {"choices": choices, "prompt_tokens": sum(len(i) for i in ids),
                "completion_tokens": sum(c["tokens"] for c in choices)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple[Any, list[int], dict, Deadline]]) -> list[Any]:
        # Requests with the same sampling params run as one padded batch; seeded ones run alone
        # so their output does not depend on what they were batched with.
        groups: dict[str, list[int]] = {}
        for k, (_, _, params, _) in enumerate(items):
            key = f"seed-{k}" if params.get("seed") is not None else json.dumps(params, sort_keys=True)
            groups.setdefault(key, []).append(k)
        out: list[Any] = [item[3].error() if item[3].passed() else None for item in items]
        # Serve splits batches by multiplexed model id: every item carries the same model. The one
        # its request already holds, not a fresh lookup, which with multiplex could load it again.
        engine = items[0][0]
        for members in groups.values():
            live = [k for k in members if out[k] is None]
            if not live:
                continue
            prompts, params, deadlines = [items[k][1] for k in live], items[live[0]][2], [items[k][3] for k in live]
            # rows decoded: greedy decoding runs once for all n choices (engines.GenerationEngine.generate)
            rows = len(prompts) * (1 if params["temperature"] < GREEDY_BELOW else params["n"])
            width = max(len(p) for p in prompts)

            def done(results: list[Any], rows: int = rows, width: int = width) -> int | None:
                if any(r is None for r in results):
                    return None  # cut short by a deadline: how far it got is unknown
                steps = max(c["tokens"] for r in results for c in r) + 1
                return rows * (width + steps)

            results = await self._compute(("generate", engine.name), rows * (width + params["max_tokens"]), done,
                                          engine.generate, prompts, params, deadlines)
            for k, r in zip(live, results, strict=True):
                out[k] = items[k][3].error() if r is None else r
        return out

    async def stream(self, prompts: list[str], params: dict[str, Any]):
        deadline = Deadline(self.limits["request_timeout_s"])
        try:
            engine, ids = await self._tokenized(prompts, params)
        except Exception as exc:  # noqa: BLE001
            yield _error(exc)
            return
        try:
            async for item in self._stream_choices(engine, ids, params, deadline):
                yield item
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream is the stream's last item
            yield _error(exc)

    async def _stream_choices(self, engine: Any, ids: list[list[int]], params: dict[str, Any], deadline: Deadline):
        """Each prompt's `n` choices, one after another, token by token; each step runs in a worker
        thread, and a step is the last one once the deadline passed (or the client went away: the
        generator is then closed and no further step runs)."""
        n, index = params["n"], 0
        for prompt_ids in ids:
            for j in range(n):
                seed = (params["seed"] + j) % (SEED_MAX + 1) if params.get("seed") is not None else None
                tokens = engine.stream(prompt_ids, {**params, "seed": seed})
                first = True
                while True:
                    item = await asyncio.to_thread(next, tokens, None)
                    if item is None:
                        break
                    if deadline.passed():
                        yield _error(deadline.error())
                        return
                    # the prompt's tokens ride on its first chunk, once per prompt (usage counts them once)
                    yield {**item, "index": index, "first": first, "prompt_tokens": len(prompt_ids) if first and not j else 0}
                    first = False
                index += 1

    async def encode(self, items: list[tuple[str, str | None, int]]) -> dict[str, Any]:
        deadline = Deadline(self.limits["request_timeout_s"])
        try:
            check_inputs(len(items), self.limits["max_batch_inputs"], "inputs")
            top_k = max(k for _, _, k in items)
            if top_k > self.limits["max_top_k"]:
                raise ApiError(400, f"top_k {top_k} exceeds this server's cap of {self.limits['max_top_k']} "
                               "(max_top_k)", "top_k", "top_k_exceeded")
            engine = await self._engine()
            lengths = engine.validate([t for t, _, _ in items], [p for _, p, _ in items],
                                      self.limits["max_masks_per_input"])
            check_request_tokens(lengths, self.limits["max_request_tokens"], param="inputs")
            batch = [(engine, *item, n, deadline) for item, n in zip(items, lengths, strict=True)]
            results = await self._batched(self._encode_batch, batch)
        except Exception as exc:  # noqa: BLE001
            return _error(exc)
        finally:
            deadline.release()
        return {"results": results}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, items: list[tuple[Any, str, str | None, int, int, Deadline]]) -> list[Any]:
        engine = items[0][0]  # one model per batch (see _generate_batch)
        out: list[Any] = [item[5].error() if item[5].passed() else None for item in items]
        live = [k for k in range(len(items)) if out[k] is None]
        if not live:
            return out
        texts, pairs = [items[k][1] for k in live], [items[k][2] for k in live]
        call: tuple[Callable, tuple] = {"fill-mask": (engine.fill_mask, (texts, [items[k][3] for k in live])),
                                        "classification": (engine.classify, (texts, pairs))}.get(
                                            engine.task, (engine.tag, (texts,)))
        work = len(live) * max(items[k][4] for k in live)  # the padded batch's tokens
        for k, result in zip(live, await self._compute(("encode", engine.name), work, None, call[0], *call[1]),
                             strict=True):
            out[k] = result
        return out

    async def _compute(self, key: tuple[str, str], work: int, done: Callable[[Any], int | None] | None,
                       fn: Callable, *args: Any) -> Any:
        """One batch's model call, `work` tokens at most: on the event loop when it is predicted to
        take under LOOP_BUDGET_S, else in a worker thread (see LOOP_BUDGET_S); `done(result)` is
        the work it did, which teaches the prediction. Never on the loop while a worker thread
        computes: the loop would wait there for the model's lock."""
        rate = self.rates.get(key)
        self.running = {f for f in self.running if not f.done()}
        on_loop = not (self.compute_in_thread or self.running or rate is None or rate * work >= LOOP_BUDGET_S)
        start = time.perf_counter()
        if on_loop:
            result = fn(*args)
        else:
            future = self.pool.submit(fn, *args)
            self.running.add(future)
            result = await asyncio.wrap_future(future)
        took = time.perf_counter() - start
        measured = done(result) if done else work
        if measured:  # the slower of a new measurement and the old is believed at once, a faster one slowly
            sample = took / measured
            self.rates[key] = sample if rate is None or sample > rate else 0.8 * rate + 0.2 * sample
        if on_loop and took > self.slow_batch_s:
            log.warning("a batch computed for %.1f s on the event loop, longer than health_check_timeout_s (%.1f s): "
                        "Serve restarts a replica after 3 unanswered health checks in a row; set "
                        "compute_in_thread: true for this model", took, self.slow_batch_s)
        return result
