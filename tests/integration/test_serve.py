"""The Serve app end to end on the shared local Ray: tiny models of every task are published to
the session registry, deployed, and called over HTTP (the official `openai` client included)."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from cluster.runtime import free_ports

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = {"num_cpus": 0.25}  # the shared 2-core machine fits every replica


@pytest.fixture(scope="module")
def served(ray_session, storage_root, tmp_path_factory):
    from ray import serve

    from serve import tiny
    from serve.app import build_app

    tiny.publish_all(str(tmp_path_factory.mktemp("ckpts")))
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": {**SMALL, "max_batch_size": 4}, "ingress": {"num_cpus": 0.05}, "max_tokens": 64,
            "max_body_bytes": 4096,
            # a batch wait far beyond any request's time: see test_an_idle_replica_does_not_hold_a_request;
            # bert-tag computes in a worker thread, the others on their replica's event loop
            "per_model": {"bert-mlm": {"batch_wait_timeout_s": 30.0}, "bert-tag": {"compute_in_thread": True}}}
    serve.run(build_app(args), name="raylm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served, timeout=120) as c:
        yield c


def _is_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def _ok_completion(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-tiny", "prompt": "the cat", "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_the_http_port_is_haproxy_forwarding_to_the_ingress_replica(served):
    """The embedded Ray runs Serve behind HAProxy (cluster.runtime.SERVE_ENV): the port clients use
    belongs to an haproxy process, not to Serve's Python proxy, and requests still reach the app."""
    import psutil

    port = int(served.rsplit(":", 1)[1])
    owners = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    assert owners == {"haproxy"}, owners
    assert httpx.get(f"{served}/v1/models", timeout=30).status_code == 200
    # the free stats/metrics ports the embedded Ray chose stay with it, not with this process's children
    assert not {"RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"} & set(os.environ)


