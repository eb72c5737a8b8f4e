"""Serve request schemas, error shapes, work budget and app args, without Ray."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from pydantic import ValidationError

from serve.engines import aggregate_bio
from serve.schemas import (
    SEED_MAX,
    ApiError,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    FillMaskRequest,
    TextPair,
    as_list,
    check_inputs,
    check_request_tokens,
    error_body,
    request_tokens,
    validation_message,
    validation_status,
)


@pytest.fixture(autouse=True)
def _never_ray(monkeypatch):
    monkeypatch.setattr("cluster.runtime.connect", lambda *a, **k: pytest.fail("a unit test started Ray"))


@pytest.fixture
def no_ray(monkeypatch):
    """build_app joins or starts Ray to size replicas; here it sees a 16-CPU cluster and no Serve."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    monkeypatch.setattr("serve.app.serve_host", lambda: None)


def test_completion_defaults_and_sampling():
    req = CompletionRequest(model="m", prompt="hi", stop="\n", unknown_field=1)
    assert req.sampling() == {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "n": 1, "stop": ["\n"],
                              "seed": None}
    assert req.prompts() == ["hi"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]


@pytest.mark.parametrize("bad", [
    {"prompt": "x"},  # no model
    {"model": "m"},  # no prompt
    {"model": "m", "prompt": 3},
    {"model": "m", "prompt": "x", "max_tokens": 0},
    {"model": "m", "prompt": "x", "max_tokens": -5},
    {"model": "m", "prompt": "x", "max_tokens": 10**9},
    {"model": "m", "prompt": "x", "temperature": 3},
    {"model": "m", "prompt": "x", "top_p": 0},
    {"model": "m", "prompt": "x", "n": 0},
    {"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    {"model": "m", "prompt": "x", "stop": [""]},
    {"model": "", "prompt": "x"},
    {"model": "m", "prompt": "x", "seed": SEED_MAX + 1},
    {"model": "m", "prompt": "x", "seed": 1180591620717411303424},
    {"model": "m", "prompt": "x", "best_of": 17},
    {"model": "m", "prompt": "x", "temperature": float("nan")},
    {"model": "m", "prompt": "x", "top_p": float("inf")},
    {"model": "m", "prompt": "x\ud800"},
    {"model": "\udfff", "prompt": "x"},
])
def test_completion_rejects(bad):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(bad)


def test_a_number_out_of_bounds_is_a_400_naming_the_bound_and_a_malformed_body_a_422():
    """The seed that overflowed torch (a 500) is refused up front with a 400 that names the bound;
    the largest seed torch takes is accepted."""
    assert CompletionRequest(model="m", prompt="x", seed=SEED_MAX).seed == SEED_MAX
    with pytest.raises(ValidationError) as exc:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "seed": 1180591620717411303424})
    assert validation_status(exc.value.errors()) == 400
    message, param = validation_message(exc.value.errors())
    assert param == "seed" and str(SEED_MAX) in message
    for bad in ({"max_tokens": 0}, {"temperature": 2.5}, {"top_p": float("nan")}, {"n": 17}):
        with pytest.raises(ValidationError) as exc:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **bad})
        assert validation_status(exc.value.errors()) == 400, bad
    for malformed in ({"prompt": 3}, {"temperature": "hot"}, {"prompt": "\ud800"}, {"max_tokens": 0, "prompt": None}):
        with pytest.raises(ValidationError) as exc:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **malformed})
        assert validation_status(exc.value.errors()) == 422, malformed


def test_error_bodies_always_encode():
    """A message quoting request text with a lone surrogate (a 404 naming the model, a validation
    message naming a key) still encodes as JSON in UTF-8."""
    body = error_body(404, "model 'a\ud800' does not exist", "mo\udfffdel")
    json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert body["error"]["message"] == "model 'a?' does not exist" and body["error"]["param"] == "mo?del"


