"""Who may call the API and where it may listen, and the replicas sized to the cluster, without Ray:
the key travels as its sha256 only, an open API on a non-loopback address is refused unless the
user says so, and an app whose replicas cannot all start fails in seconds instead of waiting."""

from __future__ import annotations

import hashlib
import types

import pytest
import yaml
from starlette.testclient import TestClient

from serve import cli
from serve.app import fit_to_cluster
from serve.guard import Guard, api_key_hash, exposure
from serve.options import AppArgs

KEY = "s3cret-key"
MODELS = [{"name": n, "task": "classification"} for n in ("a", "b", "c", "d")]


def test_an_open_api_is_refused_on_a_public_address_only():
    assert exposure("127.0.0.1", None, False) is None and exposure("localhost", None, False) is None
    assert exposure("::1", None, False) is None and exposure(None, None, False) is None
    for host in ("0.0.0.0", "10.1.2.3", "my-host"):
        assert "RAYLM_API_KEY" in exposure(host, None, False) and host in exposure(host, None, False)
    assert exposure("0.0.0.0", api_key_hash(KEY), False) is None
    assert exposure("0.0.0.0", None, True) is None


def _guarded(key_hash: str | None) -> TestClient:
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = types.SimpleNamespace(limits={"api_key_sha256": key_hash, "max_body_bytes": 4096})
    return TestClient(Guard(inner, state))


def test_the_guard_checks_the_key_against_its_hash():
    client = _guarded(hashlib.sha256(KEY.encode()).hexdigest())
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"bearer {KEY}"}):
        r = client.get("/v1/models", headers=header)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/healthz").status_code == 200  # health stays open
    assert _guarded(None).get("/v1/models").status_code == 200  # no key: open (and logged as such)


def test_serve_run_on_a_public_address_without_a_key_stops_before_ray(monkeypatch, capsys):
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    monkeypatch.setattr("cluster.runtime.connect", lambda *a, **k: pytest.fail("Ray was started"))
    assert cli.main(["run", "--host", "0.0.0.0"]) == 2
    assert "would listen on 0.0.0.0 with no API key" in capsys.readouterr().err


def test_built_configs_carry_the_keys_hash_never_the_key(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAYLM_STORAGE", str(tmp_path))  # an empty registry
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    assert cli.main(["build"]) == 2  # 0.0.0.0 by default: refused without a key
    assert "--allow-unauthenticated" in capsys.readouterr().err
    assert cli.main(["build", "--allow-unauthenticated"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"] == {"allow_unauthenticated": True}
    monkeypatch.setenv("RAYLM_API_KEY", KEY)
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert KEY not in out
    assert yaml.safe_load(out)["applications"][0]["args"] == {"api_key_sha256": api_key_hash(KEY)}


def test_replicas_share_cpus_when_one_each_does_not_fit():
    args = AppArgs()  # one CPU per model replica by default, 0.1 for the ingress
    fitted = fit_to_cluster(args, MODELS, {"CPU": 3.0})
    assert fitted.model.num_cpus == pytest.approx(0.72)  # (3 - 0.1) / 4, rounded down
    assert fit_to_cluster(args, MODELS[:2], {"CPU": 3.0}).model.num_cpus == 1.0  # fits as it is


def test_replicas_that_cannot_fit_fail_at_once_naming_each_need(monkeypatch):
    sized = AppArgs.model_validate({"model": {"num_cpus": 2}})  # the user's size is kept
    with pytest.raises(ValueError, match=r"needs 8\.1 CPUs .* but Ray has 3") as refused:
        fit_to_cluster(sized, MODELS, {"CPU": 3.0})
    assert "model-a 2" in str(refused.value) and "RAYLM_WAIT_FOR_RESOURCES" in str(refused.value)
    with pytest.raises(ValueError, match="GPUs"):
        fit_to_cluster(AppArgs.model_validate({"model": {"num_gpus": 1}}), MODELS, {"CPU": 8.0})
    monkeypatch.setenv("RAYLM_WAIT_FOR_RESOURCES", "1")  # an autoscaling cluster: wait for nodes
    assert fit_to_cluster(sized, MODELS, {"CPU": 3.0}).model.num_cpus == 2
