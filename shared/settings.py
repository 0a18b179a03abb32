"""The one typed settings object, read from ``BATCHBRIDGE_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.limits import TOGETHER_MAX_BATCH_BYTES, TOGETHER_MAX_BATCH_REQUESTS

ENV_PREFIX = "BATCHBRIDGE_"

ProviderName = Literal["local", "together"]


class SettingsError(ValueError):
    """Raised at start-up when an environment variable holds an invalid value."""


class Settings(BaseSettings):
    """Everything configurable about batchbridge; passed explicitly, never global."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None, description="Redis URL; unset means the CLI starts an embedded Redis."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset means SQLite under the data directory."
    )
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".batchbridge")
    provider: ProviderName | None = Field(
        default=None, description="Default provider; unset picks together when a key is set."
    )
    key_prefix: str = Field(default="bb", pattern=r"^[A-Za-z0-9_.-]{1,32}$")

    max_batch_requests: int = Field(default=10_000, ge=1, le=TOGETHER_MAX_BATCH_REQUESTS)
    max_batch_bytes: int = Field(default=90_000_000, ge=1024, le=TOGETHER_MAX_BATCH_BYTES)
    max_wait_seconds: float = Field(default=300.0, gt=0)
    max_line_bytes: int = Field(default=1_000_000, ge=256)

    aggregate_interval_seconds: float = Field(default=1.0, gt=0)
    submit_interval_seconds: float = Field(default=2.0, gt=0)
    poll_interval_seconds: float = Field(default=30.0, gt=0)
    reap_interval_seconds: float = Field(default=60.0, gt=0)
    claim_timeout_seconds: float = Field(default=600.0, gt=0)
    # Leases are renewed while held: this bounds how long a dead worker's batch stays taken.
    lease_seconds: float = Field(default=30.0, ge=1)
    # A job the provider answers 404 for is only taken as lost once this long has passed (and
    # the batch list confirms it is gone): 404s from an outage or a key change must not re-bill.
    lost_job_grace_seconds: float = Field(default=900.0, ge=0)
    # A COMPLETED job without output files is polled again this long (files can lag the status).
    missing_output_grace_seconds: float = Field(default=600.0, ge=0)

    max_attempts: int = Field(default=3, ge=1, le=100)
    result_ttl_seconds: int = Field(default=7 * 86_400, ge=60)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1)
    callback_visibility_timeout_seconds: float = Field(default=300.0, gt=0)
    # A result redelivered more often than this moves to the queue's dead-letter stream.
    callback_max_deliveries: int = Field(default=10, ge=1, le=10_000)
    # Metadata travels with the request and counts toward its line and batch byte limits.
    max_metadata_bytes: int = Field(default=16_384, ge=0, le=1_000_000)
    # Every provider HTTP call gives up after this long (and a create is then ambiguous).
    provider_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # The embedded Redis' fsync policy: "always" loses no acknowledged submit, "everysec"
    # (the default) up to about one second of writes on an OS crash or power loss.
    redis_appendfsync: Literal["always", "everysec"] = "everysec"

    visibility_timeout_seconds: int = Field(default=3600, ge=10)
    task_time_limit_seconds: int = Field(default=600, ge=5)
    worker_concurrency: int = Field(default=2, ge=1, le=256)

    local_engine: Literal["echo"] = "echo"

    @model_validator(mode="after")
    def _task_limits_fit_visibility(self) -> Settings:
        # A task that may outlive the broker's visibility timeout is redelivered while it still
        # runs, so the hard limit must stay well inside it.
        if self.task_time_limit_seconds * 2 > self.visibility_timeout_seconds:
            raise ValueError(
                f"{ENV_PREFIX}TASK_TIME_LIMIT_SECONDS ({self.task_time_limit_seconds}) must be at "
                f"most half of {ENV_PREFIX}VISIBILITY_TIMEOUT_SECONDS "
                f"({self.visibility_timeout_seconds})"
            )
        return self

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment (plus overrides) or raise SettingsError naming the variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise SettingsError(describe_validation_error(exc)) from None

    @property
    def default_provider(self) -> ProviderName:
        """The provider used when a request names none."""
        if self.provider is not None:
            return self.provider
        return "together" if os.environ.get("TOGETHER_API_KEY") else "local"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to SQLite under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'batchbridge.sqlite3'}"


def describe_validation_error(exc: ValidationError) -> str:
    """Render a settings ValidationError as one line per bad variable."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
        if field:
            name = f"{ENV_PREFIX}{field.upper()}"
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        else:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(lines)
