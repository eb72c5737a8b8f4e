"""The Ray Serve application: a FastAPI ingress (`Gateway`) in front of one deployment per
registry model (`ModelServer`), built by `build_app(AppArgs)`. With `colocate` the one served
model runs inside the ingress's replicas instead, one hop less per request; with `multiplex`
some models share one deployment whose replicas load them on demand (`serve.multiplexed`).

    serve run serve.app:app                               # every model in $RAYLM_STORAGE/registry
    serve run serve.app:build_app registry=/path/to/registry
    serve deploy serve/config.yaml                        # autoscaling and batching from YAML

Deployment defaults live in `DEFAULTS`; YAML/CLI args are merged over them. No
`from __future__ import annotations` here: Serve reads `build_app`'s annotation to validate args.
"""

import asyncio
import hmac
import inspect
import json
import logging
import os
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import registry, storage
from cluster.config import NameList, Section, build, deep_merge
from serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    FillMaskRequest,
    FillMaskResponse,
    ModelList,
    TagRequest,
    TagResponse,
    TextPair,
    as_list,
    error_body,
    validation_message,
)

log = logging.getLogger("raylm.serve")
API_KEY_ENV = "RAYLM_API_KEY"
REPLICA_DEATH_RETRIES = 1  # a request whose replica died goes to another one this many times
MULTIPLEXED = "multiplexed"  # the deployment that the `multiplex` models share

# Every default in one place; `AppArgs` merges user args (YAML `args:` or `serve run k=v`) over it.
DEFAULTS: dict[str, Any] = {
    "ingress": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 256, "access_log": True},
    "model": {
        "num_replicas": 1, "autoscaling": None, "num_cpus": 1.0, "num_gpus": 0.0,
        "max_ongoing_requests": 32, "max_queued_requests": -1,
        "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "compute_in_thread": False,
        "access_log": False,
    },
    "per_model": {},
    "request_timeout_s": 60.0,
    "max_body_bytes": 1_000_000,
    "max_tokens": 512,
}