def test_the_work_budget_arithmetic():
    """prompt tokens + n x max_tokens for each prompt, over all prompts; each limit is a 400 that
    names it, and the param is what the client can change."""
    assert request_tokens([10, 20], n=3, max_tokens=100) == 30 + 2 * 3 * 100
    assert request_tokens([5, 5]) == 10
    check_request_tokens([10, 20], 630, n=3, max_tokens=100)  # exactly the budget
    with pytest.raises(ApiError) as exc:
        check_request_tokens([10, 20], 629, n=3, max_tokens=100)
    err = exc.value
    assert (err.status, err.param, err.code) == (400, "max_tokens", "request_too_large")
    assert "630 tokens" in err.message and "629" in err.message and "max_request_tokens" in err.message
    with pytest.raises(ApiError) as exc:
        check_request_tokens([700], 629, n=1, max_tokens=1)
    assert exc.value.param == "prompt"
    with pytest.raises(ApiError) as exc:
        check_request_tokens([300, 400], 629, param="inputs")
    assert exc.value.param == "inputs" and "700 tokens (700 input tokens)" in exc.value.message
    check_inputs(64, 64, "prompt")
    with pytest.raises(ApiError) as exc:
        check_inputs(65, 64, "inputs")
    assert (exc.value.status, exc.value.param, exc.value.code) == (400, "inputs", "too_many_inputs")
    assert "at most 64" in exc.value.message and "max_batch_inputs" in exc.value.message


def test_request_limits_and_the_bounded_queue_are_serving_options_with_defaults_in_one_place():
    from cluster.config import ConfigError, build, parse_overrides
    from serve.options import DEFAULTS, AppArgs

    args = AppArgs()
    assert (args.max_batch_inputs, args.max_request_tokens, args.max_masks_per_input, args.max_top_k) == (
        64, 16_384, 8, 20)
    assert args.model.max_queued_requests == DEFAULTS["model"]["max_queued_requests"] > 0
    assert args.model.serve_options()["max_queued_requests"] == DEFAULTS["model"]["max_queued_requests"]
    set_ = build(AppArgs, parse_overrides(["max_batch_inputs=8", "max_request_tokens=1000", "max_top_k=5",
                                           "request_timeout_s=2", "model.max_queued_requests=4"]))
    runtime = set_.model_runtime("gpt")
    assert {k: runtime[k] for k in ("max_batch_inputs", "max_request_tokens", "max_masks_per_input", "max_top_k",
                                    "request_timeout_s", "max_tokens", "max_queued_requests")} == {
        "max_batch_inputs": 8, "max_request_tokens": 1000, "max_masks_per_input": 8, "max_top_k": 5,
        "request_timeout_s": 2.0, "max_tokens": 512, "max_queued_requests": 4}
    with pytest.raises(ConfigError, match="max_top_k"):
        build(AppArgs, {"max_top_k": 101})  # above the schema's ceiling, which /openapi.json states


def test_served_model_names_are_an_enum_per_route_in_the_openapi_schema():
    """The fuzz drill generates `model` from the schema: as an enum of the served models of the
    route's task its cases reach the engines instead of stopping at a 404."""
    from serve.gateway import _openapi_with_models

    cards = {"g1": {"task": "generation"}, "g2": {"task": "generation"}, "c": {"task": "classification"}}
    schema = _openapi_with_models(cards)["components"]["schemas"]
    assert schema["CompletionRequest"]["properties"]["model"]["enum"] == ["g1", "g2"]
    assert schema["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["g1", "g2"]
    assert schema["ClassifyRequest"]["properties"]["model"]["enum"] == ["c"]
    assert "enum" not in schema["TagRequest"]["properties"]["model"]  # nothing serves tagging
    assert schema["CompletionRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == SEED_MAX


@pytest.mark.parametrize("prompt", ["", "   ", [], ["ok", ""]])
def test_empty_prompt_is_400(prompt):
    with pytest.raises(ApiError) as exc:
        CompletionRequest(model="m", prompt=prompt).prompts()
    assert exc.value.status == 400 and exc.value.param == "prompt"


def test_chat_template():
    req = ChatCompletionRequest(model="m", messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}])
    assert req.prompt() == "System: be brief\nUser: hi\nAssistant:"
    with pytest.raises(ApiError):
        ChatCompletionRequest(model="m", messages=[]).prompt()
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "x"}])


def test_encoder_inputs():
    req = ClassifyRequest(model="m", inputs=[{"text": "a", "text_pair": "b"}, "c"])
    items = as_list(req.inputs)
    assert isinstance(items[0], TextPair) and items[1] == "c"
    assert isinstance(ClassifyRequest(model="m", inputs={"text": "a"}).inputs, TextPair)
    with pytest.raises(ValidationError):
        ClassifyRequest(model="m", inputs={"txt": "a"})
    with pytest.raises(ValidationError):
        FillMaskRequest(model="m", inputs="[MASK]", top_k=0)
    for empty in ([], "", [" "]):
        with pytest.raises(ApiError):
            as_list(empty)


