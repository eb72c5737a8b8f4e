"""`Gateway`, the FastAPI ingress deployment: it routes each request to the model its body names
and owns the HTTP side: the routes, the limits (`Guard` for the API key and body size, a timeout
per model call, one more try when a model's replica dies) and the error shape (every failure
answers an OpenAI-style error body).
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.guard import Guard
from serve.model_server import InProcess, ModelServer
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
REPLICA_DEATH_RETRIES = 1  # a request whose replica died goes to another one this many times

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
    return JSONResponse(error_body(422, message, param, "invalid_value"), status_code=422)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


# Helpers the Gateway uses are defined or imported above it: `serve.ingress` captures the class's
# globals when it decorates it.
def _raise_if_error(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        err = result["error"]
        raise ApiError(result["status"], err["message"], err.get("param"), err.get("code"))
    return result


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
        for name, card in self.cards.items():
            if "device" not in card:  # asked once per model, from a replica that holds it
                card.update(await self._placement(name))
        return {"object": "list", "data": list(self.cards.values())}

    async def _placement(self, model: str) -> dict[str, str]:
        """The device and dtype a model's replica runs it in; {} while no replica answers (still
        starting), so the card says it on a later call."""
        try:
            return await asyncio.wait_for(_await(self.handles[model].placement.remote()), timeout=5)
        except (asyncio.TimeoutError, ActorDiedError, ActorUnavailableError, BackPressureError):
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
