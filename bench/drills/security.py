"""Security checks: the API key on every route but health, no pickle loaded from any checkpoint
(source scan, and a planted malicious `.bin` that must never run), the embedded dashboard on
loopback only."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys

import httpx

from bench.drills.common import REPO, Finding

SOURCES = ("cluster", "jobs", "tune", "serve")
PICKLE_MODULES = ("pickle", "cloudpickle", "dill", "joblib")


def _unsafe(call: ast.Call) -> str | None:
    """What is unsafe about this call, if anything: a pickle load (torch.load is acceptable only
    with weights_only=True), remote code, or weights allowed to come from pickle."""
    func = ast.unparse(call.func)
    kwargs = {k.arg: k.value for k in call.keywords if k.arg}

    def is_true(name: str) -> bool:
        return isinstance(kwargs.get(name), ast.Constant) and kwargs[name].value is True

    if func == "torch.load" and not is_true("weights_only"):
        return "torch.load without weights_only=True"
    if func.split(".")[0] in PICKLE_MODULES and func.split(".")[-1] in ("load", "loads"):
        return f"{func}"
    if is_true("trust_remote_code"):
        return "trust_remote_code=True"
    if isinstance(kwargs.get("use_safetensors"), ast.Constant) and kwargs["use_safetensors"].value is False:
        return "use_safetensors=False"
    return None


def scan_sources(root: str = REPO) -> list[str]:
    """'file:line: what' for every unsafe load in the package sources (parsed, not grepped)."""
    found = []
    for top in SOURCES:
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
                for node in ast.walk(tree):
                    what = _unsafe(node) if isinstance(node, ast.Call) else None
                    if what:
                        found.append(f"{os.path.relpath(path, root)}:{node.lineno}: {what}")
    return sorted(found)


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(checkpoint: str, workdir: str) -> list[Finding]:
    """A checkpoint carrying a malicious pytorch_model.bin next to its safetensors: publishing,
    serving and fine-tuning from it must never unpickle it; with only the .bin it is refused."""
    from cluster import registry
    from cluster.config import build
    from cluster.stages.finetune import FinetuneConfig, build_task_model
    from serve import engines

    marker = os.path.join(workdir, "pickle-was-executed")
    both = os.path.join(workdir, "planted-both")
    shutil.copytree(checkpoint, both, dirs_exist_ok=True)
    for name in ("pytorch_model.bin", "training_args.bin"):
        with open(os.path.join(both, name), "wb") as f:
            pickle.dump(_Marker(marker), f)
    root = os.path.join(workdir, "registry")
    path = registry.publish(both, "planted", "classification", root=root, force=True)
    copied = [n for n in os.listdir(path) if n.endswith(".bin")]
    engines.load(registry.load_entry("planted", root))
    cfg = build(FinetuneConfig, {"task": "classification", "model": {"checkpoint": both}})
    build_task_model(cfg, {"labels": ["a", "b"], "pad_id": 0}, both)
    only_bin = os.path.join(workdir, "planted-only")
    shutil.copytree(both, only_bin, dirs_exist_ok=True)
    os.remove(os.path.join(only_bin, "model.safetensors"))
    refused = []
    try:
        registry.publish(only_bin, "only-bin", "classification", root=root)
    except registry.RegistryError:
        refused.append("publish")
    try:
        build_task_model(cfg, {"labels": ["a", "b"], "pad_id": 0}, only_bin)
    except OSError:
        refused.append("fine-tune base")
    executed = os.path.exists(marker)
    return [
        Finding("no pickle from checkpoints", f"unsafe loads in the sources: {len(scan_sources())}", "0",
                not scan_sources(), {"found": scan_sources()}),
        Finding("no pickle from checkpoints", f"planted malicious .bin executed: {'yes' if executed else 'no'}; "
                f"copied to the registry: {copied or 'none'}; .bin-only checkpoint refused by {refused}",
                "never executed, never copied, refused", not executed and not copied and len(refused) == 2),
    ]


def api_key(base_url: str, key: str) -> list[Finding]:
    """Every operation in the app's OpenAPI schema, without the key and with a wrong one."""
    spec = httpx.get(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    answered = []
    checked = 0
    for path, ops in spec["paths"].items():
        for method in ops:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method.upper(), f"{base_url}{path}", headers=headers, json={}, timeout=30)
                checked += 1
                if r.status_code != 401 and not path.endswith("/healthz"):
                    answered.append(f"{method.upper()} {path} -> {r.status_code}")
    for path in ("/openapi.json", "/docs"):
        r = httpx.get(f"{base_url}{path}", timeout=30)
        checked += 1
        if r.status_code != 401:
            answered.append(f"GET {path} -> {r.status_code}")
    health = httpx.get(f"{base_url}/healthz", timeout=30).status_code
    return [Finding("API key (RAYLM_API_KEY set)", f"routes answering without a valid key: {len(answered)} of "
                    f"{checked} requests; /healthz {health}", "0 (health open)", not answered and health == 200,
                    {"answered": answered})]


def dashboard_loopback() -> list[Finding]:
    """A fresh embedded Ray (as every job starts it): which addresses its dashboard listens on."""
    script = (
        "import os, psutil, ray\n"
        "os.environ.pop('RAY_ADDRESS', None); os.environ['RAYLM_DASHBOARD'] = '1'\n"
        "from cluster import runtime\n"
        "runtime.connect()\n"
        "port = int(ray._private.worker.get_dashboard_url().rsplit(':', 1)[1])\n"
        "ips = sorted({c.laddr.ip for c in psutil.net_connections('inet') if c.status == 'LISTEN' and c.laddr.port == port})\n"
        "print('RESULT', port, ','.join(ips))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), "RESULT ? ")
    _, port, ips = line.split(" ", 2)
    addresses = [ip for ip in ips.split(",") if ip]
    ok = addresses == ["127.0.0.1"]
    return [Finding("embedded Ray dashboard", f"port {port} listens on {addresses or 'nothing found'}",
                    "127.0.0.1 only", ok, {"stderr": out.stderr[-500:] if not ok else ""})]