def test_error_shape():
    body = error_body(404, "no such model", "model", "model_not_found")
    assert body == {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}
    assert error_body(401, "x")["error"]["type"] == "authentication_error"
    assert ApiError(400, "bad", "p", "c").body()["error"]["param"] == "p"
    try:
        CompletionRequest.model_validate({"model": "m", "max_tokens": -1})
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
    assert "prompt" in message and "max_tokens" in message and param in ("prompt", "max_tokens")


def test_bio_aggregation():
    text = "Alice Smith went to New York"
    words = [("B-PER", 0, 5, 0.9), ("I-PER", 6, 11, 0.7), ("O", 12, 16, 0.9), ("O", 17, 19, 0.9),
             ("B-LOC", 20, 23, 0.8), ("I-LOC", 24, 28, 0.6)]
    ents = aggregate_bio(text, words)
    assert [(e["label"], e["text"]) for e in ents] == [("PER", "Alice Smith"), ("LOC", "New York")]
    assert ents[0]["score"] == pytest.approx(0.8)
    # B- starts a new entity even after the same type; I- of another type starts one too
    ents = aggregate_bio("a b c", [("B-PER", 0, 1, 1.0), ("B-PER", 2, 3, 1.0), ("I-LOC", 4, 5, 1.0)])
    assert [e["text"] for e in ents] == ["a", "b", "c"]


def test_app_args_merge_defaults():
    from cluster.config import ConfigError, build
    from serve.options import DEFAULTS, AppArgs

    args = build(AppArgs, {"model": {"num_cpus": 0.5, "autoscaling": {"max_replicas": 4}},
                           "per_model": {"gpt": {"num_gpus": 0.25}}})
    assert args.model.num_cpus == 0.5
    assert args.model.max_batch_size == DEFAULTS["model"]["max_batch_size"]
    assert args.ingress.num_cpus == DEFAULTS["ingress"]["num_cpus"]
    opts = args.options_for("gpt")
    assert opts.num_gpus == 0.25 and opts.num_cpus == 0.5
    serve_opts = opts.serve_options()
    assert serve_opts["num_replicas"] == "auto" and serve_opts["autoscaling_config"]["max_replicas"] == 4
    assert AppArgs().model.serve_options()["num_replicas"] == 1
    with pytest.raises(ConfigError, match="model.max_batch_sise"):
        build(AppArgs, {"model": {"max_batch_sise": 3}})
    with pytest.raises(ConfigError, match="min_replicas"):
        build(AppArgs, {"model": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_importing_app_needs_no_registry(tmp_path, monkeypatch, no_ray):
    import serve.app
    from serve import lifetime

    watched: list[int] = []  # reading `app` watches the Ray it serves on (Serve's default port)
    monkeypatch.setattr(lifetime, "watch_ray", watched.append)

    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path / "nothing-here"))
    assert callable(serve.app.build_app)  # `app` is built only when read
    app = serve.app.app  # an empty registry still builds (health and /v1/models only)
    assert app is not None and watched == [8000]


class FakeBatchMethod:
    """Stands in for a bound `@serve.batch` method: records which requests went through the
    batcher (and with what wait) and which ran the undecorated body directly."""

    def __init__(self, fail: bool = False):
        self.wait, self.queued, self.direct, self.fail = None, [], [], fail

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.wait = seconds

    async def __call__(self, item):
        self.queued.append(item)
        await asyncio.sleep(0)
        return f"batched {item}"

    async def __wrapped__(self, server, items):  # the body Serve wraps: a batch -> its results
        if self.fail:
            raise RuntimeError("a request that failed in its batch")
        self.direct.append(list(items))
        return [f"direct {i}" for i in items]


def _server(compute_in_thread: bool = False):
    from serve.model_server import ModelServer

    cls = ModelServer.func_or_class
    server = cls.__new__(cls)
    server.batch_wait_s, server.in_flight, server.compute_in_thread = 0.02, 0, compute_in_thread
    return server


def test_a_lone_request_on_an_idle_replica_skips_the_batcher():
    """Alone on the replica, a one-item request runs the batch body itself, as a batch of one."""
    server, fn = _server(), FakeBatchMethod()
    assert asyncio.run(server._batched(fn, ["a"])) == ["direct a"]
    assert fn.direct == [["a"]] and fn.queued == [] and server.in_flight == 0