def test_openai_client(served):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in oai.models.list().data} == {"gpt-tiny", "bert-mlm", "bert-cls", "bert-tag"}

    done = oai.completions.create(model="gpt-tiny", prompt="the cat sat", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 5
    again = oai.completions.create(model="gpt-tiny", prompt="the cat sat", max_tokens=5, temperature=0)
    assert again.choices[0].text == done.choices[0].text  # greedy is deterministic

    seeded = [oai.completions.create(model="gpt-tiny", prompt="a dog", max_tokens=6, temperature=1.0, seed=7,
                                     n=2).choices for _ in range(2)]
    assert len(seeded[0]) == 2 and [c.text for c in seeded[0]] == [c.text for c in seeded[1]]

    chat = oai.chat.completions.create(model="gpt-tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=4)
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 0

    chunks = list(oai.completions.create(model="gpt-tiny", prompt="the dog", max_tokens=6, temperature=0,
                                         stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == oai.completions.create(model="gpt-tiny", prompt="the dog", max_tokens=6,
                                              temperature=0).choices[0].text

    chat_chunks = list(oai.chat.completions.create(model="gpt-tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"

    # stream_options.include_usage: a last chunk with no choices carries the usage of the whole stream
    # (n=2: both choices' tokens, the prompt's once), as the same request answers it unstreamed
    ask = {"model": "gpt-tiny", "prompt": "the dog", "max_tokens": 6, "temperature": 0, "n": 2}
    chunks = list(oai.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage == oai.completions.create(**ask).usage
    chat_chunks = list(oai.chat.completions.create(model="gpt-tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chat_chunks[-1].choices == [] and 0 < chat_chunks[-1].usage.completion_tokens <= 3

    # max_completion_tokens, the chat API's newer name for max_tokens, limits the answer
    hi = [{"role": "user", "content": "hello"}]
    capped = oai.chat.completions.create(model="gpt-tiny", messages=hi, max_completion_tokens=2, temperature=0)
    assert capped.usage.completion_tokens <= 2
    assert capped.choices[0].message.content == oai.chat.completions.create(
        model="gpt-tiny", messages=hi, max_tokens=2, temperature=0).choices[0].message.content

    from openai import BadRequestError

    with pytest.raises(BadRequestError) as refused:
        oai.completions.create(model="gpt-tiny", prompt="the cat", max_tokens=2, logprobs=2)
    assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == "logprobs"


def test_stream_ends_with_done(client):
    r = client.post("/v1/completions", json={"model": "gpt-tiny", "prompt": "a", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_encoder_tasks(client):
    from serve.tiny import CLASS_LABELS, TAG_LABELS

    r = client.post("/v1/fill-mask", json={"model": "bert-mlm", "inputs": ["the [MASK] sat.", "a [MASK] [MASK]"],
                                           "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [len(masks) for masks in results] == [1, 2]
    assert len(results[0][0]["predictions"]) == 3

    r = client.post("/v1/classify", json={"model": "bert-cls", "inputs": "good day"})
    assert r.status_code == 200, r.text
    one = r.json()["results"][0]
    assert one["label"] in CLASS_LABELS and {s["label"] for s in one["scores"]} == set(CLASS_LABELS)
    assert abs(sum(s["score"] for s in one["scores"]) - 1) < 1e-4
    r = client.post("/v1/classify", json={"model": "bert-cls",
                                          "inputs": [{"text": "the cat", "text_pair": "a dog"}, "bad night"]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2

    text = "Alice sat in Paris near London."
    r = client.post("/v1/tag", json={"model": "bert-tag", "inputs": text})
    assert r.status_code == 200, r.text
    kinds = {lbl.split("-", 1)[-1] for lbl in TAG_LABELS if lbl != "O"}
    for ent in r.json()["results"][0]:
        assert ent["label"] in kinds and text[ent["start"]:ent["end"]] == ent["text"]


@pytest.mark.parametrize(("path", "model", "texts"), [
    ("/v1/classify", "bert-cls", ["good day", "bad night", "the cat sat", "rain in Paris", "a dog", "so so"]),
    ("/v1/tag", "bert-tag", ["Alice sat in Paris.", "Bob met Carol in London.", "rain", "Dave of Acme ran."]),
])
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served, client, path, model, texts):
    """Requests sent at once share batches (on the event loop for bert-cls, in a worker thread for
    bert-tag) and each gets the answer it gets alone, padding notwithstanding."""
    alone = {}
    for t in texts:
        r = client.post(path, json={"model": model, "inputs": t})
        assert r.status_code == 200, r.text
        alone[t] = r.json()["results"][0]
    answers: list[tuple[str, httpx.Response]] = []

    def send(t: str) -> None:
        with httpx.Client(base_url=served, timeout=60) as c:
            answers.append((t, c.post(path, json={"model": model, "inputs": t})))

    threads = [threading.Thread(target=send, args=(t,)) for t in texts * 2]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(answers) == 2 * len(texts)
    for t, r in answers:
        assert r.status_code == 200, r.text
        got, want = r.json()["results"][0], alone[t]
        if model == "bert-cls":
            assert got["label"] == want["label"]
            assert [s["score"] for s in got["scores"]] == pytest.approx([s["score"] for s in want["scores"]], abs=1e-4)
        else:
            assert [(e["label"], e["start"], e["end"]) for e in got] == [(e["label"], e["start"], e["end"]) for e in want]


BAD_BODIES = [
    ("/v1/completions", {"model": "gpt-tiny"}, 422),  # missing prompt
    ("/v1/completions", {"prompt": "hi"}, 422),  # missing model
    ("/v1/completions", {"model": "gpt-tiny", "prompt": 5}, 422),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "temperature": "hot"}, 422),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "max_tokens": -1}, 400),  # a bound: 400 naming it
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "max_tokens": 10**12}, 400),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "seed": 2**64}, 400),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "top_p": 1e-300, "temperature": 1, "stream": True}, 200),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "max_tokens": 100}, 400),  # over the cap
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "the " * 100, "max_tokens": 60}, 400),  # context
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "  "}, 400),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "stream": True, "max_tokens": 100}, 400),
    ("/v1/chat/completions", {"model": "gpt-tiny", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "gpt-tiny", "messages": [{"role": "robot", "content": "x"}]}, 422),
    # OpenAI parameters that would change the answer's meaning are refused, not ignored
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "echo": True, "logprobs": 1}, 400),
    ("/v1/completions", {"model": "gpt-tiny", "prompt": "hi", "best_of": 3}, 400),
    ("/v1/chat/completions", {"model": "gpt-tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("/v1/classify", {"model": "gpt-tiny", "inputs": "hi"}, 400),  # wrong task
    ("/v1/classify", {"model": "bert-cls", "inputs": []}, 400),
    ("/v1/classify", {"model": "bert-cls", "inputs": {"txt": "x"}}, 422),
    ("/v1/fill-mask", {"model": "bert-mlm", "inputs": "no mask here"}, 400),
    ("/v1/fill-mask", {"model": "bert-mlm", "inputs": "[MASK]", "top_k": 0}, 400),
    ("/v1/fill-mask", {"model": "bert-mlm", "inputs": "[MASK]", "top_k": 21}, 400),  # over max_top_k
    ("/v1/tag", {"model": "bert-tag", "inputs": "word " * 100}, 400),  # longer than the context
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_BODIES)
def test_bad_request_then_good(client, path, body, status):
    if status == 200:  # found by the fuzz drill: a top_p that underflows float32 was a 500
        assert client.post(path, json=body).status_code == 200
    else:
        _is_error(client.post(path, json=body), status)
    _ok_completion(client)


def test_bad_raw_bodies(client):
    headers = {"content-type": "application/json"}
    assert _is_error(client.post("/v1/completions", content=b"{not json", headers=headers), 422)["code"]
    _is_error(client.post("/v1/completions", content=b"x" * 10_000, headers=headers), 413)
    big = json.dumps({"model": "gpt-tiny", "prompt": "a " * 5000})

    def chunks():  # no Content-Length: the size of what arrives is checked
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000].encode()

    _is_error(client.post("/v1/completions", content=chunks(), headers=headers), 413)
    _is_error(client.get("/v1/nothing"), 404)
    _ok_completion(client)


