"""All service settings in one place, read once: flags of `fisherguard serve` override environment
variables (FISHERGUARD_<NAME>), which override these defaults."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.serve.allocator import Allocator


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FISHERGUARD_", extra="forbid")

    model: str = Field("mnist", description="shipped bundle name or bundle directory; several, comma-separated (the first is the default)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # batching
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per forward/backward")
    max_delay_ms: float = Field(2.0, ge=0, le=1000, description="wait for more images, from the oldest waiting one")
    max_queue_images: int = Field(256, ge=1, description="images waiting at most; more are answered 503 overloaded")
    request_timeout_ms: float = Field(10_000, gt=0, description="deadline of a request, queue and compute")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    allocator: Allocator = Field(
        "auto", description="memory allocator: jemalloc when the machine has it (auto), or the C library's (system)"
    )
    engine_nice: int = Field(10, ge=0, le=19, description="how much lower the engine's CPU priority is than the HTTP front's")
    # limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    body_timeout_ms: float = Field(
        10_000, gt=0, description="time a client may take to send a whole body; slower: 408 and the connection closed"
    )
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="pixels of one image, refused from the header before decoding")
    max_request_pixels: int = Field(50_000_000, ge=1, description="pixels of all of a request's images together, from their headers")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    # access
    api_keys: str | None = Field(None, description="comma-separated API keys; then requests need `Authorization: Bearer <key>`")
    api_keys_file: Path | None = Field(None, description="a file with one API key per line (blank lines and # comments ignored)")
    public_paths: str = Field(
        "/healthz,/readyz,/metrics,/,/static/,/docs,/openapi.json,/v2/health/",
        description="open without a key (a trailing / opens a prefix)",
    )
    request_quota: str | None = Field(None, description="detect/infer requests per client (API key, else address), e.g. '50/second'")
    image_quota: str | None = Field(None, description="images per client (API key, else address), e.g. '200/second'")
    per_address_concurrency: int | None = Field(
        None, ge=1, description="requests one client address may have in flight (probes, metrics and the page not counted); more: 429"
    )
    quota_storage: str = Field("memory://", description="where quotas count: this process, or a `limits` storage such as redis://host:6379")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: CORS off")
    expose_details: bool = Field(
        True, description="return scores, p-values and heatmaps (gradient information an attacker can use); false means disclosure=verdict"
    )
    disclosure: Literal["full", "verdict"] = Field(
        "full", description="what answers carry: everything (full), or only the predicted class and the flag (verdict)"
    )
    verdict_api_keys: str | None = Field(
        None, description="comma-separated API keys whose clients get only the verdict, whatever `disclosure` says"
    )
    log_format: Literal["json", "text"] = "json"
    tracing: bool = Field(
        False, description="OpenTelemetry traces; also on when OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set"
    )
    # decision
    alpha: float | None = Field(None, gt=0, lt=1, description="default α (else the calibration's)")
    min_alpha: float = Field(1e-4, gt=0, lt=1)
    max_alpha: float = Field(0.5, gt=0, lt=1)
    log_level: str = "info"
    address_file: Path = Field(
        Path("/tmp/fisherguard-address.json"), description="where serve writes the address it bound, for the health probe"
    )

    def models(self) -> list[str]:
        """The bundles to serve, in order: names or directories."""
        specs = [m.strip() for m in self.model.split(",") if m.strip()]
        if not specs:
            raise ValueError(f"model {self.model!r} names no bundle")
        return specs

    def level(self) -> Literal["full", "verdict"]:
        """The disclosure level of clients without a verdict-only key."""
        return self.disclosure if self.expose_details else "verdict"

    def verdict_keys(self) -> list[str]:
        return [k.strip() for k in (self.verdict_api_keys or "").split(",") if k.strip()]

    def keys(self) -> list[str]:
        """The configured API keys, verdict-only ones included (empty: no authentication)."""
        keys = [k.strip() for k in (self.api_keys or "").split(",") if k.strip()] + self.verdict_keys()
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        return keys

    def public(self, path: str) -> bool:
        for p in (x.strip() for x in self.public_paths.split(",") if x.strip()):
            if path == p or (p.endswith("/") and p != "/" and path.startswith(p)):
                return True
        return False
