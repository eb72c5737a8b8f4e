"""Request and response schemas of the Serve API, and the OpenAI-shaped error helpers.

Requests follow the OpenAI completions/chat API closely enough for the official `openai` client;
unknown fields are ignored (as OpenAI-compatible servers do) so newer clients keep working, except
the OpenAI parameters that would change what an answer means (UNSUPPORTED_*: logprobs, echo,
penalties, tools, ...), which are refused with a 400 naming them unless they are off. A number
outside its bounds is a 400 naming the field and the bound; a body that does not parse (a missing
field, a wrong type, text that is not Unicode) is a 422. The per-request work budget (inputs per
request, tokens per request) is checked here too, by the model replica once prompts are tokenized.
Nothing here imports Ray, so the schemas are tested without a cluster.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Hard ceilings in the schema (and so in /openapi.json); the deployment's own caps (AppArgs:
# max_tokens, max_top_k, ...) and the model's context are checked later, each with a 400 naming it.
MAX_TOKENS_CEILING = 1_000_000
TOP_K_CEILING = 100
SEED_MAX = 2**63 - 1  # torch seeds are 64-bit: a larger one overflows inside the model call
# A temperature this small divides the logits into inf/nan in float32; its distribution is the
# argmax's to within rounding anyway, so it is decoded greedily.
GREEDY_BELOW = 1e-2
# pydantic error types that mean "a number outside its bounds": answered 400, naming the bound
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, param, code, headers)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape. Text from the request that is not valid Unicode (a lone surrogate
    from a JSON escape) is replaced, so the body always encodes."""
    return {"error": {"message": _printable(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else _printable(param), "code": code}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def internal_error(request_id: str) -> ApiError:
    """What a client reads when the server fails: no detail (that goes to the log, under the same
    request id), so nothing about the model or the code leaks."""
    return ApiError(500, f"the server failed to answer this request (request id {request_id}); the details are "
                    "in the server's log under that id", code="internal_error")


def validation_status(errors: list[dict[str, Any]]) -> int:
    """400 when every problem is a number outside its bounds (the message names each bound), 422
    when the body does not have the request's shape."""
    return 400 if errors and all(e.get("type") in BOUND_ERRORS for e in errors) else 422


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(one message listing every problem, the first offending field) from pydantic errors. A
    field that takes one of several types (a prompt or a list of them) fails once per type, each
    error's location naming the type's branch (`list[str]`): the message names the field only."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)]
        key = ".".join(loc) or "body"
        first = first or (key if loc else None)
        part = f"{key}: {err.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request", first


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate escape)") from None
    return text


# Request text: JSON can escape a lone surrogate (`"\ud800"`), which no tokenizer takes. Prompts and
# inputs must hold text: /openapi.json says so (minLength, minItems), and an empty one is a 400
# naming it (CompletionRequest.prompts, as_list), not pydantic's message for each union branch.
Text = Annotated[str, AfterValidator(_unicode)]
Input = Annotated[str, AfterValidator(_unicode), Field(json_schema_extra={"minLength": 1})]
NONEMPTY = Field(json_schema_extra={"minItems": 1})


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(..., min_length=1, description="registry name of the model (GET /v1/models)")


def _is_default(value: Any, defaults: tuple) -> bool:
    return any(value is d or (type(value) is type(d) and value == d) for d in defaults)


# OpenAI parameters this server does not implement. Other unknown fields are ignored (newer clients
# keep working), but these change what an answer means: a request that sets one of them to anything
# but a value meaning "off" is refused, not answered as though it had been honoured (a scorer that
# asks for echo + logprobs must not get plain completions back). Values: the "off" values.
_OFF = (None, False, 0, 0.0, "", {}, [])
UNSUPPORTED_COMPLETION = {"logprobs": (None,), "echo": (None, False), "suffix": (None, ""),
                          "presence_penalty": _OFF, "frequency_penalty": _OFF, "logit_bias": _OFF}
UNSUPPORTED_CHAT = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": _OFF,
                    "frequency_penalty": _OFF, "logit_bias": _OFF, "tools": _OFF, "functions": _OFF,
                    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
                    "response_format": (None, {"type": "text"}), "audio": _OFF, "modalities": (None, ["text"])}


def _refuse_unsupported(data: Any, unsupported: dict[str, tuple]) -> Any:
    if isinstance(data, dict):
        for key, off in unsupported.items():
            if key in data and not _is_default(data[key], off):
                raise ApiError(400, f"{key} is not supported by this server (got {json.dumps(data[key])[:80]})",
                               key, "unsupported_parameter")
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="a last chunk, before [DONE], with the usage and no choices")


