"""The Serve app's typed options: `AppArgs`, what `build_app` takes (YAML `args:`, `serve run k=v`
or `raylm serve run --set k=v`), and the deployment options nested in it, each field described and
unknown keys refused. The defaults are in one place, `DEFAULTS`, which `AppArgs` merges the
user's args over.
"""

from typing import Any, Literal

from pydantic import Field, model_validator

from cluster import registry
from cluster.config import NameList, Section, build, deep_merge
from serve.schemas import TOP_K_CEILING

MULTIPLEXED = "multiplexed"  # the deployment that the `multiplex` models share

# Every default in one place; `AppArgs` merges user args (YAML `args:` or `serve run k=v`) over it.
DEFAULTS: dict[str, Any] = {
    # The ingress only parses and forwards, so its queue is left to HAProxy in front of it.
    "ingress": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 256, "max_queued_requests": -1,
                "access_log": True},
    "model": {
        # 64 queued requests per caller: two replicas' worth of in-flight work waits, the rest
        # answer 429 at once instead of waiting minutes for a free slot.
        "num_replicas": 1, "autoscaling": None, "num_cpus": 1.0, "num_gpus": 0.0,
        "max_ongoing_requests": 32, "max_queued_requests": 64,
        "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "compute_in_thread": False,
        "access_log": False,
    },
    "per_model": {},
    "request_timeout_s": 60.0,
    "max_body_bytes": 1_000_000,
    "max_tokens": 512,
    # The work one request may ask for: a replica answers each request within request_timeout_s
    # only if no single request can be made arbitrarily large.
    "max_batch_inputs": 64,
    "max_request_tokens": 16_384,
    "max_masks_per_input": 8,
    "max_top_k": 20,
}