def test_requests_that_arrive_together_are_batched_with_the_wait():
    """Two requests delivered together both queue for one batch, which waits to fill: the first
    does not run alone just because it counted itself before the second arrived."""
    server, fn = _server(), FakeBatchMethod()

    async def both():
        return await asyncio.gather(server._batched(fn, ["a"]), server._batched(fn, ["b"]))

    assert asyncio.run(both()) == [["batched a"], ["batched b"]]
    assert fn.direct == [] and sorted(fn.queued) == ["a", "b"] and fn.wait == 0.02
    assert server.in_flight == 0


@pytest.mark.parametrize(("items", "in_thread"), [(["a", "b"], False), (["a"], True)])
def test_several_items_or_compute_in_a_thread_go_through_the_batcher_without_waiting(items, in_thread):
    """A request of several items batches them together; with compute_in_thread the loop stays free
    during a batch, so requests always meet in the batcher. Alone, neither waits to fill."""
    server, fn = _server(in_thread), FakeBatchMethod()
    assert asyncio.run(server._batched(fn, items)) == [f"batched {i}" for i in items]
    assert fn.direct == [] and fn.queued == items and fn.wait == 0.0


def test_the_in_flight_count_comes_back_down_after_a_failure():
    server = _server()
    with pytest.raises(RuntimeError):
        asyncio.run(server._batched(FakeBatchMethod(fail=True), ["a"]))
    assert server.in_flight == 0
    fn = FakeBatchMethod()
    assert asyncio.run(server._batched(fn, ["b"])) == ["direct b"]


def test_colocate_needs_exactly_one_model(tmp_path, monkeypatch, no_ray):
    from cluster.registry import RegistryError
    from serve.app import build_app
    from serve.options import AppArgs

    one, two = {"name": "gpt"}, {"name": "cls"}
    assert AppArgs().colocated_model([one, two]) is None
    assert AppArgs(colocate=True).colocated_model([one]) is one
    with pytest.raises(RegistryError, match=r"exactly one model, but 2 are selected \(gpt, cls\)"):
        AppArgs(colocate=True).colocated_model([one, two])
    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path / "empty"))
    with pytest.raises(RegistryError, match="but 0 are selected"):
        build_app({"colocate": True})


def test_replicas_that_cannot_all_start_are_named_before_serve_waits_for_them():
    # Found serving a registry of three models on the 2-core machine: their replicas took the
    # embedded Ray's 3 CPUs, the ingress never started, and `raylm serve run` waited without a word.
    from cluster.config import build
    from serve.app import resource_shortfall, start_reservations
    from serve.options import AppArgs

    three = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert start_reservations(AppArgs(), three) == [("Gateway", 0.1, 0.0), ("model-a", 1.0, 0.0),
                                                    ("model-b", 1.0, 0.0), ("model-c", 1.0, 0.0)]
    short = resource_shortfall(AppArgs(), three, {"CPU": 3.0})
    assert short.startswith("the app needs 3.1 CPUs to start its replicas (Gateway 0.1, model-a 1, model-b 1, "
                            "model-c 1), but Ray has 3: "), short
    assert "--set model.num_cpus=" in short and "--set models=[NAME,...]" in short
    assert resource_shortfall(build(AppArgs, {"model": {"num_cpus": 0.5}}), three, {"CPU": 3.0}) is None
    # an autoscaled deployment starts with min_replicas; a colocated model is the only deployment
    scaled = build(AppArgs, {"per_model": {"a": {"autoscaling": {"min_replicas": 0, "max_replicas": 4}}}})
    assert ("model-a", 0.0, 0.0) in start_reservations(scaled, three)
    assert start_reservations(build(AppArgs, {"colocate": True}), three[:1]) == [("model-a", 1.0, 0.0)]
    gpu = build(AppArgs, {"model": {"num_gpus": 0.5, "num_cpus": 0.5}})
    assert resource_shortfall(gpu, three, {"CPU": 4.0}).startswith(
        "the app needs 1.5 GPUs to start its replicas (model-a 0.5, model-b 0.5, model-c 0.5), but Ray has 0")
    assert resource_shortfall(gpu, three, {"CPU": 4.0, "GPU": 2.0}) is None


