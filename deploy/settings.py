"""Settings: one pydantic-settings object per process kind, built once in ``main()`` and passed down.

Every field reads from the environment with the prefix shown (``ADAPTLOOP_KAFKA_BOOTSTRAP_SERVERS``,
``ADAPTLOOP_TRAINER_TORCH_THREADS`` ...). Unknown ``ADAPTLOOP_*`` keys in an explicit dict are refused.
What every process shares (the cluster, the topics, the base model) is in ``adaptloop.shared_settings``, the
shared secrets in ``adaptloop.credentials``; both are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import BaseSettings

from adaptloop.credentials import ADMIN_KEY_FILE, SUBJECT_SECRET_FILE, Secret, admin_key, bearer_header, shared_secret
from adaptloop.processes import parse_cpu_list
from adaptloop.shared_settings import (DEFAULT_BOOTSTRAP, DEFAULT_HOME, KafkaSettings, ModelSettings, Topics,
                                       settings_config)

__all__ = ["ADMIN_KEY_FILE", "DEFAULT_BOOTSTRAP", "DEFAULT_HOME", "SUBJECT_SECRET_FILE", "CanarySettings", "CpuList",
           "ErasureSettings", "GatewaySettings", "KafkaSettings", "ModelSettings", "Replica", "Secret", "ServeSettings",
           "StatusSettings", "StreamsSettings", "Topics", "TrainerSettings", "admin_key", "bearer_header",
           "shared_secret"]


def _cpu_list(value: str) -> str:
    parse_cpu_list(value)
    return value


#: A ``cpus`` setting: refused at start unless it is a CPU list (``processes.parse_cpu_list``).
CpuList = Annotated[str, AfterValidator(_cpu_list)]


class ErasureSettings(BaseSettings):
    """How data subjects are keyed: curation writes the keys into examples, ``adaptloop forget`` computes them.
    Every curation worker and every forget of a deployment must read the same secret."""

    model_config = settings_config("ADAPTLOOP_ERASURE_")

    subject_secret: Secret = Field(None, description="The deployment's secret for subject keys (HMAC-SHA256 of tenant "
                                   "and identifier): without it a key cannot be computed from public values. "
                                   "Unset: read from subject_secret_file.")
    subject_secret_file: Path = Field(DEFAULT_HOME / SUBJECT_SECRET_FILE, description="Where the secret is kept "
                                      "when not given; created (32 random bytes, 0600) if missing.")

    def secret(self) -> str:
        if self.subject_secret is not None:
            return self.subject_secret.get_secret_value()
        return shared_secret(self.subject_secret_file, "subject key secret")


class StreamsSettings(BaseSettings):
    """The Faust curation workers (``adaptloop streams``)."""

    model_config = settings_config("ADAPTLOOP_STREAMS_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    app_id: str = "adaptloop-curation"
    data_dir: Path = DEFAULT_HOME / "faust"
    web_port: int = 6066
    window_size: int = Field(64, description="A training request fires per N new admitted training examples of a (tenant, task) "
                             "(a task's own window_size in the task catalogue wins).")
    window_max_age_s: float = Field(3600.0, gt=0, description="... or when the window's first example is this old (wall clock) ...")
    window_min_examples: int = Field(8, ge=1, description="... and it holds at least this many admitted training examples.")
    holdout_percent: int = Field(20, ge=0, lt=100)
    max_record_bytes: int = 1_000_000
    outcome_horizon_s: float = Field(24 * 3600.0, gt=0, description="Outcomes later than this after their interaction "
                                     "(event time) are rejected with the reason.")
    outcome_grace_s: float = Field(60.0, ge=0, description="After the first outcome joins, wait this long (wall clock) for a "
                                   "stronger one before curating; a human correction is curated at once.")
    tick_s: float = Field(5.0, gt=0, description="How often grace periods and age-triggered windows are checked (one tick "
                          "record per partition on the {app_id}-ticks topic each time).")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity (MinHash of word "
                                            "3-shingles) at which an example is a near duplicate of an earlier one.")
    dedupe_max_per_task: int = Field(100_000, ge=1, description="The near-duplicate index of a (tenant, task) holds its "
                                     "newest N admitted examples; older ones leave it (and its table), oldest first.")
    state_sweep_s: float = Field(60.0, gt=0, description="How often each partition's table entries are swept: an entry "
                                 "last written one outcome horizon ago is deleted (adaptloop.streams.state).")
    batch_max_events: int = Field(256, ge=1, description="The join and dedupe agents take up to this many records at a "
                                  "time and await their outputs' acknowledgements together (one round trip per batch).")
    batch_within_s: float = Field(0.005, gt=0, description="... or what arrived within this long: the most a batch adds "
                                  "to a record's latency.")
    tenants: list[str] = Field(default_factory=list, description="Tenants accepted on the input topics (JSON list); empty: any.")
    max_future_s: float = Field(300.0, ge=0, description="Event times further ahead of the worker's clock are contract violations.")
    pii_patterns: dict[str, str] = Field(default_factory=dict, description="Extra PII rules as JSON {name: regex}; they fire "
                                         "as custom:NAME and count as identifiers of people (erasure keys).")
    phone_region: str = Field("US", description="Region for phone numbers written without a country code.")
    crash_point: Literal["", "request_pending", "request_sent"] = Field(
        "", description="Crash drills and tests only: the worker SIGKILLs itself the first time it reaches this point "
        "(request_pending: a window's request is decided and flushed to the table, not sent; request_sent: sent, "
        "not yet marked done).")


class TrainerSettings(BaseSettings):
    """The trainer service (``adaptloop trainer``): consumes requests, runs Ray jobs, publishes releases."""

    model_config = settings_config("ADAPTLOOP_TRAINER_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    model: ModelSettings = Field(default_factory=ModelSettings)
    home: Path = DEFAULT_HOME
    artifact_dir: Path = DEFAULT_HOME / "artifacts"
    group_id: str = "adaptloop-trainer"
    ray_address: str | None = Field(None, description="Ray cluster address; unset means a local ray.init() (RAY_ADDRESS is honoured too).")
    recipes_dir: Path | None = Field(None, description=(
        "Folder of <method>.yaml recipe files (trainers/config.py says how a run's config is built); unset: the "
        "bundled trainers/recipes/."))
    recipe: dict[str, Any] = Field(default_factory=dict, description=(
        "Recipe fields this deployment sets for every recipe that has them, under each task's own (JSON: "
        "ADAPTLOOP_TRAINER_RECIPE='{\"epochs\": 2}')."))
    torch_threads: int = Field(1, description=(
        "Cores for training (torch threads) and for the gate's evaluations (that many side by side, one thread "
        "each). More threads than idle cores slow training down, the more so with OMP_WAIT_POLICY=ACTIVE."))
    parallel_jobs: int = Field(1, ge=1, description=(
        "Training requests in work at once, never two of one (tenant, task). Each is a Ray job of torch_threads "
        "cores beside its own evaluations: set it to what the cluster holds (cores / torch_threads)."))
    job_timeout_s: float = Field(4 * 3600.0, gt=0, description=(
        "A training job still running after this long is stopped (its actor replaced) and the request rejected "
        "as failed."))
    omp_wait_policy: str = Field("PASSIVE", description=(
        "OMP_WAIT_POLICY of the trainer and its Ray workers: PASSIVE threads sleep between parallel regions "
        "instead of spinning on cores that vLLM, the streams or another training need (two 2-thread trainings "
        "side by side: 33 tokens/s each spinning, 82 sleeping). Empty: OpenMP's own default."))
    gate_margin: float = Field(0.05, description="A candidate must beat the incumbent's holdout success by this much.")
    max_new_tokens: int = 96
    # -- issue 4: snapshots, methods, resumable jobs, the gate's regression suite, release checks --
    dataset_store: str = Field("", description="fsspec URL of the dataset snapshot store (s3://bucket/prefix ...); "
                               "empty means <artifact_dir> on the local disk.")
    method: Literal["auto", "sft", "kto", "dpo"] = Field("auto", description="auto: the method follows the signal "
                                                        "(trainers/snapshot.py choose_method); else force one recipe.")
    min_train_examples: int = Field(8, ge=1, description="Fewer usable TRAIN examples: REJECTED without training.")
    checkpoint_steps: int = Field(4, ge=0, description="Checkpoint every N optimizer steps (a killed job resumes); 0: never.")
    max_lora_rank: int = Field(16, description="vLLM's --max-lora-rank (ServeSettings.max_lora_rank): a bigger rank is refused.")
    regression_tolerance: float = Field(0.05, ge=0, description="A candidate may score this much below an earlier "
                                         "release on that release's holdout; lower is a regression.")
    regression_scope: Literal["tenant", "task"] = Field("task", description=(
        "Holdouts of earlier releases of this task only (default: the gateway routes each task to its own "
        "adapter, so an adapter never answers another task), or of any task of the tenant (for one adapter "
        "meant to answer all of a tenant's tasks)."))
    regression_max_suites: int = Field(4, ge=0, description="Newest earlier live releases whose holdouts form the suite.")
    use_gpu: bool = Field(False, description="Each training actor asks Ray for a GPU.")
    # -- issue 26: a paired gate --
    gate_confidence: float = Field(0.95, gt=0.5, lt=1.0, description=(
        "Confidence of the gate's exact sign test on the holdout pairs where candidate and incumbent differ "
        "(alpha = 1 - confidence): a candidate is 'better' at p_better <= alpha (and gate_margin); one neither "
        "better nor worse is 'undecided' and goes to the canary at a share below canary_share."))
    canary_share: float = Field(0.1, gt=0.0, le=1.0, description=(
        "The share of an alias's calls the gateways give a canary (ADAPTLOOP_GATEWAY_CANARY_SHARE): an undecided "
        "candidate's release carries canary_share x max(0.1, 1 - p_better) as its own share."))
    # -- issue 26: evaluate where it will serve --
    vllm_url: str | None = Field(None, description=(
        "A vLLM server (adaptloop serve's) the gate and the regression suite evaluate through: adapters "
        "shadow-loaded under names no alias routes, requests batched, unloaded after (trainers/vllm_eval.py). It "
        "must read artifact_dir at the same path (on Kubernetes: the artifact volume mounted in its pods). "
        "Unset, or not answering: transformers in this process."))
    vllm_api_key: Secret = Field(None, description="The key that server takes (ADAPTLOOP_SERVE_VLLM_API_KEY).")
    eval_concurrency: int = Field(8, ge=1, description="Completions in flight to vLLM during an evaluation (vLLM batches them).")
    eval_request_timeout_s: float = Field(300.0, gt=0, description=(
        "One evaluation completion through vLLM; one not answered by then sends the evaluation to transformers."))

    def store_url(self) -> str:
        return self.dataset_store or str(Path(self.artifact_dir).resolve())


class ServeSettings(BaseSettings):
    """A vLLM server with its registry sidecar (``adaptloop serve``)."""

    model_config = settings_config("ADAPTLOOP_SERVE_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    model: ModelSettings = Field(default_factory=ModelSettings)
    home: Path = DEFAULT_HOME
    host: str = "127.0.0.1"
    port: int = 18000
    sidecar_port: int = 18001
    max_lora_rank: int = 16
    max_loras: int = 4
    max_model_len: int = Field(2048, description="Prompt + answer tokens per call (tools and an episode's history count).")
    tool_call_parser: str = Field("hermes", description=(
        "vLLM's --tool-call-parser, matching the template's tool-call blocks; empty: no tool calling."))
    kv_cache_gib: int = 1
    vllm_api_key: Secret = Field(None, description=(
        "The key vLLM's API (runtime LoRA loading included) takes; the sidecar sends it, gateways send their "
        "ADAPTLOOP_GATEWAY_VLLM_API_KEY. Unset: no key (the local stack's vLLM listens on loopback only)."))
    dtype: str = Field("float32", description="vLLM --dtype. Its 'auto' downcasts fp32 models to bf16, which CPUs "
                       "without AVX-512 BF16 emulate (~10 tokens/s here instead of hundreds); use bfloat16 on GPUs.")
    startup_timeout_s: float = 300.0
    replica_id: str = Field("", description="This replica's name on the status topic; default host:port of its vLLM.")
    retire_grace_s: float = Field(2.0, description="A RETIRED (superseded) version is unloaded this long after its "
                                  "record, once gateways have switched to its successor.")
    max_vllm_restarts: int = Field(3, description="vLLM deaths the sidecar recovers from (restart + restore) before it exits.")
    enforce_eager: bool = Field(True, description="vLLM --enforce-eager: right for CPUs; false on GPUs (CUDA graphs).")
    omp_wait_policy: str = Field("PASSIVE", description=(
        "OMP_WAIT_POLICY for vLLM's OpenMP threads (CPU builds). PASSIVE: idle threads sleep instead of "
        "spinning after each step, which otherwise takes the cores a gateway and broker beside it need "
        "(measured by serving.bench.gateway). Empty: OpenMP's own default."))
    vllm_args: list[str] = Field(default_factory=list, description=(
        "Extra vLLM flags as JSON, e.g. [\"--tensor-parallel-size\", \"2\", \"--gpu-memory-utilization\", \"0.85\"]."))
    status_interval_s: float = Field(10.0, description="Heartbeat period of the status record (also sent on every change).")
    cpus: CpuList = Field("", description=(
        "CPUs the sidecar and its vLLM run on, e.g. '0' or '0-5' (taskset's list format; vLLM's CPU build "
        "binds its OpenMP threads within them); empty: any. See ADAPTLOOP_GATEWAY_CPUS."))


class Replica(BaseSettings):
    """One vLLM server and its registry sidecar, as the gateway reaches them."""

    model_config = settings_config("ADAPTLOOP_REPLICA_")

    vllm_url: str
    sidecar_url: str


class GatewaySettings(BaseSettings):
    """The OpenAI-compatible gateway (``adaptloop gateway``)."""

    model_config = settings_config("ADAPTLOOP_GATEWAY_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    model: ModelSettings = Field(default_factory=ModelSettings)
    host: str = "127.0.0.1"
    port: int = 18080
    vllm_url: str = "http://127.0.0.1:18000"
    sidecar_url: str = "http://127.0.0.1:18001"
    vllm_api_key: Secret = Field(None, description="The key the vLLM replicas take (ADAPTLOOP_SERVE_VLLM_API_KEY).")
    replicas: list[Replica] = Field(default_factory=list, description=(
        "Several vLLM replicas, as JSON: [{\"vllm_url\": ..., \"sidecar_url\": ...}, ...]; "
        "empty means the one at vllm_url/sidecar_url."))
    agent_name: str = "gateway"
    request_timeout_s: float = 120.0
    api_keys_file: Path | None = Field(None, description="JSON key file written by `adaptloop keys add` (hashes only).")
    api_keys: SecretStr | None = Field(None, description=(
        "Extra keys in plain text, 'tenant=key,tenant=key' (dev stacks; hashed at start, never logged)."))
    canary_share: float = Field(0.1, ge=0.0, le=1.0, description=(
        "Share of an alias's traffic for its newest RELEASED (not yet promoted) version; 1.0 = all at once."))
    record_mode: Literal["outbox", "ack"] = Field("outbox", description=(
        "outbox: answer once the interaction is in the gateway's local outbox, which the broker then "
        "takes it from (retried until it does, and after a restart); ack: answer only after the broker "
        "acknowledged it. Per request: the x-adaptloop-record header (ack or outbox)."))
    outbox_dir: Path | None = Field(None, description=(
        "Where each gateway keeps its outbox, in a folder named after its port; default "
        "$ADAPTLOOP_HOME/gateway-outbox. Keep it on a disk that survives the gateway's restarts."))
    outbox_max_mib: int = Field(256, ge=1, description=(
        "Unacknowledged interactions the outbox may hold (MiB) before calls are refused with a 503."))
    id_secret: SecretStr | None = Field(None, description=(
        "The key that tags every interaction id with its tenant (POST /v1/feedback verifies it): the same "
        "on every gateway of a deployment. Unset: read from id_secret_file, created there if missing."))
    id_secret_file: Path | None = Field(None, description="Default $ADAPTLOOP_HOME/gateway-id-secret (0600).")
    admin_key: Secret = Field(None, description=(
        "Bearer credential for /stats and /health's detail (every tenant's aliases, traffic and versions): "
        "operators and the canary controller only. Unset: read from admin_key_file, created there if missing."))
    admin_key_file: Path | None = Field(None, description="Default $ADAPTLOOP_HOME/gateway-admin-key (0600).")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Request bodies larger than this are refused (413).")
    max_correction_chars: int = Field(32_768, ge=1, description="The longest correction POST /v1/feedback takes.")
    sidecar_watch_s: float = Field(10.0, gt=0, le=60, description=(
        "How long one watch of a replica's sidecar waits for a change of its loaded set before it is "
        "asked again (a change is heard at once, whatever this is)."))
    sidecar_poll_s: float = Field(0.2, gt=0, description=(
        "Pause before a sidecar that did not answer (or cannot be watched) is asked again."))
    cpus: CpuList = Field("", description=(
        "CPUs the gateway runs on, e.g. '1' or '2-3' (taskset's list format); empty: any. On a host it "
        "shares with a model server, give each its own (ADAPTLOOP_SERVE_CPUS): calls then never wait "
        "for a core vLLM holds (serving.bench.gateway --gateway-cpus)."))

    def replica_list(self) -> list[Replica]:
        return list(self.replicas) or [Replica(vllm_url=self.vllm_url, sidecar_url=self.sidecar_url)]

    def id_secret_path(self) -> Path:
        return self.id_secret_file or DEFAULT_HOME / "gateway-id-secret"

    def outbox_path(self) -> Path:
        return (self.outbox_dir or DEFAULT_HOME / "gateway-outbox") / str(self.port)


class CanarySettings(BaseSettings):
    """The canary controller (``adaptloop canary``): outcomes per version decide promote or roll back."""

    model_config = settings_config("ADAPTLOOP_CANARY_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    gateway_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:18080"], description=(
        "Gateways whose /stats give request errors and latency per version (JSON list)."))
    gateway_admin_key: Secret = Field(None, description="The gateways' admin key (/stats); unset: from the file.")
    gateway_admin_key_file: Path | None = Field(None, description="Default $ADAPTLOOP_HOME/gateway-admin-key.")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="False decision rate of the always-valid sequential test.")
    tau: float = Field(0.3, gt=0.0, description="Prior scale of the success-rate difference (mixture SPRT).")
    min_samples: int = Field(30, ge=1, description="Outcomes per side before any outcome-based decision.")
    max_samples: int = Field(2000, ge=1, description="Canary outcomes after which an undecided canary is rolled back.")
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0, description="Canary request error rate that rolls it back.")
    min_requests: int = Field(20, ge=1, description="Canary requests before the error/latency guards apply.")
    max_latency_ratio: float = Field(1.5, gt=0.0, description="Canary p95 latency over the incumbent's that rolls it back.")
    latency_slack_ms: float = Field(50.0, ge=0.0, description="Added to the incumbent's p95 before the ratio check.")
    poll_s: float = 1.0



class StatusSettings(BaseSettings):
    """``adaptloop status``: where to look. Defaults are the local stack's (``adaptloop up``)."""

    model_config = settings_config("ADAPTLOOP_STATUS_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: Topics = Field(default_factory=Topics)
    home: Path = Field(DEFAULT_HOME / "stack", description="The stack home whose stack.json lists the processes.")
    gateway_url: str = "http://127.0.0.1:18080"
    gateway_key: SecretStr | None = Field(None, description="Bearer key for the gateway's /v1/models, if it needs one.")
    gateway_admin_key: Secret = Field(None, description="The gateway's admin key (/stats); unset: from the file.")
    gateway_admin_key_file: Path | None = Field(None, description="Default: gateway-admin-key in the stack home.")
    sidecar_url: str = "http://127.0.0.1:18001"
    streams_url: str = Field("http://127.0.0.1:6066", description="A curation worker's web port (/adaptloop/metrics).")
    groups: list[str] = Field(default_factory=list, description="Consumer groups to show lag for; "
                              "empty: every group the broker lists.")
    http_timeout_s: float = 2.0
    refresh_s: float = Field(5.0, description="Seconds between snapshots of the live view.")
    idle_s: float = Field(1.0, description="Reading a topic ends after this long without a record (counting by reading).")