def test_openapi_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/fill-mask", "/v1/classify", "/v1/tag"):
        assert path in spec["paths"]
    assert "CompletionRequest" in spec["components"]["schemas"]


def test_api_key(served, monkeypatch):
    from ray import serve

    from serve.app import build_app

    monkeypatch.setenv("RAYLM_API_KEY", "s3cret")
    serve.run(build_app({"models": [], "ingress": {"num_cpus": 0.05}}), name="secure", route_prefix="/secure")
    with httpx.Client(base_url=f"{served}/secure", timeout=60) as c:
        assert c.get("/healthz").status_code == 200
        assert _is_error(c.get("/v1/models"), 401)["type"] == "authentication_error"
        _is_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        r = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["data"] == []
    serve.delete("secure")


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in status.replica_states.items() if state in ("RUNNING", "STARTING"))


def test_autoscaling(served):
    from ray import serve

    from serve.app import build_app

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                   "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    args = {"models": ["gpt-tiny"], "ingress": {"num_cpus": 0.05},
            "model": {**SMALL, "autoscaling": autoscaling, "max_batch_size": 1}}
    serve.run(build_app(args), name="scale", route_prefix="/scale")
    assert _replicas("scale", "model-gpt-tiny") == 1
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=f"{served}/scale", timeout=60) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": "gpt-tiny", "prompt": "the cat", "max_tokens": 32})

    workers = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for w in workers:
        w.start()
    deadline, peak = time.time() + 60, 1
    try:
        while time.time() < deadline and peak < 2:
            peak = max(peak, _replicas("scale", "model-gpt-tiny"))
            time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    assert peak == 2, "sustained load did not add a replica"
    deadline = time.time() + 45
    while time.time() < deadline and _replicas("scale", "model-gpt-tiny") > 1:
        time.sleep(1)
    assert _replicas("scale", "model-gpt-tiny") == 1, "idle did not remove the extra replica"
    serve.delete("scale")


