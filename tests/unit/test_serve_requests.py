"""A request's path through the model replica and the gateway, without Ray: the work budget, the
deadline that stops generation, errors as values (a model failure is a generic 500 naming the
request id), where model calls run, and how a stream ends when something fails mid-way."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from cluster import registry
from serve import engines, tiny
from serve.schemas import SEED_MAX, ApiError

OPTIONS = {"max_tokens": 64, "max_batch_inputs": 4, "max_request_tokens": 200, "max_masks_per_input": 2,
           "max_top_k": 3, "request_timeout_s": 30.0, "batch_wait_timeout_s": 0.0, "compute_in_thread": False,
           "health_check_timeout_s": 10.0}
PARAMS = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": None, "seed": None}


def server_for(engine, **options):
    """A ModelServer around `engine`, built as its replica builds it, less the model load."""
    from serve.model_server import ModelServer

    cls = ModelServer.func_or_class
    server = cls.__new__(cls)
    server.engine = engine
    server.configure({**OPTIONS, **options})
    return server


async def _collect(agen) -> list:
    return [item async for item in agen]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpt")
    registry.publish(tiny.save_gpt(str(base / "ckpt")), "g", "generation", root=str(base / "reg"))
    return engines.load(registry.load_entry("g", str(base / "reg")))


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlm")
    registry.publish(tiny.save_bert(str(base / "ckpt"), "fill-mask"), "m", "fill-mask", root=str(base / "reg"))
    return engines.load(registry.load_entry("m", str(base / "reg")))


@pytest.fixture
def slow_steps(gpt):
    """Each forward pass of the tiny GPT takes 10 ms more: a generation long enough to outlast a deadline."""
    handle = gpt.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    yield
    handle.remove()


@pytest.mark.parametrize(("call", "param", "code"), [
    (lambda s: s.complete(["a"] * 5, PARAMS), "prompt", "too_many_inputs"),
    (lambda s: s.complete(["a"], {**PARAMS, "max_tokens": 65}), "max_tokens", "max_tokens_exceeded"),
    (lambda s: s.complete(["the cat"], {**PARAMS, "n": 10, "max_tokens": 20}), "max_tokens", "request_too_large"),
    (lambda s: s.complete(["the cat"] * 4, {**PARAMS, "n": 2, "max_tokens": 25}), "max_tokens", "request_too_large"),
])
def test_a_completion_over_the_work_budget_is_a_400_naming_the_limit(gpt, call, param, code):
    out = asyncio.run(call(server_for(gpt)))
    assert out["status"] == 400 and (out["error"]["param"], out["error"]["code"]) == (param, code), out
    within = asyncio.run(server_for(gpt).complete(["the cat"], {**PARAMS, "n": 2, "max_tokens": 20}))
    assert len(within["choices"]) == 2


@pytest.mark.parametrize(("items", "param", "code"), [
    ([("the [MASK] sat.", None, 5)] * 5, "inputs", "too_many_inputs"),
    ([("the [MASK] sat.", None, 4)], "top_k", "top_k_exceeded"),
    ([("[MASK] [MASK] [MASK]", None, 2)], "inputs", "too_many_masks"),
])
def test_an_encoder_request_over_the_work_budget_is_a_400_naming_the_limit(mlm, items, param, code):
    out = asyncio.run(server_for(mlm).encode(items))
    assert out["status"] == 400 and (out["error"]["param"], out["error"]["code"]) == (param, code), out
    assert asyncio.run(server_for(mlm).encode([("[MASK] [MASK]", None, 3)]))["results"]


def test_an_encoder_request_over_the_tokens_budget_is_a_400(mlm):
    out = asyncio.run(server_for(mlm, max_request_tokens=20).encode([("the [MASK] sat on the mat.", None, 1)] * 4))
    assert out["status"] == 400 and out["error"]["code"] == "request_too_large" and out["error"]["param"] == "inputs"


class FailingEngine:
    name, task = "broken", "generation"

    def encode(self, prompt, max_tokens):
        return [1, 2, 3]

    def generate(self, prompts, params, deadlines=None):
        raise RuntimeError("secret detail from inside the model")

    def stream(self, prompt, params):
        yield {"text": "a", "finish_reason": None, "tokens": 1}
        yield {"text": "b", "finish_reason": None, "tokens": 2}
        raise RuntimeError("secret detail mid-stream")


def test_a_model_failure_is_a_generic_500_naming_the_request_id_with_the_detail_only_in_the_log(caplog):
    server = server_for(FailingEngine())
    with caplog.at_level(logging.ERROR, logger="raylm.serve"):
        out = asyncio.run(server.complete(["x"], PARAMS))
    assert out["status"] == 500 and out["error"]["code"] == "internal_error"
    assert "secret" not in json.dumps(out) and "RuntimeError" not in json.dumps(out)
    rid = out["error"]["message"].split("request id ")[1].split(")")[0]
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and "secret detail from inside the model" in str(logged[0].exc_info[1])
    # the server is unharmed: its next request is answered
    server.engine = FailingEngine()
    assert asyncio.run(server.complete(["x"], PARAMS))["status"] == 500  # and again, no exception escapes


def test_a_stream_that_fails_midway_ends_with_the_error(caplog):
    with caplog.at_level(logging.ERROR, logger="raylm.serve"):
        items = asyncio.run(_collect(server_for(FailingEngine()).stream(["x"], PARAMS)))
    assert [i.get("text") for i in items[:2]] == ["a", "b"]
    assert items[-1]["status"] == 500 and "secret" not in json.dumps(items[-1])


def test_the_deadline_stops_a_generation_and_answers_504(gpt, slow_steps):
    """64 steps of >= 10 ms: a 0.2 s deadline stops the generation at the next step (not ~0.7 s
    later), batched or streamed; the stream's last item is the 504."""
    server = server_for(gpt, request_timeout_s=0.2)
    long = {**PARAMS, "max_tokens": 64}
    start = time.perf_counter()
    out = asyncio.run(server.complete(["the cat"], long))
    took = time.perf_counter() - start
    assert out["status"] == 504 and out["error"]["code"] == "timeout", out
    assert took < 0.5, f"generation ran on for {took:.2f} s"
    start = time.perf_counter()
    items = asyncio.run(_collect(server.stream(["the cat"], long)))
    assert items[-1]["status"] == 504 and 0 < len(items) - 1 < 64 and time.perf_counter() - start < 0.5


