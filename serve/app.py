"""The Ray Serve application's builder: `build_app(AppArgs)` puts a FastAPI ingress (`Gateway`,
serve/gateway.py) in front of one deployment per registry model (`ModelServer`,
serve/model_server.py). With `colocate` the one served model runs inside the ingress's replicas
instead, one hop less per request; with `multiplex` some models share one deployment whose
replicas load them on demand (`serve.multiplexed`).

    serve run serve.app:app                               # every model in $RAYLM_STORAGE/registry
    serve run serve.app:build_app registry=/path/to/registry
    serve deploy serve/config.yaml                        # autoscaling and batching from YAML

Deployment defaults live in `DEFAULTS` (serve/options.py); YAML/CLI args are merged over them. No
`from __future__ import annotations` here: Serve reads `build_app`'s annotation to validate args.
"""

import logging
import os
from typing import Any

from ray.serve import Application

from cluster import registry, storage
from cluster.config import build
from serve.gateway import Gateway
from serve.guard import API_KEY_ENV, api_key_hash, exposure
from serve.model_server import ModelServer
from serve.options import DEFAULTS, MULTIPLEXED, AppArgs, DeploymentOptions

log = logging.getLogger("raylm.serve")


def _card(entry: dict[str, Any]) -> dict[str, Any]:
    created = entry.get("created")
    try:
        import datetime as dt

        ts = int(dt.datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        ts = 0
    return {"id": entry["name"], "object": "model", "created": ts, "owned_by": "raylm",
            "task": entry["task"], "labels": entry.get("labels")}


def select_models(args: AppArgs) -> list[dict[str, Any]]:
    entries = registry.list_models(args.registry)
    if args.models is not None:
        by_name = {e["name"]: e for e in entries}
        missing = [m for m in args.models if m not in by_name]
        if missing:
            raise registry.RegistryError(
                f"models {missing} are not in registry '{registry.registry_root(args.registry)}' "
                f"(published: {', '.join(by_name) or 'none'})"
            )
        entries = [by_name[m] for m in args.models]
    for entry in entries:  # fail fast, naming the model, instead of replicas failing to start
        if not storage.is_uri(entry["path"]):
            registry.check_weights(entry["path"], entry.get("weights_sha256"), what=f"registry model '{entry['name']}'")
    unknown = sorted(set(args.per_model) - {e["name"] for e in entries})
    if unknown:
        raise registry.RegistryError(f"per_model names {unknown} are not among the served models")
    unknown = sorted(args.multiplexed() - {e["name"] for e in entries})
    if unknown:
        raise registry.RegistryError(f"multiplex.models {unknown} are not among the served models "
                                     f"({', '.join(e['name'] for e in entries) or 'none'})")
    return entries


def deployment_name(model: str) -> str:
    return f"model-{model}"


def start_reservations(args: AppArgs, entries: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(deployment, CPUs, GPUs) that each deployment's replicas reserve when the app starts: a
    fixed count, or an autoscaled deployment's min_replicas (Serve's initial count)."""
    def reserve(name: str, opts: DeploymentOptions) -> tuple[str, float, float]:
        n = opts.autoscaling.min_replicas if opts.autoscaling else (opts.num_replicas or 1)
        return name, n * opts.num_cpus, n * opts.num_gpus

    colocated = args.colocated_model(entries)
    if colocated:
        return [reserve(deployment_name(colocated["name"]), args.options_for(colocated["name"]))]
    shared = [reserve(MULTIPLEXED, args.shared_options())] if args.multiplex else []
    return [reserve("Gateway", args.ingress)] + [
        reserve(deployment_name(e["name"]), args.options_for(e["name"])) for e in entries
        if e["name"] not in args.multiplexed()] + shared


def resource_shortfall(args: AppArgs, entries: list[dict[str, Any]], cluster: dict[str, float]) -> str | None:
    """Why the app's replicas cannot all start on a cluster with `cluster` resources (Serve would
    wait for them without a word), or None when they fit."""
    parts = start_reservations(args, entries)
    for key, column in (("CPU", 1), ("GPU", 2)):
        need, have = sum(p[column] for p in parts), cluster.get(key, 0.0)
        if need > have + 1e-9:
            each = ", ".join(f"{p[0]} {p[column]:g}" for p in parts if p[column])
            fixes = ("serve fewer models (--set models=[NAME,...]), let models share replicas (--set "
                     f"multiplex.models=[NAME,...]), give each replica less (--set model.num_{key.lower()}s=...)")
            return (f"the app needs {need:g} {key}s to start its replicas ({each}), but Ray has {have:g}: "
                    f"{fixes}, or give Ray more")
    return None


def fit_to_cluster(args: AppArgs, entries: list[dict[str, Any]], cluster: dict[str, float]) -> AppArgs:
    """`args`, with the model replicas' CPUs sized to the cluster when the default (one each) does
    not fit: small models share CPUs (fractions of one) rather than wait for ones that never come.
    Raises ValueError with what each deployment needs when even that does not fit, unless
    RAYLM_WAIT_FOR_RESOURCES=1 (an autoscaling cluster adds nodes): then a warning."""
    sized = args.model.num_cpus != DEFAULTS["model"]["num_cpus"] or any(
        "num_cpus" in o for o in args.per_model.values()) or (args.multiplex and "num_cpus" in args.multiplex.options)
    if resource_shortfall(args, entries, cluster) and not sized:
        parts = start_reservations(args, entries)
        gateway = sum(p[1] for p in parts if p[0] == "Gateway")
        replicas = sum(p[1] for p in parts if p[0] != "Gateway") / args.model.num_cpus
        share = int((cluster.get("CPU", 0.0) - gateway) / max(replicas, 1) * 100) / 100
        if share >= 0.1:
            args = args.model_copy(update={"model": args.model.model_copy(update={"num_cpus": min(share, 1.0)})})
            log.info("%g model replica(s) on %g CPUs: each reserves %g CPU", replicas, cluster.get("CPU", 0.0), share)
    short = resource_shortfall(args, entries, cluster)
    if short and os.environ.get("RAYLM_WAIT_FOR_RESOURCES") != "1":
        raise ValueError(f"{short}; on an autoscaling cluster set RAYLM_WAIT_FOR_RESOURCES=1 to wait for nodes")
    if short:
        log.warning("%s; Serve waits until the cluster has them", short)
    return args


def serve_host() -> str | None:
    """The address Serve's HTTP proxy listens on, when a Serve instance is already running (as it is
    for `serve deploy`'s build); None before one starts (`serve run` builds first)."""
    from ray.serve.context import _get_global_client  # private: Serve has no public read of http_options

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - no Serve to ask: the host is not known yet
        return None
    return client.http_config.host if client is not None else None