def test_full_queue_answers_429_with_retry_after(served):
    """max_queued_requests bounds a model's queue: overflow gets a 429 in the OpenAI error shape
    with Retry-After, never a 500, and the deployment keeps answering afterwards."""
    import concurrent.futures

    from ray import serve

    from serve.app import build_app

    args = {"models": ["gpt-tiny"], "ingress": {"num_cpus": 0.05},
            "model": {**SMALL, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1}}
    serve.run(build_app(args), name="busy", route_prefix="/busy")
    body = {"model": "gpt-tiny", "prompt": "the cat", "max_tokens": 48, "temperature": 0}
    with httpx.Client(base_url=f"{served}/busy", timeout=120) as c:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(12)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
        busy = next(r for r in answers if r.status_code == 429)
        assert _is_error(busy, 429)["type"] == "rate_limit_error" and busy.headers["Retry-After"]
        assert c.post("/v1/completions", json=body).status_code == 200
    serve.delete("busy")


def test_colocated_model_answers_like_the_two_hop_app(served, client):
    """`colocate`: the one model runs inside the ingress replica, one deployment named for the
    model. Its answers (greedy, batched or not, streamed) are the two-hop app's, other models are
    unknown to it, and `serve.cli build` writes that single deployment."""
    import concurrent.futures

    from ray import serve

    from serve.app import build_app
    from serve.cli import config_for

    args = {"models": ["gpt-tiny"], "colocate": True, "model": {**SMALL, "max_batch_size": 4}, "max_tokens": 64}
    serve.run(build_app(args), name="colo", route_prefix="/colo")
    try:
        assert set(serve.status().applications["colo"].deployments) == {"model-gpt-tiny"}
        prompts = ["the cat", "a dog sat", "rain in", "Alice met", "the", "Paris is"]

        def body(p: str, **kw) -> dict:
            return {"model": "gpt-tiny", "prompt": p, "max_tokens": 6, "temperature": 0, **kw}

        want = {p: client.post("/v1/completions", json=body(p)).json()["choices"][0]["text"] for p in prompts}
        with httpx.Client(base_url=f"{served}/colo", timeout=120) as c:
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(lambda p: c.post("/v1/completions", json=body(p)), prompts * 2))
            for p, r in zip(prompts * 2, got, strict=True):
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want[p]
            r = c.post("/v1/completions", json=body("the cat", stream=True))
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            assert r.text.rstrip().endswith("data: [DONE]")
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == want["the cat"]
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["gpt-tiny"]
            assert _is_error(c.post("/v1/classify", json={"model": "bert-cls", "inputs": "a"}), 404)["code"] == \
                "model_not_found"
            _is_error(c.post("/v1/completions", json=body("the cat", max_tokens=65)), 400)
    finally:
        serve.delete("colo")
    config = config_for(["colocate=true", "models=[gpt-tiny]"], host="127.0.0.1")  # loopback: no key needed
    assert [d["name"] for d in config["applications"][0]["deployments"]] == ["model-gpt-tiny"]


