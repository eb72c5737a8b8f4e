"""Hostile input: the Serve API fuzzed from its own OpenAPI schema, corpus files that are broken on
purpose, and a registry model whose weights were corrupted after publishing."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import httpx

from bench.drills.common import Finding


def fuzz_api(base_url: str, examples: int, seed: int = 0) -> list[Finding]:
    """schemathesis generates requests for every operation from /openapi.json (valid and invalid
    bodies); the check is Serve never answering 5xx. Afterwards the server must still answer."""
    report = os.path.join(tempfile.mkdtemp(prefix="raylm-fuzz-"), "report.ndjson")
    cmd = [os.path.join(os.path.dirname(sys.executable), "st"), "run", f"{base_url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", str(seed),
           "--request-timeout", "60", "--report-ndjson-path", report, "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    cases, server_errors = _fuzz_counts(report)
    health = httpx.get(f"{base_url}/healthz", timeout=30).status_code
    models = httpx.get(f"{base_url}/v1/models", timeout=30)
    alive = health == 200 and models.status_code == 200
    failures = "" if proc.returncode == 0 else proc.stdout[-1500:]
    return [
        Finding("fuzz the Serve API (schemathesis, OpenAPI)", f"{server_errors} responses 5xx in {cases} generated "
                "requests", "0 5xx", server_errors == 0 and proc.returncode == 0,
                {"cases": cases, "server_errors": server_errors, "schemathesis_rc": proc.returncode,
                 "failures": failures}),
        Finding("fuzz the Serve API (schemathesis, OpenAPI)", f"server alive after: /healthz {health}, /v1/models "
                f"{models.status_code}", "alive", alive),
    ]


def _fuzz_counts(report: str) -> tuple[int, int]:
    """(requests sent, responses with a 5xx status) from schemathesis's ndjson event log."""
    cases = errors = 0
    if not os.path.exists(report):
        return 0, 0
    for line in open(report, encoding="utf-8"):
        for status in _statuses(json.loads(line)):
            cases += 1
            errors += status >= 500
    return cases, errors


def _statuses(node: Any) -> list[int]:
    """Every HTTP response status in an event (responses nest at varying depths in the report)."""
    out = []
    if isinstance(node, dict):
        response = node.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            out.append(response["status_code"])
        for key, value in node.items():
            if key != "response":
                out += _statuses(value)
    elif isinstance(node, list):
        for value in node:
            out += _statuses(value)
    return out


# ---------------------------------------------------------------- corpus files


def _good(d: str) -> None:
    with open(os.path.join(d, "good.jsonl"), "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"Document {i} is a perfectly ordinary piece of text about clusters."}) + "\n")


def _hostile_files(d: str) -> dict[str, str]:
    """name -> what is wrong with it."""
    with open(os.path.join(d, "binary.txt"), "wb") as f:
        f.write(b"\x00\x01\x02ELF\x00" * 2000)
    raw = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 5}).encode() + b"\n" for i in range(2000)))
    with open(os.path.join(d, "truncated.jsonl.gz"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    with open(os.path.join(d, "latin1.jsonl"), "wb") as f:
        f.write(b'{"text": "caf\xe9 au lait, a long enough line of text to be kept"}\n')
        f.write(json.dumps({"text": "a valid line of text that is long enough to be kept"}).encode() + b"\n")
    with open(os.path.join(d, "huge.jsonl"), "wb") as f:
        f.write(b'{"text": "' + b"x" * (17 * 2**20) + b'"}\n')
    return {"binary.txt": "binary file", "truncated.jsonl.gz": "truncated gzip",
            "latin1.jsonl": "invalid UTF-8", "huge.jsonl": "one 17 MiB line"}


def corpus_files(workdir: str) -> list[Finding]:
    """Each hostile file beside good ones: prepare either fails naming the file, or keeps going and
    counts the bad documents by reason, naming file and line; counts always reconcile."""
    from cluster.config import build
    from cluster.data.corpus import Corpus
    from cluster.errors import CorpusError
    from cluster.stages.prepare import PrepareConfig, prepare

    findings = []
    src = os.path.join(workdir, "hostile-src")
    os.makedirs(src, exist_ok=True)
    for name, what in _hostile_files(src).items():
        d = os.path.join(workdir, f"case-{name}")
        os.makedirs(d, exist_ok=True)
        _good(d)
        shutil.copy(os.path.join(src, name), d)
        cfg = build(PrepareConfig, {"name": f"drill-{name.split('.')[0]}",
                                    "sources": [{"kind": "files", "paths": [d]}],
                                    "tokenizer": {"vocab_size": 300}, "split": {"validation_fraction": 0.2}})
        named, reconciles, outcome = False, False, ""
        try:
            prepare(cfg, root=workdir)
            m = Corpus.open(os.path.join(workdir, "prepare", cfg.name)).manifest
            docs = m["documents"]
            reconciles = docs["in"] - sum(docs["dropped"].values()) == docs["after_weighting"]
            named = any(name in p for p in m["problems"])
            outcome = f"kept going: dropped {docs['dropped']}"
        except CorpusError as exc:
            named, reconciles = name in str(exc), True  # nothing written that looks complete
            manifest = os.path.join(workdir, "prepare", cfg.name, "manifest.json")
            reconciles = not os.path.exists(manifest)
            outcome = f"refused: {str(exc).replace(d + os.sep, '')[:110]}"
        findings.append(Finding("hostile corpus file", f"{what}: {outcome}", "named in the error or the manifest; "
                                "counts reconcile; no half-written corpus", named and reconciles,
                                {"file": name, "named": named, "reconciles": reconciles}))
    return findings


# ---------------------------------------------------------------- corrupted weights


def corrupted_weights(registry_root: str, checkpoint: str) -> list[Finding]:
    """A published model whose weights change on disk afterwards must not load: replicas check the
    digest recorded at publish, so the deployment fails and no request is ever answered by it."""
    from ray import serve

    from bench.drills.serve_load import deploy
    from cluster import registry
    from serve import engines

    path = registry.publish(checkpoint, "drill-corrupt", "classification", root=registry_root, force=True)
    weights = os.path.join(path, registry.WEIGHTS)
    data = bytearray(open(weights, "rb").read())
    data[-3] ^= 0x5A  # inside the last tensor: the safetensors header still parses
    open(weights, "wb").write(bytes(data))
    try:
        engines.load(registry.load_entry("drill-corrupt", registry_root))
        refused, message = False, "loaded"
    except registry.RegistryError as exc:
        refused, message = "does not match the sha256" in str(exc), str(exc)
    try:
        url = deploy(registry_root, "corrupt", {"models": ["drill-corrupt"], "model": {"num_cpus": 0.1},
                                                "ingress": {"num_cpus": 0.05}})
        r = httpx.post(f"{url}/v1/classify", json={"model": "drill-corrupt", "inputs": "hello"}, timeout=60)
        served = r.status_code == 200
    except Exception as exc:  # the app was refused: what it says must name the cause
        served = False
        message += f" | deploy: {type(exc).__name__}: {str(exc)[:200]}"
        refused = refused and "does not match the sha256" in str(exc)
    finally:
        if "corrupt" in serve.status().applications:
            serve.delete("corrupt")
    return [Finding("corrupted safetensors after publish", f"load {'refused' if refused else 'ACCEPTED'}, "
                    f"{'answered requests' if served else 'never served'}", "refused with a clear message, "
                    "never served", refused and not served, {"message": message[:400]})]