class AutoscalingOptions(Section):
    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(2, ge=1, description="replicas at most")
    target_ongoing_requests: float = Field(2.0, gt=0, description="in-flight requests per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0, description="sustained load before adding replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="sustained idleness before removing replicas")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report load")
    look_back_period_s: float = Field(30.0, gt=0, description="window the load is averaged over")

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentOptions(Section):
    num_replicas: int | None = Field(1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: AutoscalingOptions | None = Field(None, description="replica autoscaling; null = fixed")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(-1, ge=-1, description="queued requests per caller before 503; -1 = unbounded")
    max_batch_size: int = Field(8, ge=1, description="dynamic batch size (1 = batching off)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="while other requests are in the replica, a new "
                                        "batch waits this long to fill; a request to an idle replica starts at once")
    # A batch's model call runs on the replica's event loop by default. In a worker thread it
    # contends for the GIL with the loop, which is busy receiving the next requests: on the 2-core
    # box `bench.serve`'s generation at concurrency 32 ran at half the rate that way (the model call
    # took 30 ms instead of 16 and batches stayed small). Serve runs sync methods on the loop too.
    # In throughput-optimised mode Serve's health check waits on that loop as well: a replica is
    # restarted after 3 unanswered checks in a row, so a batch that computes for longer than
    # ~3 x health_check_timeout_s needs the thread (the replica warns when one takes over 1x).
    compute_in_thread: bool = Field(False, description="run each batch's model call in a worker thread so the "
                                    "replica keeps receiving requests and streaming meanwhile (long GPU batches); "
                                    "off: the call runs on the event loop, without GIL contention")
    # Serve learns that a replica's process died only from a failed health check, so this period
    # is the wait before a replacement starts (Ray's default: 10 s). A check is one no-op actor
    # call: at 0.5 s the drill's replacement starts ~0.6 s after the kill instead of ~2.2 s at 2 s.
    health_check_period_s: float = Field(0.5, gt=0, description="how often Serve checks a replica; a dead "
                                         "replica's replacement starts at the next check")
    health_check_timeout_s: float = Field(10.0, gt=0, description="an unanswered health check after this "
                                          "long marks the replica unhealthy")
    # Serve's access log is a line per call in the replica's log file. The ingress's lines already
    # record every HTTP request (method, route, status, latency, request id); a model replica's
    # "CALL encode OK" repeats each of them. Without it the 2-core box served classification at
    # concurrency 32 ~12% faster, generation the same (BENCHMARKS.md, Serve). Off for model deployments by default.
    access_log: bool = Field(True, description="Serve's access log line per request in this deployment's replica "
                             "logs (default: on for the ingress, off for model deployments; with `colocate`, "
                             "ingress.access_log applies)")

    def serve_options(self, env: dict[str, str] | None = None, access_log: bool | None = None) -> dict[str, Any]:
        """Ray Serve deployment options; `access_log` overrides the field (a colocated model's
        replicas are the ingress and log as the ingress does)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if env:
            actor["runtime_env"] = {"env_vars": env}
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests,
                                "max_queued_requests": self.max_queued_requests,
                                "health_check_period_s": self.health_check_period_s,
                                "health_check_timeout_s": self.health_check_timeout_s,
                                "logging_config": {"enable_access_log":
                                                   self.access_log if access_log is None else access_log}}
        if self.autoscaling:
            opts["autoscaling_config"] = self.autoscaling.to_dict()
            opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class MultiplexOptions(Section):
    models: NameList = Field(..., min_length=1, description="registry models that share one deployment, a list or "
                             "comma-separated; each replica loads the ones it is asked for")
    max_models_per_replica: int = Field(3, ge=1, description="models a replica keeps loaded; asked for another, it "
                                        "unloads the least recently used")
    options: dict[str, Any] = Field(default_factory=dict, description="overrides of `model` for the shared deployment "
                                    f"('{MULTIPLEXED}')")


class AppArgs(Section):
    registry: str | None = Field(None, description="registry root (default: $RAYLM_STORAGE/registry)")
    models: NameList | None = Field(None, description="registry names to serve, a list or comma-separated "
                                    "(default: all)")
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**DEFAULTS["ingress"]))
    model: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**DEFAULTS["model"]),
                                     description="options of every model deployment")
    per_model: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                 description="per-model overrides of `model`, by name")
    request_timeout_s: float = Field(60.0, gt=0, description="a model call taking longer answers 504")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies answer 413")
    max_tokens: int = Field(512, ge=1, description="cap on max_tokens per request")
    # Each hop is a Ray actor call. On the 2-core box colocating took 3-7 ms off a request at
    # concurrency 1 and raised classification's throughput under load ~22%; generation's under load
    # moved little, as the ingress's parsing then shares the model's event loop (BENCHMARKS.md, Serve).
    colocate: bool = Field(False, description="serve the one selected model inside the ingress replicas (one "
                           "deployment, one hop less per request); `model`/`per_model` options then size those "
                           "replicas and `ingress` is unused; needs exactly one model")
    # Many small fine-tuned models need not each hold a replica (one CPU by default) all the time:
    # Serve routes a request to a replica that has its model loaded when there is one.
    multiplex: MultiplexOptions | None = Field(None, description="serve these models from one deployment whose "
                                               "replicas load them on demand (serve.multiplexed) instead of one "
                                               "deployment each")

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        return deep_merge(DEFAULTS, data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _multiplex_fits(self) -> "AppArgs":
        if self.multiplex is None:
            return self
        if self.colocate:
            raise ValueError("colocate serves one model inside the ingress; it cannot be combined with multiplex")
        sized = sorted(set(self.per_model) & set(self.multiplex.models))
        if sized:
            raise ValueError(f"per_model {sized}: multiplexed models share one deployment; size it with "
                             "multiplex.options")
        self.shared_options()  # its overrides are valid DeploymentOptions
        return self

    def multiplexed(self) -> set[str]:
        return set(self.multiplex.models) if self.multiplex else set()

    def shared_options(self) -> DeploymentOptions:
        """The options of the deployment the `multiplex` models share."""
        assert self.multiplex is not None
        merged = deep_merge(self.model.to_dict(), self.multiplex.options)
        return build(DeploymentOptions, merged, source="multiplex.options")

    def options_for(self, name: str) -> DeploymentOptions:
        merged = deep_merge(self.model.to_dict(), self.per_model.get(name, {}))
        return build(DeploymentOptions, merged, source=f"per_model.{name}")

    def model_runtime(self, name: str | None) -> dict[str, Any]:
        """What a `ModelServer` for model `name` (None: the `multiplex` models' shared one) is built
        with: its options, the token cap, and how many models a shared replica keeps loaded."""
        if name is None:
            assert self.multiplex is not None
            return {**self.shared_options().to_dict(), "max_tokens": self.max_tokens,
                    "max_models_per_replica": self.multiplex.max_models_per_replica}
        return {**self.options_for(name).to_dict(), "max_tokens": self.max_tokens}

    def colocated_model(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The registry entry served inside the ingress with `colocate`, else None."""
        if not self.colocate:
            return None
        if len(entries) != 1:
            names = ", ".join(e["name"] for e in entries) or "none"
            raise registry.RegistryError(f"colocate serves exactly one model, but {len(entries)} are selected "
                                         f"({names}): choose one with models=[NAME]")
        return entries[0]


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


fastapi_app = FastAPI(
    title="raylm",
    description="OpenAI-compatible completions and encoder task endpoints for raylm registry models.",
    version="0.1.0",
)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 503, 504)
}