def test_multiplexed_models_share_one_replica_and_each_answers_as_itself(served, client):
    """`multiplex`: three models of three tasks share one deployment of one replica that keeps one
    model loaded at a time, so nearly every request below unloads one and loads another. Each
    answer, in turn and concurrently, streamed too, is the one the app with a deployment per model
    gives; a model outside the shared set keeps its own deployment."""
    import concurrent.futures

    from ray import serve

    from serve.app import build_app
    from serve.cli import config_for

    shared = ["bert-cls", "bert-tag", "gpt-tiny"]
    args = {"models": ["bert-mlm", *shared], "ingress": {"num_cpus": 0.05}, "max_tokens": 64,
            "model": {**SMALL, "max_batch_size": 4},
            "multiplex": {"models": shared, "max_models_per_replica": 1, "options": {"num_replicas": 1}}}
    serve.run(build_app(args), name="mux", route_prefix="/mux")
    calls = [("/v1/classify", {"model": "bert-cls", "inputs": ["good day", "bad night"]}),
             ("/v1/tag", {"model": "bert-tag", "inputs": "Alice sat in Paris near London."}),
             ("/v1/completions", {"model": "gpt-tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0}),
             ("/v1/fill-mask", {"model": "bert-mlm", "inputs": "the [MASK] sat.", "top_k": 2})]

    def answer(c: httpx.Client, path: str, body: dict) -> object:
        r = c.post(path, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0]["text"] if path == "/v1/completions" else out["results"]

    try:
        assert set(serve.status().applications["mux"].deployments) == {"Gateway", "model-bert-mlm", "multiplexed"}
        want = [answer(client, path, body) for path, body in calls]
        with httpx.Client(base_url=f"{served}/mux", timeout=120) as c:
            for i in [0, 1, 2, 0, 2, 1, 3, 0]:
                assert answer(c, *calls[i]) == want[i], calls[i]
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                got = list(pool.map(lambda i: answer(c, *calls[i]), [0, 1, 2, 3] * 3))
            assert got == want * 3
            r = c.post("/v1/completions", json={**calls[2][1], "stream": True})
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == want[2]
            assert _is_error(c.post("/v1/tag", json={"model": "bert-cls", "inputs": "a"}), 400)["code"] == "wrong_task"
            assert _is_error(c.post("/v1/tag", json={"model": "nope", "inputs": "a"}), 404)["code"] == "model_not_found"
    finally:
        serve.delete("mux")
    config = config_for(["models=[bert-mlm,bert-cls,bert-tag]", "multiplex.models=[bert-cls,bert-tag]"],
                        host="127.0.0.1")
    assert [d["name"] for d in config["applications"][0]["deployments"]] == ["Gateway", "model-bert-mlm",
                                                                             "multiplexed"]


def test_fuzzed_requests_never_get_a_5xx(served):
    """schemathesis, from the app's own OpenAPI schema (`model` an enum of the served models), a
    few examples per operation over every route, each model route answered 200 at least once (the
    drill sends at least 2,000 requests: `make drills`)."""
    from bench.drills.hostile import fuzz_api

    findings = fuzz_api(served, examples=10, min_cases=300)
    assert all(f.passed for f in findings), [(f.figure, f.detail) for f in findings]
    answered = findings[0].detail["answered_by_route"]
    assert set(answered) == {"/v1/completions", "/v1/chat/completions", "/v1/fill-mask", "/v1/classify", "/v1/tag"}
    assert findings[0].detail["untested_routes"] == []


def test_api_key_guards_every_route(served, monkeypatch):
    from ray import serve

    from bench.drills.security import api_key
    from serve.app import build_app

    monkeypatch.setenv("RAYLM_API_KEY", "s3cret")
    serve.run(build_app({"models": ["bert-cls"], "model": SMALL, "ingress": {"num_cpus": 0.05}}), name="guarded",
              route_prefix="/guarded")
    findings = api_key(f"{served}/guarded", "s3cret")
    serve.delete("guarded")
    assert all(f.passed for f in findings), [(f.figure, f.detail) for f in findings]


def test_an_idle_replica_does_not_hold_a_request_for_the_batch_wait(client):
    """bert-mlm is served with a 30 s batch wait: Serve's batcher would hold each batch's first
    request that long for company, but a request that finds the replica idle starts at once
    (the client gives up after 10 s). The wait applies only while other requests are in the replica."""
    body = {"model": "bert-mlm", "inputs": "the [MASK] sat."}
    for _ in range(3):
        r = client.post("/v1/fill-mask", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]


def test_a_killed_replica_is_replaced_and_the_model_answers_again(client):
    """A model replica's process dies (as on a lost node): Serve's health check notices, a new
    replica starts from the registry, and the endpoint answers again without a redeploy."""
    import ray

    from bench.drills.serve_load import _running_replicas
    from serve.tiny import CLASS_LABELS

    prefix = "SERVE_REPLICA::raylm#model-bert-cls#"

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}

    def running() -> int:
        return _running_replicas("raylm", "model-bert-cls")

    before = replicas()
    assert len(before) == 1 and running() == 1
    ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline and not (replicas() - before and running() == 1):
        time.sleep(0.5)
    assert replicas() - before and running() == 1, "no new replica took the killed one's place"
    r = client.post("/v1/classify", json={"model": "bert-cls", "inputs": "a good day"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["label"] in CLASS_LABELS
