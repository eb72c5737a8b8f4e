"""Hostile input: the Serve API fuzzed from its own OpenAPI schema, corpus files that are broken on
purpose, a re-prepare that fails over a good corpus, and a registry model whose weights were
corrupted after publishing."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from bench.drills.common import REPO, Finding


def fuzz_api(base_url: str, examples: int, seed: int = 0, min_cases: int = 0) -> list[Finding]:
    """schemathesis generates requests for every operation from /openapi.json (valid and invalid
    bodies; `model` is an enum of the served models there, so valid ones reach the engines); the
    check is Serve never answering 5xx, with at least `min_cases` requests, every route tested and
    every model route answered 200 at least once. Afterwards the server must still answer."""
    report = os.path.join(tempfile.mkdtemp(prefix="raylm-fuzz-"), "report.ndjson")
    cmd = [os.path.join(os.path.dirname(sys.executable), "st"), "run", f"{base_url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", str(seed),
           "--request-timeout", "60", "--report-ndjson-path", report, "--no-color", "--generation-database", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    statuses = _fuzz_statuses(report)
    cases, server_errors = len(statuses), sum(status >= 500 for _, _, status in statuses)
    routes = sorted({path for _, path, _ in statuses})
    answered = {path: sum(m == "POST" and p == path and 200 <= st < 300 for m, p, st in statuses)
                for path in routes if path.startswith("/v1/") and path != "/v1/models"}
    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    health = httpx.get(f"{base_url}/healthz", timeout=30).status_code
    models = httpx.get(f"{base_url}/v1/models", timeout=30)
    alive = health == 200 and models.status_code == 200
    failures = "" if proc.returncode == 0 else proc.stdout[-1500:]
    covered = set(routes) == set(spec["paths"]) and all(answered.values()) and cases >= min_cases
    reached = sum(answered.values())
    return [
        Finding("fuzz the Serve API (schemathesis, OpenAPI)", f"{server_errors} responses 5xx in {cases} generated "
                f"requests over {len(routes)} routes; {reached} answered 200 by a model",
                f"0 5xx; >= {min_cases} requests; every route, each model route answered",
                server_errors == 0 and proc.returncode == 0 and covered,
                {"cases": cases, "server_errors": server_errors, "schemathesis_rc": proc.returncode,
                 "answered_by_route": answered, "untested_routes": sorted(set(spec["paths"]) - set(routes)),
                 "failures": failures}),
        Finding("fuzz the Serve API (schemathesis, OpenAPI)", f"server alive after: /healthz {health}, /v1/models "
                f"{models.status_code}", "alive", alive),
    ]


def _fuzz_statuses(report: str) -> list[tuple[str, str, int]]:
    """(method, path, response status) of every request in schemathesis's ndjson event log: each
    finished scenario records its cases (method and path) and their interactions (the response)."""
    out: list[tuple[str, str, int]] = []
    if not os.path.exists(report):
        return out
    for line in open(report, encoding="utf-8"):
        recorder = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        cases = recorder.get("cases", {})
        for case_id, interaction in recorder.get("interactions", {}).items():
            case, response = cases.get(case_id, {}).get("value", {}), interaction.get("response") or {}
            if isinstance(response.get("status_code"), int):
                out.append((case.get("method", ""), case.get("path", ""), response["status_code"]))
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


def failed_reprepare(workdir: str) -> list[Finding]:
    """A corpus prepared, then prepared again under its name by two runs that fail: one whose source
    breaks partway (a truncated gzip among the good files, found by Ray Data's read) and one whose
    storage fails after every new shard is written. The name must still open the first corpus whole
    (same manifest, every shard's sha256, Ray Data reading all its rows), with no build folder left."""
    from unittest import mock

    from cluster.config import build
    from cluster.data.corpus import Corpus
    from cluster.stages import prepare as stage

    d = os.path.join(workdir, "reprepare-src")
    os.makedirs(d, exist_ok=True)
    _good(d)
    cfg = build(stage.PrepareConfig, {"name": "drill-keep", "sources": [{"kind": "files", "paths": [d]}],
                                      "tokenizer": {"vocab_size": 300}, "split": {"validation_fraction": 0.2}})
    stage.prepare(cfg, root=workdir)
    before = Corpus.open(cfg.name, workdir)

    def storage_fails(local: str, dest: str) -> None:
        raise PermissionError(f"drill: storage refused '{dest}'")

    def fails() -> str:
        try:
            stage.prepare(cfg, root=workdir)
            return "the re-prepare did not fail"
        except Exception as exc:  # the failure is the drill; what it says is reported
            return f"{type(exc).__name__}: {str(exc).replace(workdir, '')[:120]}"

    truncated = os.path.join(d, "truncated.jsonl.gz")
    raw = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 5}).encode() + b"\n" for i in range(2000)))
    with open(truncated, "wb") as f:
        f.write(raw[: len(raw) // 2])
    errors = {"source": fails()}
    os.remove(truncated)
    with mock.patch.object(stage, "_upload_tokenizer", storage_fails):
        errors["storage"] = fails()
    return [_kept_finding(cfg.name, workdir, before, errors)]


def _kept_finding(name: str, workdir: str, before: Any, errors: dict[str, str]) -> Finding:
    """Whether the name still opens `before` whole after the failed runs, and nothing of theirs is left."""
    import hashlib

    from cluster.data.corpus import Corpus
    from cluster.data.ingest import read_parquet

    after = Corpus.open(name, workdir)
    same = (after.path, after.manifest) == (before.path, before.manifest)
    shards = after.manifest["shards"]
    verified = sum(hashlib.sha256(open(os.path.join(after.path, s["file"]), "rb").read()).hexdigest() == s["sha256"]
                   for s in shards)
    rows = read_parquet(after.shard_paths("train")).count()
    leftovers = [e for e in os.listdir(os.path.dirname(after.path)) if e.startswith(f".{name}.")]
    whole = same and verified == len(shards) and rows == after.split_info("train")["rows"]
    failed = not any("did not fail" in e for e in errors.values())
    return Finding("failed re-prepare keeps the previous corpus",
                   f"2 failed re-prepares (source breaks partway; storage fails after the shards): previous corpus "
                   f"{'intact' if whole else 'DAMAGED'} ({verified}/{len(shards)} shards verified, {rows} train rows "
                   f"read), {len(leftovers)} leftovers", "the name opens the previous corpus whole; nothing of the "
                   "failed runs left", whole and failed and not leftovers,
                   {"errors": errors, "same_manifest": same, "leftovers": leftovers})


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


# ---------------------------------------------------------------- concurrent publish

# One publish in its own process, released with the others by the file `go`; prints its version's path.
_PUBLISH = """
import os, sys, time
from cluster import registry
checkpoint, name, root, sweep_id, go = sys.argv[1:6]
open(go + "." + sweep_id, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
t0 = time.monotonic()
path = registry.publish(checkpoint, name, None, sweep_id=sweep_id, force=True, root=root)
print(round(time.monotonic() - t0, 2), path, flush=True)
"""


def _publish_together(checkpoint: str, root: str, ids: list[str], go: str) -> list[tuple[int, str, str]]:
    """One publishing process per id, all released at once; (exit code, stdout, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISH, checkpoint, "race", root, i, go], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in ids]
    for _ in range(6000):  # until every process has imported raylm and waits (at most ~60 s)
        if all(os.path.exists(f"{go}.{i}") for i in ids) or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    open(go, "w").close()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append((p.returncode, stdout, stderr))
    return out


def concurrent_publish(workdir: str, checkpoint: str, rounds: int = 3) -> list[Finding]:
    """Two processes publish one registry name at the same moment, `rounds` times: every publish must
    succeed with its own complete version, the pointer must be one whole version's model.json, and
    every version's weights must match their recorded sha256 (registry.verify)."""
    from cluster import registry, registry_versions

    root = os.path.join(workdir, "race-registry")
    ids = [f"round{r}-process{p}" for r in range(rounds) for p in (1, 2)]
    results = []
    for r in range(rounds):
        results += _publish_together(checkpoint, root, ids[2 * r: 2 * r + 2], os.path.join(workdir, f"race-go-{r}"))
    failed = [err.strip().splitlines()[-1][:200] for rc, _, err in results if rc]
    seconds = [float(out.split()[0]) for rc, out, _ in results if not rc]
    complete = [v for v in registry.list_versions("race", root) if v["complete"]]
    current = registry.find("race", root)
    consistent = current is not None and current == registry.entry_at(current["path"])
    problems = registry.verify("race", root)
    lock_left = os.path.exists(os.path.join(root, "race", registry_versions.LOCK))
    intact = sorted(v.get("sweep_id") for v in complete) == sorted(ids) and not problems
    figure = (f"{len(ids) - len(failed)} of {len(ids)} publishes succeeded; {len(complete)} versions, "
              f"{'all intact' if intact else 'NOT intact'}; pointer {'= version ' + str(current['version']) if consistent else 'INCONSISTENT'}"
              f"; lock {'LEFT BEHIND' if lock_left else 'released'}")
    return [Finding("concurrent publish (two processes, one name)", figure,
                    "every publish succeeds, one consistent pointer, every version intact",
                    not failed and consistent and intact and len(complete) == len(ids) and not lock_left,
                    {"failed": failed, "publish_seconds": seconds, "problems": problems,
                     "current": current and current["version"]})]
