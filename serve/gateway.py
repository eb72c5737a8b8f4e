"""`Gateway`, the FastAPI ingress deployment: it routes each request to the model its body names
and owns the HTTP side: the routes, the limits (`Guard` for the API key and body size, a deadline
per request, streams included) and the error shape (every failure answers an OpenAI-style error
body; one mid-stream is the stream's last event, with no `data: [DONE]`). A request whose model
replica died under it is answered 503, never sent again: the request may be what killed it.
"""

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.guard import Guard
from serve.model_server import InProcess, ModelServer, request_id
from serve.schemas import (
    SEED_MAX,
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
    internal_error,
    validation_message,
    validation_status,
)

log = logging.getLogger("raylm.serve")
# What a handle call raises when the replica running it is gone (its process killed, its node lost).
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
# Each request schema's `model` is listed in /openapi.json as an enum of the served models of the
# route's task, so clients and the fuzz drill see what exists (a name outside it still gets a 404).
TASK_OF_REQUEST = {CompletionRequest: "generation", ChatCompletionRequest: "generation",
                   FillMaskRequest: "fill-mask", ClassifyRequest: "classification", TagRequest: "tagging"}

fastapi_app = FastAPI(
    title="raylm",
    description="OpenAI-compatible completions and encoder task endpoints for raylm registry models.",
    version="0.1.0",
)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 503, 504)
}
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
    status = validation_status(errors)
    return JSONResponse(error_body(status, message, param, "invalid_value"), status_code=status)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    error = _failure(exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# Helpers the Gateway uses are defined or imported above it: `serve.ingress` captures the class's
# globals when it decorates it.
def _raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        err = result["error"]
        raise ApiError(result["status"], err["message"], err.get("param"), err.get("code"))
    return result


def _failure(exc: BaseException, timeout_s: float | None = None) -> ApiError:
    """What a request that failed answers: its own ApiError; 504 past its deadline; 429 when the
    model's queue is full; 503 with Retry-After when the replica running it died or none is up;
    else a generic 500 naming the request id, with the detail in this replica's log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ApiError(504, f"the request ran longer than this server's request_timeout_s ({timeout_s:g} s)",
                        code="timeout")
    if isinstance(exc, BackPressureError):
        return _busy(exc)
    if isinstance(exc, REPLICA_GONE + (DeploymentUnavailableError,)):
        log.warning("request %s: the model's replica is gone (%s); answered 503, not retried", request_id(),
                    type(exc).__name__)
        return ApiError(503, "the model's replica stopped while answering this request (or none is up); it is not "
                        "sent again, since a request can be what stops a replica: retry it", code="replica_died",
                        headers={"Retry-After": "1"})
    rid = request_id()
    log.error("request %s failed", rid, exc_info=exc)
    return internal_error(rid)


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _openapi_with_models(cards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The app's OpenAPI schema with each request's `model` an enum of the served models that
    serve its route's task (left free text for a task nothing serves)."""
    schema = copy.deepcopy(FastAPI.openapi(fastapi_app))
    for request, task in TASK_OF_REQUEST.items():
        properties = schema["components"]["schemas"][request.__name__]["properties"]
        names = sorted(name for name, card in cards.items() if card["task"] == task)
        if names:
            properties["model"]["enum"] = names
        # FastAPI's OpenAPI model keeps bounds as floats, which round the largest seed up to 2**63
        for option in properties.get("seed", {}).get("anyOf", []):
            if "maximum" in option:
                option["maximum"] = SEED_MAX
    return schema


async def _next(gen: Any, deadline: float, timeout: float) -> dict[str, Any]:
    """The stream's next item by the request's deadline; past it the model call is cancelled.
    StopAsyncIteration ends the stream; any other failure is raised as the ApiError it answers."""
    try:
        return await asyncio.wait_for(gen.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
    except StopAsyncIteration:
        raise
    except asyncio.TimeoutError:
        _cancel(gen)
        raise _failure(TimeoutError(), timeout) from None
    except Exception as exc:  # noqa: BLE001 - each failure answers in the error shape
        raise _failure(exc) from None


def _cancel(gen: Any) -> None:
    """Cancel a model stream (a handle's response generator; an in-process one stops when its
    pending step is cancelled)."""
    cancel = getattr(gen, "cancel", None)
    if cancel:
        cancel()


def _chunk(item: dict[str, Any], head: dict[str, Any], chat: bool) -> str:
    if chat:
        delta = {"content": item["text"]} if item["text"] or not item["finish_reason"] else {}
        if item.get("first"):
            delta["role"] = "assistant"
        choice = {"index": item["index"], "delta": delta, "finish_reason": item["finish_reason"]}
    else:
        choice = {"index": item["index"], "text": item["text"], "finish_reason": item["finish_reason"],
                  "logprobs": None}
    return _event({**head, "choices": [choice]})


async def _events(gen: Any, first: dict[str, Any], head: dict[str, Any], chat: bool, include_usage: bool,
                  deadline: float, timeout: float) -> AsyncIterator[str]:
    """A stream's events after its first item: chunks, with `stream_options.include_usage` a last
    usage chunk, then `data: [DONE]`; or, on a failure, an error event and nothing after it."""
    # usage: prompt tokens once per prompt, completion tokens as each choice's last count
    prompt_tokens, completion = first.get("prompt_tokens", 0), {first["index"]: first["tokens"]}
    yield _chunk(first, head, chat)
    finished = False
    try:
        while True:
            try:
                item = _raise_if_error(await _next(gen, deadline, timeout))
            except StopAsyncIteration:
                break
            except ApiError as exc:
                yield _event(exc.body())
                finished = True
                return
            prompt_tokens += item.get("prompt_tokens", 0)
            completion[item["index"]] = item["tokens"]
            yield _chunk(item, head, chat)
        finished = True
    finally:
        if not finished:  # the client went away: stop the model's work for it
            _cancel(gen)
    if include_usage:  # OpenAI's stream_options.include_usage: a last chunk
        yield _event({**head, "choices": [], "usage": _usage(prompt_tokens, sum(completion.values()))})
    yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _await(response: Any) -> Any:
    return await response


def _busy(exc: BackPressureError) -> ApiError:
    """A model deployment whose queue is full (max_queued_requests) answers 429 with Retry-After,
    which the openai client and most HTTP clients honour; the replica itself is unaffected."""
    retry = exc.retry_after_s or 1
    return ApiError(429, f"model is at capacity, retry in {retry:g} s ({exc.message})", code="rate_limit_exceeded",
                    headers={"Retry-After": f"{retry:g}"})


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
        # `limits` carries the API key's sha256 (never the key): Guard compares hashes.
        fastapi_app.state.limits = dict(limits)
        fastapi_app.openapi_schema = None
        fastapi_app.openapi = lambda: _openapi_with_models(self.cards)

    def _handle(self, model: str, task: str) -> DeploymentHandle:
        if model not in self.handles:
            known = ", ".join(sorted(self.handles)) or "none"
            raise ApiError(404, f"model '{model}' does not exist (served: {known})", "model", "model_not_found")
        if self.cards[model]["task"] != task:
            raise ApiError(400, f"model '{model}' serves '{self.cards[model]['task']}', not '{task}'",
                           "model", "wrong_task")
        return self.handles[model]

    async def _call(self, call: Callable[[], Any]) -> dict[str, Any]:
        """Send `call()` to a model replica and wait at most request_timeout_s for its answer;
        past that the call is cancelled, which stops its generation in the replica."""
        timeout = self.limits["request_timeout_s"]
        response = call()
        try:
            result = await asyncio.wait_for(_await(response), timeout=timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise _failure(TimeoutError(), timeout) from None
        except Exception as exc:  # noqa: BLE001 - each failure answers in the error shape
            raise _failure(exc) from None
        return _raise_if_error(result)

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(self) -> dict[str, Any]:
        for name, card in self.cards.items():
            if "device" not in card:  # asked once per model, from a replica that holds it
                card.update(await self._placement(name))
        return {"object": "list", "data": list(self.cards.values())}

    async def _placement(self, model: str) -> dict[str, str]:
        """The device and dtype a model's replica runs it in; {} while no replica answers (still
        starting), so the card says it on a later call."""
        try:
            return await asyncio.wait_for(_await(self.handles[model].placement.remote()), timeout=5)
        except (asyncio.TimeoutError, BackPressureError, DeploymentUnavailableError, *REPLICA_GONE):
            return {}

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
        """Server-sent events, one chunk per token. The first item is awaited before the 200 is
        sent, so a request the replica refuses gets its 4xx status; a failure after that (the
        deadline, a dead replica, a model error) is the stream's last event, in the error shape,
        with no `data: [DONE]`, so a client cannot take the cut-off answer for a whole one."""
        timeout = self.limits["request_timeout_s"]
        deadline = time.monotonic() + timeout
        gen = handle.options(stream=True).stream.remote(prompts, params or req.sampling())
        first = _raise_if_error(await _next(gen, deadline, timeout))
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": req.model}
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(gen, first, head, chat, usage, deadline, timeout),
                                 media_type="text/event-stream")

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