def test_multiplexed_models_reserve_one_shared_deployment_and_bad_combinations_are_refused(tmp_path):
    from cluster.config import ConfigError, build
    from cluster.registry import RegistryError
    from serve.app import resource_shortfall, select_models, start_reservations
    from serve.options import AppArgs

    three = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    shared = build(AppArgs, {"multiplex": {"models": "b,c", "options": {"num_replicas": 2, "num_cpus": 0.5}}})
    assert start_reservations(shared, three) == [("Gateway", 0.1, 0.0), ("model-a", 1.0, 0.0),
                                                 ("multiplexed", 1.0, 0.0)]
    assert resource_shortfall(shared, three, {"CPU": 2.1}) is None  # one deployment each would need 3.1
    assert "--set multiplex.models=[NAME,...]" in resource_shortfall(AppArgs(), three, {"CPU": 2.1})
    runtime = shared.model_runtime(None)
    assert runtime["max_models_per_replica"] == 3 and runtime["num_cpus"] == 0.5 and runtime["max_tokens"] == 512
    for bad, message in (({"multiplex": {"models": "a"}, "colocate": True}, "cannot be combined with multiplex"),
                         ({"multiplex": {"models": "a"}, "per_model": {"a": {"num_cpus": 2}}},
                          "per_model ['a']: multiplexed models share one deployment"),
                         ({"multiplex": {"models": "a", "max_models_per_replica": 0}}, "max_models_per_replica"),
                         ({"multiplex": {"models": "a", "options": {"replicas": 2}}}, "'replicas': unknown key")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build(AppArgs, bad)
    with pytest.raises(RegistryError, match=re.escape("multiplex.models ['x'] are not among the served models (none)")):
        select_models(build(AppArgs, {"registry": str(tmp_path), "multiplex": {"models": "x"}}))


@pytest.mark.parametrize(("cls", "extra", "param"), [
    (CompletionRequest, {"logprobs": 0}, "logprobs"),
    (CompletionRequest, {"echo": True}, "echo"),
    (CompletionRequest, {"suffix": "end"}, "suffix"),
    (CompletionRequest, {"presence_penalty": 0.5}, "presence_penalty"),
    (CompletionRequest, {"logit_bias": {"5": 10}}, "logit_bias"),
    (CompletionRequest, {"best_of": 3, "n": 2}, "best_of"),
    (ChatCompletionRequest, {"logprobs": True}, "logprobs"),
    (ChatCompletionRequest, {"frequency_penalty": -1}, "frequency_penalty"),
    (ChatCompletionRequest, {"tools": [{"type": "function"}]}, "tools"),
    (ChatCompletionRequest, {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_parameters_that_change_the_answer_are_refused_by_name(cls, extra, param):
    base = {"prompt": "x"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ApiError) as exc:
        cls.model_validate({"model": "m", **base, **extra})
    assert (exc.value.status, exc.value.param, exc.value.code) == (400, param, "unsupported_parameter")


def test_those_parameters_set_to_off_and_newer_names_are_accepted():
    off = {"logprobs": None, "echo": False, "suffix": "", "presence_penalty": 0, "frequency_penalty": 0.0,
           "logit_bias": {}, "best_of": 2, "n": 2, "user": "u", "stream_options": {"include_usage": True}}
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", **off})
    assert req.n == 2 and req.stream_options.include_usage
    chat = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": False, "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "max_tokens": 50, "max_completion_tokens": 7})
    assert chat.sampling()["max_tokens"] == 7 and chat.stream_options is None


def test_only_the_ingress_writes_an_access_line_per_request_by_default(no_ray):
    """Serve's access log: the ingress's line per HTTP request stays; a model replica's line per call
    repeated it (without it, classification under load ran ~12% faster). A colocated model is the
    ingress, and logs as the ingress does; either can be switched."""
    from cluster.config import build
    from serve.app import build_app
    from serve.options import AppArgs

    def access_logs(app) -> dict[str, bool]:
        ingress = app._bound_deployment
        found = {ingress.name: ingress._deployment_config.logging_config["enable_access_log"]}
        for model in ingress.init_args[0].values():
            found[model._bound_deployment.name] = model._bound_deployment._deployment_config.logging_config[
                "enable_access_log"]
        return found

    entries = [{"name": "gpt", "task": "generation", "path": "/nowhere"},
               {"name": "cls", "task": "classification", "path": "/nowhere"}]
    assert access_logs(build_app({}, entries)) == {"Gateway": True, "model-gpt": False, "model-cls": False}
    switched = {"ingress": {"access_log": False}, "per_model": {"cls": {"access_log": True}}}
    assert access_logs(build_app(switched, entries)) == {"Gateway": False, "model-gpt": False, "model-cls": True}
    assert access_logs(build_app({"colocate": True}, entries[:1])) == {"model-gpt": True}
    assert access_logs(build_app({"colocate": True, "ingress": {"access_log": False}}, entries[:1])) == {
        "model-gpt": False}
    assert build(AppArgs, {}).model.access_log is False and build(AppArgs, {}).ingress.access_log is True