class SamplingParams(BaseModel):
    """Sampling shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    unsupported: ClassVar[dict[str, tuple]] = {}  # each request's UNSUPPORTED_* table

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse_unsupported(data, cls.unsupported)

    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_CEILING, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description=f"0 (or below {GREEDY_BELOW:g}) means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    n: int = Field(1, ge=1, le=16, description="completions per prompt")
    stop: Text | list[Text] | None = Field(None, description="up to 4 strings that end generation (not returned)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="makes sampling reproducible")
    stream: bool = Field(False, description="server-sent events, one chunk per token, then `data: [DONE]`")
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops or None

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "n": self.n, "stop": self.stop, "seed": self.seed}


class CompletionRequest(_Request, SamplingParams):
    prompt: Input | Annotated[list[Input], NONEMPTY] = Field(..., description="a prompt or a list of prompts")
    best_of: int | None = Field(None, ge=1, le=16, description="accepted when it equals n (every candidate is returned)")
    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED_COMPLETION

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ApiError(400, f"best_of ({self.best_of}) other than n ({self.n}) is not supported by this server",
                           "best_of", "unsupported_parameter")
        return self

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise ApiError(400, "prompt must be a non-empty string (or a list of them)", "prompt", "empty_prompt")
        return prompts


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Input


class ChatCompletionRequest(_Request, SamplingParams):
    messages: Annotated[list[ChatMessage], NONEMPTY] = Field(..., description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING,
                                              description="OpenAI's newer name for max_tokens; wins over it")
    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED_CHAT

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def prompt(self) -> str:
        """A plain template for base models: 'User: ...\\nAssistant:'."""
        if not self.messages or not any(m.content.strip() for m in self.messages):
            raise ApiError(400, "messages must hold at least one non-empty message", "messages", "empty_prompt")
        lines = [f"{m.role.capitalize()}: {m.content}" for m in self.messages]
        return "\n".join(lines) + "\nAssistant:"


class TextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Input
    text_pair: Text | None = None


class FillMaskRequest(_Request):
    inputs: Input | Annotated[list[Input], NONEMPTY] = Field(
        ..., description="text(s) with the tokenizer's mask token, e.g. [MASK]", examples=["the [MASK] sat on the mat."])
    top_k: int = Field(5, ge=1, le=TOP_K_CEILING, description="predictions per mask (the server's max_top_k caps it)")


class ClassifyRequest(_Request):
    inputs: Input | TextPair | Annotated[list[Input | TextPair], NONEMPTY] = Field(
        ..., description="text, {text, text_pair}, or a list")


class TagRequest(_Request):
    inputs: Input | Annotated[list[Input], NONEMPTY] = Field(..., description="text(s) to tag")


def as_list(inputs: Any, param: str = "inputs") -> list[Any]:
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise ApiError(400, f"{param} must not be empty", param, "empty_input")
    for item in items:
        text = item.text if isinstance(item, TextPair) else item
        if not text or not text.strip():
            raise ApiError(400, f"{param} must hold non-empty text", param, "empty_input")
    return items


# The work one request may ask for (AppArgs: max_batch_inputs, max_request_tokens), checked by the
# model replica before the request joins a batch, and the time it may take (request_timeout_s).


class Deadline:
    """When one request's model work must stop: `seconds` after it reached the replica, or as soon
    as it is released (answered, failed, or cancelled because its client went away). Decoding
    checks it between steps, in whichever thread runs them."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def passed(self) -> bool:
        return self._released.is_set() or (self.at is not None and time.monotonic() >= self.at)

    def error(self) -> ApiError:
        return ApiError(504, f"the request ran longer than this server's request_timeout_s ({self.seconds:g} s); its "
                        "generation was stopped", code="timeout")


def check_inputs(count: int, limit: int, param: str) -> None:
    if count > limit:
        raise ApiError(400, f"{param} holds {count} items; this server takes at most {limit} per request "
                       "(max_batch_inputs)", param, "too_many_inputs")


def request_tokens(prompt_tokens: list[int], n: int = 1, max_tokens: int = 0) -> int:
    """A request's work in tokens: every prompt's tokens, plus n x max_tokens for each prompt."""
    return sum(prompt_tokens) + len(prompt_tokens) * n * max_tokens


def check_request_tokens(prompt_tokens: list[int], budget: int, n: int = 1, max_tokens: int = 0,
                         param: str = "prompt") -> None:
    """A 400 naming max_request_tokens when the request's work is over `budget`; the param is
    `param` (the inputs) when they alone are over it, else max_tokens."""
    total = request_tokens(prompt_tokens, n, max_tokens)
    if total > budget:
        generated = f" + {len(prompt_tokens)} x n {n} x max_tokens {max_tokens}" if max_tokens else ""
        raise ApiError(400, f"this request is {total} tokens ({sum(prompt_tokens)} input tokens{generated}); this "
                       f"server takes at most {budget} per request (max_request_tokens)",
                       param if sum(prompt_tokens) > budget or not max_tokens else "max_tokens", "request_too_large")


# Responses (documented in /openapi.json).


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raylm"
    task: str
    labels: list[str] | None = None
    device: str | None = None  # where its replicas run it: "cuda" or "cpu"
    dtype: str | None = None  # "bfloat16" or "float16" on a GPU, "float32" on the CPU


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MaskPrediction(BaseModel):
    token: int
    token_str: str
    score: float
    sequence: str


class MaskResult(BaseModel):
    position: int = Field(..., description="token index of the mask")
    predictions: list[MaskPrediction]


class FillMaskResponse(BaseModel):
    model: str
    results: list[list[MaskResult]] = Field(..., description="per input, per mask token")


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    label: str
    score: float
    scores: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classification]


class Entity(BaseModel):
    label: str
    text: str
    start: int = Field(..., description="character offset, inclusive")
    end: int = Field(..., description="character offset, exclusive")
    score: float


class TagResponse(BaseModel):
    model: str
    results: list[list[Entity]]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