class Guard:
    """ASGI middleware: API key (all routes but /healthz) and request body size (Content-Length
    and the bytes actually received), before FastAPI parses anything."""

    def __init__(self, app: Any, state: Any):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = getattr(self.state, "limits", {})
        headers = dict(scope.get("headers") or [])
        key = limits.get("api_key")
        if key and not scope["path"].rstrip("/").endswith("/healthz"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return await _reply(scope, receive, send, 401, "missing or wrong API key (Authorization: Bearer ...)",
                                    code="invalid_api_key")
        max_body = limits.get("max_body_bytes")
        if not max_body or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _reply(scope, receive, send, 400, "Content-Length is not a number")
        too_big = f"request body is larger than the {max_body}-byte limit"
        if declared > max_body:
            return await _reply(scope, receive, send, 413, too_big, code="body_too_large")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > max_body:
                return await _reply(scope, receive, send, 413, too_big, code="body_too_large")
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(scope, receive, send, status: int, message: str, code: str | None = None) -> None:
    await JSONResponse(error_body(status, message, code=code), status_code=status)(scope, receive, send)


fastapi_app.add_middleware(Guard, state=fastapi_app.state)


@fastapi_app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(error_body(422, "request body is not valid JSON", code="invalid_json"), status_code=422)
    message, param = validation_message(errors)
    return JSONResponse(error_body(422, message, param, "invalid_value"), status_code=422)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


def _raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        err = result["error"]
        raise ApiError(result["status"], err["message"], err.get("param"), err.get("code"))
    return result


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# Helpers the deployments use are defined above them: `serve.ingress` captures the class's
# globals when it decorates it.
async def _await(response: Any) -> Any:
    return await response


def _busy(exc: BackPressureError) -> ApiError:
    """A model deployment whose queue is full (max_queued_requests) answers 429 with Retry-After,
    which the openai client and most HTTP clients honour; the replica itself is unaffected."""
    retry = exc.retry_after_s or 1
    return ApiError(429, f"model is at capacity, retry in {retry:g} s ({exc.message})", code="rate_limit_exceeded",
                    headers={"Retry-After": f"{retry:g}"})


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


@serve.deployment
@serve.ingress(fastapi_app)
class Gateway:
    """Routes requests to the model named in the body; owns auth, limits and the error shape."""

    def __init__(self, handles: dict[str, DeploymentHandle], cards: dict[str, dict], limits: dict[str, Any],
                 colocated: tuple[dict[str, Any], dict[str, Any]] | None = None,
                 shared: DeploymentHandle | None = None, shared_models: tuple[str, ...] = ()):
        self.handles, self.cards, self.limits = dict(handles), cards, limits
        if colocated:  # (registry entry, model options): the model lives in this replica
            entry, options = colocated
            self.handles = {entry["name"]: InProcess(ModelServer.func_or_class(entry, options))}
        for name in shared_models:  # `multiplex`: Serve routes by model id to a replica that has it loaded
            self.handles[name] = shared.options(multiplexed_model_id=name)
        # Read at replica start: `build_app` forwards the key through runtime_env env_vars.
        fastapi_app.state.limits = {**limits, "api_key": os.environ.get(API_KEY_ENV) or None}

    def _handle(self, model: str, task: str) -> DeploymentHandle:
        if model not in self.handles:
            known = ", ".join(sorted(self.handles)) or "none"
            raise ApiError(404, f"model '{model}' does not exist (served: {known})", "model", "model_not_found")
        if self.cards[model]["task"] != task:
            raise ApiError(400, f"model '{model}' serves '{self.cards[model]['task']}', not '{task}'",
                           "model", "wrong_task")
        return self.handles[model]

    async def _call(self, call: Callable[[], Any]) -> dict[str, Any]:
        """Send `call()` to a model replica. A replica that dies under a request (its process
        killed, its node lost) is not the client's fault: the request goes once more to a live
        replica instead of answering 500."""
        for attempt in range(REPLICA_DEATH_RETRIES + 1):
            response = call()
            try:
                result = await asyncio.wait_for(_await(response), timeout=self.limits["request_timeout_s"])
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"model did not answer within {self.limits['request_timeout_s']} s",
                               code="timeout") from None
            except BackPressureError as exc:
                raise _busy(exc) from None
            except (ActorDiedError, ActorUnavailableError):
                if attempt == REPLICA_DEATH_RETRIES:
                    raise ApiError(503, "the model's replica died while answering; retry", code="replica_died",
                                   headers={"Retry-After": "1"}) from None
                log.warning("a replica died under a request; sending it to another replica")
                continue
            return _raise_if_error(result)
        raise AssertionError("unreachable")

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": list(self.cards.values())}

    @fastapi_app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, req: CompletionRequest) -> Any:
        handle = self._handle(req.model, "generation")
        prompts = req.prompts()
        if req.stream:
            return await self._stream(handle, prompts, req, chat=False)
        out = await self._call(lambda: handle.complete.remote(prompts, req.sampling()))
        choices = [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                   for i, c in enumerate(out["choices"])]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": _usage(out["prompt_tokens"], out["completion_tokens"])}

    @fastapi_app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, req: ChatCompletionRequest) -> Any:
        handle = self._handle(req.model, "generation")
        prompt = req.prompt()
        params = {**req.sampling(), "stop": (req.stop or []) + ["\nUser:"]}
        if req.stream:
            return await self._stream(handle, [prompt], req, chat=True, params=params)
        out = await self._call(lambda: handle.complete.remote([prompt], params))
        choices = [{"index": i, "message": {"role": "assistant", "content": c["text"].strip()},
                    "finish_reason": c["finish_reason"]} for i, c in enumerate(out["choices"])]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": _usage(out["prompt_tokens"], out["completion_tokens"])}

    async def _stream(self, handle: DeploymentHandle, prompts: list[str], req: Any, chat: bool,
                      params: dict | None = None) -> StreamingResponse:
        for attempt in range(REPLICA_DEATH_RETRIES + 1):
            gen = handle.options(stream=True).stream.remote(prompts, params or req.sampling())
            try:
                first = _raise_if_error(await gen.__anext__())  # a bad request fails before the 200 is sent
                break
            except BackPressureError as exc:
                raise _busy(exc) from None
            except (ActorDiedError, ActorUnavailableError):  # nothing was sent yet: try another replica
                if attempt == REPLICA_DEATH_RETRIES:
                    raise ApiError(503, "the model's replica died while answering; retry", code="replica_died",
                                   headers={"Retry-After": "1"}) from None
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def chunk(item: dict[str, Any]) -> str:
            if chat:
                delta = {"content": item["text"]} if item["text"] or not item["finish_reason"] else {}
                if item.get("first"):
                    delta["role"] = "assistant"
                choice = {"index": item["index"], "delta": delta, "finish_reason": item["finish_reason"]}
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [choice]}
            else:
                choice = {"index": item["index"], "text": item["text"], "finish_reason": item["finish_reason"],
                          "logprobs": None}
                body = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            # usage: prompt tokens once per prompt, completion tokens as each choice's last count
            prompt_tokens, completion = first.get("prompt_tokens", 0), {first["index"]: first["tokens"]}
            yield chunk(first)
            failed = False
            try:
                async for item in gen:
                    if "error" in item:
                        yield f"data: {json.dumps({'error': item['error']})}\n\n"
                        failed = True
                        break
                    prompt_tokens += item.get("prompt_tokens", 0)
                    completion[item["index"]] = item["tokens"]
                    yield chunk(item)
                if include_usage and not failed:  # OpenAI's stream_options.include_usage: a last chunk
                    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": req.model, "choices": [],
                            "usage": _usage(prompt_tokens, sum(completion.values()))}
                    yield f"data: {json.dumps(body)}\n\n"
            finally:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @fastapi_app.post("/v1/fill-mask", response_model=FillMaskResponse, responses=ERRORS)
    async def fill_mask(self, req: FillMaskRequest) -> dict[str, Any]:
        handle = self._handle(req.model, "fill-mask")
        items = [(t, None, req.top_k) for t in as_list(req.inputs)]
        out = await self._call(lambda: handle.encode.remote(items))
        return {"model": req.model, "results": out["results"]}

    @fastapi_app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(self, req: ClassifyRequest) -> dict[str, Any]:
        handle = self._handle(req.model, "classification")
        items = [(x.text, x.text_pair, 0) if isinstance(x, TextPair) else (x, None, 0) for x in as_list(req.inputs)]
        out = await self._call(lambda: handle.encode.remote(items))
        return {"model": req.model, "results": out["results"]}

    @fastapi_app.post("/v1/tag", response_model=TagResponse, responses=ERRORS)
    async def tag(self, req: TagRequest) -> dict[str, Any]:
        handle = self._handle(req.model, "tagging")
        out = await self._call(lambda: handle.encode.remote([(t, None, 0) for t in as_list(req.inputs)]))
        return {"model": req.model, "results": out["results"]}


