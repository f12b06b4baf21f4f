"""Configuration from NAJIMI_* environment variables, validated at start-up.

One typed settings object per process. A bad value stops the process with a message
that names the variable (see `load_settings`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The suite's services and their default gRPC ports.
DEFAULT_PORTS: dict[str, int] = {
    "profile": 50051,
    "recommendation": 50052,
    "replenishment": 50053,
    "consent": 50054,
}
SERVICE_NAMES = tuple(DEFAULT_PORTS)


class Settings(BaseSettings):
    """Settings shared by every service. Each field is read from NAJIMI_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="NAJIMI_", extra="ignore", frozen=True)

    service: str = Field("", description="Which service this process runs (set by its entry point).")
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 in a container.")
    port: int | None = Field(
        None, ge=0, le=65535, description="gRPC port; unset means the service's default, 0 any free port."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port; unset means gRPC port + 1000, 0 disables it."
    )
    data_dir: Path = Field(Path("data"), description="Directory for SQLite files and development tokens.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file <data_dir>/<service>.db."
    )
    token_hashes_file: Path | None = Field(
        None,
        description="JSON file of principal -> SHA-256 token hash; default <data_dir>/token-hashes.json.",
    )
    service_token: str = Field("", description="Bearer token this service presents when it calls others.")
    profile_pii_key: SecretStr = Field(
        SecretStr(""),
        description="Profile's PII master key, base64 of 32 bytes; empty: a generated key file.",
    )
    page_token_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "HMAC key (base64 of 32 bytes) authenticating page tokens and feed cursors; the same on "
            "every replica of a service. Empty: a generated key file <data_dir>/page-token.key."
        ),
    )
    profile_trait_worker: Literal["inline", "external"] = Field(
        "inline",
        description=(
            "inline: the profile service keeps the traits current itself; external: a separate "
            "trait worker process (python -m services.profile.trait_process) does."
        ),
    )
    profile_customer_cache_size: int = Field(
        50_000,
        ge=0,
        description="GetCustomer answers (masked) a profile replica keeps in memory; 0 keeps none.",
    )
    pseudonym_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "This service's HMAC key (base64, 32 bytes) for request digests and erasure tombstones; "
            "empty: a generated key file <data_dir>/<service>-pseudonym.key."
        ),
    )
    idempotency_retention_hours: float = Field(
        168.0,
        gt=0,
        le=24 * 366,
        description="How long a request_id's first reply is kept for retries; older rows are purged.",
    )
    consent_signing_key: SecretStr = Field(
        SecretStr(""),
        description="Ed25519 private key (base64 of the 32-byte seed) signing consent receipts.",
    )
    consent_audit_key: SecretStr = Field(
        SecretStr(""), description="HMAC key (base64, 32 bytes) for customer references in the audit log."
    )
    consent_retired_public_keys: str = Field(
        "", description="JSON object key_id -> base64 Ed25519 public key of retired signing keys."
    )
    consent_controller_name: str = "najimi demo shop"
    consent_controller_contact: str = "Data Protection Officer"
    consent_controller_email: str = "privacy@example.com"
    consent_jurisdiction: str = Field("EU", description="Default jurisdiction of consent receipts.")
    consent_policy_url: str = "https://example.com/privacy"
    data_subject_services: str = Field(
        "profile,recommendation,replenishment",
        description="Services (besides consent) whose DataSubjectService a data-subject request calls.",
    )
    data_subject_max_attempts: int = Field(
        8, ge=1, le=100, description="Calls to a service before its part fails."
    )
    model_dir: Path | None = Field(
        None,
        description=(
            "Recommendation model directory (artefacts, one sub-directory per version), shared by the "
            "training worker and every replica; unset means <data_dir>/models."
        ),
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="One log line per RPC (at level info).")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_concurrent_rpcs: int = Field(1000, ge=1, le=1_000_000)
    grace_seconds: float = Field(10.0, ge=0, le=300, description="Graceful-stop period after SIGTERM.")
    shutdown_delay_seconds: float = Field(
        0.0, ge=0, le=60, description="Time spent NOT_SERVING before the graceful stop begins."
    )
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="When set, clients must present a certificate.")
    tls_ca_file: Path | None = Field(
        None,
        description=(
            "CA bundle that verifies the other services' certificates when this service calls them; "
            "set: outgoing calls use TLS (and present NAJIMI_TLS_CERT_FILE/KEY_FILE as the client certificate)."
        ),
    )
    consent_address: str = "127.0.0.1:50054"
    profile_address: str = "127.0.0.1:50051"
    recommendation_address: str = "127.0.0.1:50052"
    replenishment_address: str = "127.0.0.1:50053"
    consent_max_staleness_seconds: float = Field(
        30.0, gt=0, le=3600, description="Consent state older than this is not acted on (fail closed)."
    )
    replenishment_cancellation_window_seconds: float = Field(
        86_400.0,
        ge=0,
        le=30 * 86_400,
        description="How long a new order stays PENDING (cancellable by the customer) before it is PLACED.",
    )
    replenishment_order_events_retention_days: float = Field(
        30.0,
        gt=0,
        le=3660,
        description="How long the replenishment order feed keeps an event; older ones are purged.",
    )
    replenishment_promotion_interval_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description=(
            "How often the replenishment service places orders whose cancellation window closed "
            "and re-checks pending orders against the consent state (a consent change also wakes it)."
        ),
    )
    client_timeout_seconds: float = Field(
        5.0, gt=0, le=300, description="Default deadline of outgoing calls."
    )
    replenishment_telemetry_readings_per_second: float = Field(
        50.0,
        gt=0,
        le=100_000,
        description=(
            "Replenishment: readings one device may send per second over all its telemetry calls "
            "and streams (a token bucket holding up to 10 s of them, at least 1000); a stream "
            "beyond it ends with RESOURCE_EXHAUSTED."
        ),
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value

    @field_validator("data_subject_services")
    @classmethod
    def _known_services(cls, value: str) -> str:
        unknown = [name for name in value.split(",") if name and name not in DEFAULT_PORTS]
        if unknown:
            raise ValueError(f"unknown services: {', '.join(unknown)}")
        return value

    @field_validator("service")
    @classmethod
    def _known_service(cls, value: str) -> str:
        if value and value not in DEFAULT_PORTS:
            raise ValueError(f"must be one of {', '.join(SERVICE_NAMES)}")
        return value

    def address_of(self, service: str) -> str:
        return str(getattr(self, f"{service}_address"))

    @property
    def grpc_port(self) -> int:
        return DEFAULT_PORTS.get(self.service, 0) if self.port is None else self.port

    @property
    def effective_metrics_port(self) -> int:
        if self.metrics_port is None:
            return self.grpc_port + 1000 if self.grpc_port else 0
        return self.metrics_port

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / (self.service + '.db')}"

    @property
    def effective_model_dir(self) -> Path:
        return self.model_dir or self.data_dir / "models"

    @property
    def effective_token_hashes_file(self) -> Path:
        return self.token_hashes_file or self.data_dir / "token-hashes.json"


def load_settings(service: str, **overrides: object) -> Settings:
    """Reads the environment for `service`; on a bad value, exits naming the variable."""
    try:
        return Settings(service=service, **overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = [f"  NAJIMI_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()]
        print("najimi: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
