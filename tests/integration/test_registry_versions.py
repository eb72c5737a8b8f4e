"""Registry versions under a running Serve app, on the shared local Ray: a republish of the served
model leaves the deployment answering as before, and a replica started after it (the old one killed)
loads the version the app was built with, while an app built after the republish serves the new one."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from cluster import registry
from cluster.runtime import free_ports
from tests.registry_helpers import reweighted

pytestmark = pytest.mark.filterwarnings("ignore")

NAME = "pinned-gpt"
ARGS = {"models": [NAME], "model": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.05}}
ASK = {"model": NAME, "prompt": "the cat sat on", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def serving(ray_session, tmp_path_factory):
    """(base URL, registry root, the second checkpoint), with version 1 of NAME served as app 'pinned'."""
    from ray import serve

    from serve import tiny
    from serve.app import build_app

    base = tmp_path_factory.mktemp("versions")
    root = str(base / "registry")
    first = tiny.save_gpt(str(base / "gpt"))
    second = reweighted(first, str(base / "gpt2"), seed=2)
    registry.publish(first, NAME, None, root=root)
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"registry": root, **ARGS}), name="pinned", route_prefix="/pinned")
    yield f"http://127.0.0.1:{port}", root, second
    serve.shutdown()


def _complete(client: httpx.Client, app: str) -> str:
    r = client.post(f"/{app}/v1/completions", json=ASK)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _replicas(app: str) -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#model-{NAME}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def test_a_deployment_survives_a_republish_and_its_new_replicas_load_the_pinned_version(serving):
    import ray
    from ray import serve

    from bench.drills.serve_load import _running_replicas
    from serve.app import build_app

    url, root, second = serving
    with httpx.Client(base_url=url, timeout=120) as client:
        pinned_text = _complete(client, "pinned")
        during: list[int] = []
        stop = threading.Event()

        def ask_meanwhile() -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    during.append(c.post("/pinned/v1/completions", json=ASK).status_code)

        asker = threading.Thread(target=ask_meanwhile, daemon=True)
        asker.start()
        try:
            v2 = registry.publish(second, NAME, None, force=True, root=root)
            time.sleep(1.0)
        finally:
            stop.set()
            asker.join(timeout=120)
        assert during and set(during) == {200}, during
        assert registry.load_entry(NAME, root)["path"] == v2

        # an app built now serves version 2, whose answer differs: the check below can tell them apart
        serve.run(build_app({"registry": root, **ARGS}), name="fresh", route_prefix="/fresh")
        assert _complete(client, "fresh") != pinned_text
        serve.delete("fresh")

        before = _replicas("pinned")
        assert len(before) == 1 and _running_replicas("pinned", f"model-{NAME}") == 1
        ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=True)
        deadline = time.time() + 90
        while time.time() < deadline and not (_replicas("pinned") - before
                                              and _running_replicas("pinned", f"model-{NAME}") == 1):
            time.sleep(0.5)
        assert _replicas("pinned") - before and _running_replicas("pinned", f"model-{NAME}") == 1, \
            "no new replica of the pinned version started after the republish"
        assert _complete(client, "pinned") == pinned_text  # version 1, loaded again from its own folder