def _card(entry: dict[str, Any]) -> dict[str, Any]:
    created = entry.get("created")
    try:
        import datetime as dt

        ts = int(dt.datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        ts = 0
    return {"id": entry["name"], "object": "model", "created": ts, "owned_by": "raylm",
            "task": entry["task"], "labels": entry.get("labels")}


def select_models(args: AppArgs) -> list[dict[str, Any]]:
    entries = registry.list_models(args.registry)
    if args.models is not None:
        by_name = {e["name"]: e for e in entries}
        missing = [m for m in args.models if m not in by_name]
        if missing:
            raise registry.RegistryError(
                f"models {missing} are not in registry '{registry.registry_root(args.registry)}' "
                f"(published: {', '.join(by_name) or 'none'})"
            )
        entries = [by_name[m] for m in args.models]
    for entry in entries:  # fail fast, naming the model, instead of replicas failing to start
        if not storage.is_uri(entry["path"]):
            registry.check_weights(entry["path"], entry.get("weights_sha256"), what=f"registry model '{entry['name']}'")
    unknown = sorted(set(args.per_model) - {e["name"] for e in entries})
    if unknown:
        raise registry.RegistryError(f"per_model names {unknown} are not among the served models")
    unknown = sorted(args.multiplexed() - {e["name"] for e in entries})
    if unknown:
        raise registry.RegistryError(f"multiplex.models {unknown} are not among the served models "
                                     f"({', '.join(e['name'] for e in entries) or 'none'})")
    return entries


def deployment_name(model: str) -> str:
    return f"model-{model}"


def start_reservations(args: AppArgs, entries: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(deployment, CPUs, GPUs) that each deployment's replicas reserve when the app starts: a
    fixed count, or an autoscaled deployment's min_replicas (Serve's initial count)."""
    def reserve(name: str, opts: DeploymentOptions) -> tuple[str, float, float]:
        n = opts.autoscaling.min_replicas if opts.autoscaling else (opts.num_replicas or 1)
        return name, n * opts.num_cpus, n * opts.num_gpus

    colocated = args.colocated_model(entries)
    if colocated:
        return [reserve(deployment_name(colocated["name"]), args.options_for(colocated["name"]))]
    shared = [reserve(MULTIPLEXED, args.shared_options())] if args.multiplex else []
    return [reserve("Gateway", args.ingress)] + [
        reserve(deployment_name(e["name"]), args.options_for(e["name"])) for e in entries
        if e["name"] not in args.multiplexed()] + shared


def resource_shortfall(args: AppArgs, entries: list[dict[str, Any]], cluster: dict[str, float]) -> str | None:
    """Why the app's replicas cannot all start on a cluster with `cluster` resources (Serve would
    wait for them without a word), or None when they fit."""
    parts = start_reservations(args, entries)
    for key, column in (("CPU", 1), ("GPU", 2)):
        need, have = sum(p[column] for p in parts), cluster.get(key, 0.0)
        if need > have + 1e-9:
            each = ", ".join(f"{p[0]} {p[column]:g}" for p in parts if p[column])
            fixes = ("serve fewer models (--set models=[NAME,...]), let models share replicas (--set "
                     f"multiplex.models=[NAME,...]), give each replica less (--set model.num_{key.lower()}s=...)")
            return (f"the app needs {need:g} {key}s to start its replicas ({each}), but Ray has {have:g}: "
                    f"{fixes}, or give Ray more")
    return None


def build_app(args: AppArgs, entries: list[dict[str, Any]] | None = None) -> Application:
    """The application for `args` (a dict is validated into AppArgs, as `serve run k=v` passes);
    `entries`: the registry models select_models(args) gives, when already known."""
    if not isinstance(args, AppArgs):
        args = build(AppArgs, dict(args or {}), source="serve args")
    entries = select_models(args) if entries is None else entries
    if not entries:
        log.warning("no models in registry '%s'; serving only /healthz and /v1/models",
                    registry.registry_root(args.registry))
    cards = {e["name"]: _card(e) for e in entries}
    limits = {"request_timeout_s": args.request_timeout_s, "max_body_bytes": args.max_body_bytes}
    env = {API_KEY_ENV: os.environ[API_KEY_ENV]} if os.environ.get(API_KEY_ENV) else None
    colocated = args.colocated_model(entries)
    if colocated:  # one deployment, named for the model, that is also the ingress
        name = colocated["name"]
        return Gateway.options(name=deployment_name(name), **args.options_for(name).serve_options(
            env, access_log=args.ingress.access_log)).bind(
            {}, cards, limits, colocated=(colocated, args.model_runtime(name)))
    handles, shared, multiplexed = {}, None, args.multiplexed()
    for entry in entries:
        if entry["name"] not in multiplexed:
            handles[entry["name"]] = ModelServer.options(
                name=deployment_name(entry["name"]), **args.options_for(entry["name"]).serve_options()
            ).bind(entry, args.model_runtime(entry["name"]))
    if multiplexed:
        shared = ModelServer.options(name=MULTIPLEXED, **args.shared_options().serve_options()).bind(
            None, args.model_runtime(None), {e["name"]: e for e in entries if e["name"] in multiplexed})
    return Gateway.options(**args.ingress.serve_options(env)).bind(
        handles, cards, limits, shared=shared, shared_models=tuple(sorted(multiplexed)))


def __getattr__(name: str) -> Any:
    # `serve run serve.app:app` builds from $RAYLM_STORAGE/registry when the attribute is read,
    # not at import, so importing this module never needs the registry.
    if name == "app":
        return build_app(AppArgs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