def api_key_sha256(args: AppArgs, host: str | None) -> str | None:
    """The key's hash the ingress checks; refuses an open API on a non-loopback host (guard.exposure)
    and says in the log when the API is open."""
    key_hash = args.api_key_sha256 or (api_key_hash(os.environ[API_KEY_ENV]) if os.environ.get(API_KEY_ENV) else None)
    refusal = exposure(host, key_hash, args.allow_unauthenticated)
    if refusal:
        raise ValueError(refusal)
    if key_hash is None:
        log.warning("the API is open: no %s, so every route answers without a key (listening on %s)",
                    API_KEY_ENV, host or "Serve's default, 127.0.0.1")
    return key_hash


def build_app(args: AppArgs, entries: list[dict[str, Any]] | None = None, host: str | None = None) -> Application:
    """The application for `args` (a dict is validated into AppArgs, as `serve run k=v` passes);
    `entries`: the registry models select_models(args) gives, when already known; `host`: where
    Serve will listen, when the caller knows (else the running Serve's, if any).

    Ray is joined, or started as raylm's jobs start it, when it is not up yet (`serve run` builds the
    app before it starts Ray), so that the replicas are sized to the cluster they will run on."""
    import ray

    from cluster import runtime

    if not isinstance(args, AppArgs):
        args = build(AppArgs, dict(args or {}), source="serve args")
    entries = select_models(args) if entries is None else entries
    if not entries:
        log.warning("no models in registry '%s'; serving only /healthz and /v1/models",
                    registry.registry_root(args.registry))
    if host is not None:  # known: an open API on a public address fails before Ray is asked for anything
        api_key_sha256(args, host)
    if not ray.is_initialized():
        runtime.connect()
    key_hash = api_key_sha256(args, host or serve_host())
    args = fit_to_cluster(args, entries, ray.cluster_resources())
    cards = {e["name"]: _card(e) for e in entries}
    limits = {"request_timeout_s": args.request_timeout_s, "max_body_bytes": args.max_body_bytes,
              "api_key_sha256": key_hash}
    colocated = args.colocated_model(entries)
    if colocated:  # one deployment, named for the model, that is also the ingress
        name = colocated["name"]
        return Gateway.options(name=deployment_name(name), **args.options_for(name).serve_options(
            access_log=args.ingress.access_log)).bind(
            {}, cards, limits, colocated=(colocated, args.model_runtime(name)))
    handles, shared, multiplexed = {}, None, args.multiplexed()
    for entry in entries:
        if entry["name"] not in multiplexed:
            handles[entry["name"]] = ModelServer.options(
                name=deployment_name(entry["name"]), **args.options_for(entry["name"]).serve_options()
            ).bind(entry, args.model_runtime(entry["name"]))
    if multiplexed:
        shared = ModelServer.options(name=MULTIPLEXED, **args.shared_options().serve_options()).bind(
            None, args.model_runtime(None), {e["name"]: e for e in entries if e["name"] in multiplexed})
    return Gateway.options(**args.ingress.serve_options()).bind(
        handles, cards, limits, shared=shared, shared_models=tuple(sorted(multiplexed)))


def __getattr__(name: str) -> Any:
    # `serve run serve.app:app` builds from $RAYLM_STORAGE/registry when the attribute is read,
    # not at import, so importing this module never needs the registry or Ray.
    if name == "app":
        from serve import lifetime

        app = build_app(AppArgs())
        lifetime.watch_ray(8000)  # `serve run` serves on Serve's default port; its Ray may be killed under it
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