class AutoscalingOptions(Section):
    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(2, ge=1, description="replicas at most")
    target_ongoing_requests: float = Field(2.0, gt=0, description="in-flight requests per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0, description="sustained load before adding replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="sustained idleness before removing replicas")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report load")
    look_back_period_s: float = Field(30.0, gt=0, description="window the load is averaged over")

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentOptions(Section):
    num_replicas: int | None = Field(1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: AutoscalingOptions | None = Field(None, description="replica autoscaling; null = fixed")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(-1, ge=-1, description="requests queued per caller for this deployment's "
                                     "replicas; more answer 429 with Retry-After; -1 = unbounded")
    max_batch_size: int = Field(8, ge=1, description="dynamic batch size (1 = batching off)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="while other requests are in the replica, a new "
                                        "batch waits this long to fill; a request to an idle replica starts at once")
    # Where a batch's model call runs is the replica's choice (ModelServer._compute): a long one in a
    # worker thread, so Serve's health checks, which wait on the event loop, keep being answered;
    # a short one on the loop, where it does not contend for the GIL (serve/model_server.py says why).
    compute_in_thread: bool = Field(False, description="run every batch's model call in a worker thread; off: "
                                    "batches predicted to compute for under LOOP_BUDGET_S (0.25 s) run on the event "
                                    "loop, longer ones (and each replica's first) in a worker thread")
    # Serve learns that a replica's process died only from a failed health check, so this period
    # is the wait before a replacement starts (Ray's default: 10 s). A check is one no-op actor
    # call: at 0.5 s the drill's replacement starts ~0.6 s after the kill instead of ~2.2 s at 2 s.
    health_check_period_s: float = Field(0.5, gt=0, description="how often Serve checks a replica; a dead "
                                         "replica's replacement starts at the next check")
    health_check_timeout_s: float = Field(10.0, gt=0, description="an unanswered health check after this "
                                          "long marks the replica unhealthy")
    # Serve's access log is a line per call in the replica's log file. The ingress's lines already
    # record every HTTP request (method, route, status, latency, request id); a model replica's
    # "CALL encode OK" repeats each of them. Without it the 2-core box served classification at
    # concurrency 32 ~12% faster, generation the same (BENCHMARKS.md, Serve). Off for model deployments by default.
    quantize: Literal["none", "int8"] | None = Field(None, description="int8: the model's Linear layers in int8 "
                                                     "(CPU replicas only; cluster.quantize); none: as published; "
                                                     "null: the model's default (`raylm publish --quantize`)")
    access_log: bool = Field(True, description="Serve's access log line per request in this deployment's replica "
                             "logs (default: on for the ingress, off for model deployments; with `colocate`, "
                             "ingress.access_log applies)")

    @model_validator(mode="after")
    def _quantize_on_cpu(self) -> "DeploymentOptions":
        if self.quantize == "int8" and self.num_gpus > 0:
            raise ValueError(f"quantize 'int8' runs on CPU replicas (PyTorch's dynamic int8 kernels), and num_gpus is "
                             f"{self.num_gpus:g}: set num_gpus 0, or serve unquantized on the GPU")
        return self

    def serve_options(self, access_log: bool | None = None) -> dict[str, Any]:
        """Ray Serve deployment options; `access_log` overrides the field (a colocated model's
        replicas are the ingress and log as the ingress does)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests,
                                "max_queued_requests": self.max_queued_requests,
                                "health_check_period_s": self.health_check_period_s,
                                "health_check_timeout_s": self.health_check_timeout_s,
                                "logging_config": {"enable_access_log":
                                                   self.access_log if access_log is None else access_log}}
        if self.autoscaling:
            opts["autoscaling_config"] = self.autoscaling.to_dict()
            opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class MultiplexOptions(Section):
    models: NameList = Field(..., min_length=1, description="registry models that share one deployment, a list or "
                             "comma-separated; each replica loads the ones it is asked for")
    max_models_per_replica: int = Field(3, ge=1, description="models a replica keeps loaded; asked for another, it "
                                        "unloads the least recently used")
    options: dict[str, Any] = Field(default_factory=dict, description="overrides of `model` for the shared deployment "
                                    f"('{MULTIPLEXED}')")


class AppArgs(Section):
    registry: str | None = Field(None, description="registry root (default: $RAYLM_STORAGE/registry)")
    models: NameList | None = Field(None, description="registry names to serve, a list or comma-separated "
                                    "(default: all)")
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**DEFAULTS["ingress"]))
    model: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(**DEFAULTS["model"]),
                                     description="options of every model deployment")
    per_model: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                 description="per-model overrides of `model`, by name")
    request_timeout_s: float = Field(60.0, gt=0, description="a request running longer answers 504 (a stream ends "
                                     "with a timeout error event) and its generation is stopped")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies answer 413")
    max_tokens: int = Field(512, ge=1, description="cap on max_tokens per request")
    max_batch_inputs: int = Field(DEFAULTS["max_batch_inputs"], ge=1, description="prompts (completions) or "
                                  "inputs (encoder tasks) in one request at most; more answer 400")
    max_request_tokens: int = Field(DEFAULTS["max_request_tokens"], ge=1, description="tokens one request may ask "
                                    "for: its prompt or input tokens plus n x max_tokens for each prompt; more "
                                    "answer 400")
    max_masks_per_input: int = Field(DEFAULTS["max_masks_per_input"], ge=1, description="mask tokens in one "
                                     "fill-mask input at most; more answer 400")
    max_top_k: int = Field(DEFAULTS["max_top_k"], ge=1, le=TOP_K_CEILING, description="fill-mask top_k at most; "
                           "more answer 400")
    api_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the API key "
                                       "clients send as `Authorization: Bearer KEY`; set by `raylm serve deploy` and "
                                       "`serve.cli build` from RAYLM_API_KEY (default: RAYLM_API_KEY where the app is built)")
    allow_unauthenticated: bool = Field(False, description="serve on a non-loopback address without an API key")
    # Each hop is a Ray actor call. On the 2-core box colocating took 3-7 ms off a request at
    # concurrency 1 and raised classification's throughput under load ~22%; generation's under load
    # moved little, as the ingress's parsing then shares the model's event loop (BENCHMARKS.md, Serve).
    colocate: bool = Field(False, description="serve the one selected model inside the ingress replicas (one "
                           "deployment, one hop less per request); `model`/`per_model` options then size those "
                           "replicas and `ingress` is unused; needs exactly one model")
    # Many small fine-tuned models need not each hold a replica (one CPU by default) all the time:
    # Serve routes a request to a replica that has its model loaded when there is one.
    multiplex: MultiplexOptions | None = Field(None, description="serve these models from one deployment whose "
                                               "replicas load them on demand (serve.multiplexed) instead of one "
                                               "deployment each")

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        return deep_merge(DEFAULTS, data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _multiplex_fits(self) -> "AppArgs":
        if self.multiplex is None:
            return self
        if self.colocate:
            raise ValueError("colocate serves one model inside the ingress; it cannot be combined with multiplex")
        sized = sorted(set(self.per_model) & set(self.multiplex.models))
        if sized:
            raise ValueError(f"per_model {sized}: multiplexed models share one deployment; size it with "
                             "multiplex.options")
        self.shared_options()  # its overrides are valid DeploymentOptions
        return self

    def multiplexed(self) -> set[str]:
        return set(self.multiplex.models) if self.multiplex else set()

    def shared_options(self) -> DeploymentOptions:
        """The options of the deployment the `multiplex` models share."""
        assert self.multiplex is not None
        merged = deep_merge(self.model.to_dict(), self.multiplex.options)
        return build(DeploymentOptions, merged, source="multiplex.options")

    def options_for(self, name: str) -> DeploymentOptions:
        merged = deep_merge(self.model.to_dict(), self.per_model.get(name, {}))
        return build(DeploymentOptions, merged, source=f"per_model.{name}")

    def request_limits(self) -> dict[str, Any]:
        """What each request may ask of a model replica, which the replica checks (a plain dict: it
        crosses the Ray boundary)."""
        keys = ("max_tokens", "max_batch_inputs", "max_request_tokens", "max_masks_per_input", "max_top_k",
                "request_timeout_s")
        return {key: getattr(self, key) for key in keys}

    def model_runtime(self, name: str | None) -> dict[str, Any]:
        """What a `ModelServer` for model `name` (None: the `multiplex` models' shared one) is built
        with: its options, the request limits, and how many models a shared replica keeps loaded."""
        if name is None:
            assert self.multiplex is not None
            return {**self.shared_options().to_dict(), **self.request_limits(),
                    "max_models_per_replica": self.multiplex.max_models_per_replica}
        return {**self.options_for(name).to_dict(), **self.request_limits()}

    def colocated_model(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The registry entry served inside the ingress with `colocate`, else None."""
        if not self.colocate:
            return None
        if len(entries) != 1:
            names = ", ".join(e["name"] for e in entries) or "none"
            raise registry.RegistryError(f"colocate serves exactly one model, but {len(entries)} are selected "
                                         f"({names}): choose one with models=[NAME]")
        return entries[0]