def test_the_seeds_of_a_streams_choices_stay_in_range(gpt):
    """Choice j of a seeded stream samples with seed + j, wrapped below 2**63."""
    items = asyncio.run(_collect(server_for(gpt).stream(["a dog"], {**PARAMS, "temperature": 1.0, "n": 2,
                                                                      "seed": SEED_MAX})))
    assert not [i for i in items if "error" in i] and {i["index"] for i in items} == {0, 1}


def test_a_model_call_runs_in_a_thread_until_it_is_known_to_be_short():
    """A replica's first call runs in a worker thread (the loop keeps answering health checks);
    a call predicted under LOOP_BUDGET_S runs on the loop; a long one, every one with
    compute_in_thread, and any while a worker thread computes, in a thread."""
    from serve.model_server import LOOP_BUDGET_S

    server, release = server_for(None), threading.Event()

    def where(wait: bool = False) -> str:
        if wait:
            release.wait(5)
        return threading.current_thread().name

    async def calls() -> list[str]:
        loop_thread = threading.current_thread().name
        key = ("generate", "m")
        first = await server._compute(key, 100, None, where)
        short = await server._compute(key, 100, None, where)
        server.rates[key] = LOOP_BUDGET_S / 10  # seconds per token: 10 tokens fill the budget
        long = await server._compute(key, 100, None, where)
        server.rates[key] = 1e-9
        blocked = asyncio.ensure_future(server._compute(("encode", "m"), 1, None, where, True))
        await asyncio.sleep(0.05)
        during = await server._compute(key, 1, None, where)
        release.set()
        await blocked
        after = await server._compute(key, 1, None, where)
        server.compute_in_thread = True
        forced = await server._compute(key, 1, None, where)
        return [name == loop_thread for name in (first, short, long, during, after, forced)]

    assert asyncio.run(calls()) == [False, True, False, False, True, False]


def test_a_slower_measurement_is_believed_at_once_a_faster_one_slowly():
    server = server_for(None)

    def nap() -> None:
        time.sleep(0.02)

    asyncio.run(server._compute(("generate", "m"), 10, None, nap))
    slow = server.rates[("generate", "m")]
    assert slow >= 0.002
    asyncio.run(server._compute(("generate", "m"), 10, lambda _: 1000, nap))
    assert slow > server.rates[("generate", "m")] > 0.7 * slow


async def _stream_events(items: list) -> list[str]:
    from serve.gateway import _events

    async def gen():
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item

    agen = gen()
    first = await agen.__anext__()
    head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m"}
    return [e async for e in _events(agen, first, head, False, True, time.monotonic() + 30, 30.0)]


def _token(i: int, reason=None) -> dict:
    return {"text": f"t{i}", "finish_reason": reason, "tokens": i + 1, "index": 0, "first": i == 0,
            "prompt_tokens": 2 if i == 0 else 0}


@pytest.mark.parametrize(("failure", "status", "code"), [
    (ActorDiedError(), 503, "replica_died"),
    ({"error": {"message": "too long", "type": "timeout_error", "param": None, "code": "timeout"}, "status": 504},
     504, "timeout"),
    (RuntimeError("secret"), 500, "internal_error"),
])
def test_a_stream_that_fails_midway_sends_an_error_event_and_no_done(failure, status, code):
    """The openai client raises on an event with an `error` and treats `data: [DONE]` as a whole
    answer, so a cut stream ends with the error and never with [DONE]."""
    events = asyncio.run(_stream_events([_token(0), _token(1), failure]))
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
    assert json.loads(events[-1][6:])["error"]["code"] == code and len(events) == 3
    assert not any("[DONE]" in e for e in events)
    whole = asyncio.run(_stream_events([_token(0), _token(1, "length")]))
    assert whole[-1] == "data: [DONE]\n\n" and json.loads(whole[-2][6:])["usage"]["completion_tokens"] == 2


def test_each_failure_answers_its_status_in_the_error_shape(caplog):
    from serve.gateway import _failure

    assert _failure(TimeoutError(), 2.0).status == 504 and "request_timeout_s (2 s)" in _failure(TimeoutError(), 2).message
    busy = _failure(BackPressureError(num_queued_requests=5, max_queued_requests=4, retry_after_s=2))
    assert busy.status == 429 and busy.headers == {"Retry-After": "2"}
    died = _failure(ActorDiedError())
    assert (died.status, died.code, died.headers) == (503, "replica_died", {"Retry-After": "1"})
    refused = ApiError(400, "bad", "seed")
    assert _failure(refused) is refused
    with caplog.at_level(logging.ERROR, logger="raylm.serve"):
        internal = _failure(ValueError("Overflow when unpacking long long"))
    assert internal.status == 500 and "Overflow" not in internal.message and "request id" in internal.message
    assert any("Overflow" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
