"""The one typed settings object, read from ``BATCHBRIDGE_*`` environment variables."""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from shared.crash_points import parse_crash_plan
from shared.limits import TOGETHER_MAX_BATCH_BYTES, TOGETHER_MAX_BATCH_REQUESTS
from shared.urls import check_database_url, check_redis_url

ENV_PREFIX = "BATCHBRIDGE_"

ProviderName = Literal["local", "together"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Standard Webhooks: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
_SECRET_SPLIT = re.compile(r"[\s,]+")
# BATCHBRIDGE_* variables read outside Settings: the local provider's fault injection and
# API key, and the test and benchmark suites' servers.
_OTHER_VARIABLE_PREFIXES = ("LOCAL_", "TEST_", "BENCH_")
# Read by docker-compose.yml and the deploy scripts, not by batchbridge itself.
_DEPLOYMENT_VARIABLES = frozenset({"IMAGE"})
_MAX_TTL_SECONDS = 10 * 366 * 86_400
log = logging.getLogger("batchbridge.settings")
# What the settings read as JSON must look like, for the error when one does not parse.
_JSON_SHAPES = {
    "webhook_endpoint_secrets": "a JSON object of URL prefix to secret, "
    + 'e.g. {"https://h/": "whsec_..."}',
}


class SettingsError(ValueError):
    """Raised at start-up when an environment variable holds an invalid value."""


class Settings(BaseSettings):
    """Everything configurable about batchbridge; passed explicitly, never global."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        # "inf" and "nan" parse as floats; no duration, rate or delay here means either, and
        # they only failed later, where a script or a socket took them.
        allow_inf_nan=False,
    )

    # Both URLs may carry passwords: SecretStr keeps them out of reprs, logs and Celery's conf.
    redis_url: SecretStr | None = Field(
        default=None, description="Redis URL; unset means the CLI starts an embedded Redis."
    )
    database_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL; unset means SQLite under the data directory."
    )
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".batchbridge")
    provider: ProviderName | None = Field(
        default=None, description="Default provider; unset picks together when a key is set."
    )
    # Together's own variable name, as its SDK and docs use it; a secret like the URLs.
    together_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TOGETHER_API_KEY", f"{ENV_PREFIX}TOGETHER_API_KEY"),
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
    # At most ten years: Redis refuses a larger EX, which failed the script setting it.
    result_ttl_seconds: int = Field(default=7 * 86_400, ge=60, le=_MAX_TTL_SECONDS)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1, le=_MAX_TTL_SECONDS)
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

    # Webhooks (worker side: the producer only stores the URL). Several secrets, separated by
    # spaces or commas, are all used to sign during a rotation.
    webhook_secret: SecretStr | None = None
    # URL prefix -> secret(s), as JSON; the longest matching prefix wins over webhook_secret.
    webhook_endpoint_secrets: dict[str, SecretStr] = Field(default_factory=dict)
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    # Seconds before each attempt, the first counted from the result (comma-separated).
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    # Private ranges webhooks may reach anyway (comma-separated CIDRs; local development).
    webhook_allow_cidrs: Annotated[tuple[IPNetwork, ...], NoDecode] = ()
    webhook_concurrency: int = Field(default=32, ge=1, le=1024)
    webhook_endpoint_concurrency: int = Field(default=4, ge=1, le=1024)
    webhook_interval_seconds: float = Field(default=1.0, gt=0)
    # Finished requests, batches and webhook deliveries older than this are pruned from SQL
    # by the reaper; 0 keeps them for ever.
    sql_retention_days: float = Field(default=30.0, ge=0)
    # Keep uploaded input and downloaded result files at the provider after collection.
    keep_provider_files: bool = False

    visibility_timeout_seconds: int = Field(default=3600, ge=10)
    task_time_limit_seconds: int = Field(default=600, ge=5)
    worker_concurrency: int = Field(default=2, ge=1, le=256)
    # Freed heap glibc keeps for reuse in each producer and worker process instead of
    # returning it to the OS and faulting it back in (shared/allocator.py); 0 leaves it alone.
    malloc_top_pad_bytes: int = Field(default=16 * 2**20, ge=0, le=2**31 - 1)

    # Test-only fault injection (the reliability suite): the worker SIGKILLs itself the first
    # N times it reaches each named step, counting crashes by marker files in crash_dir
    # across restarts. `step` or `step*N`, comma-separated; see shared/crash_points.py.
    crash_at: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    crash_dir: Path | None = None

    local_engine: Literal["echo"] = "echo"
    # A TOML price table for `batchbridge cost`, over the one shipped in shared/prices.toml.
    prices_file: Path | None = None

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_url_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_redis_url(value.get_secret_value())
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _database_url_parses(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_database_url(value.get_secret_value())
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p for p in value.replace(" ", "").split(",") if p]
            if not parts:
                raise ValueError("must list at least one delay in seconds, e.g. 0,5,300")
            return tuple(parts)
        return value

    @field_validator("webhook_retry_schedule", mode="after")
    @classmethod
    def _schedule_is_sane(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(d < 0 or d > 7 * 86_400 for d in value):
            raise ValueError("every delay must be between 0 and 604800 seconds")
        return value

    @field_validator("webhook_allow_cidrs", mode="before")
    @classmethod
    def _split_cidrs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p for p in value.replace(" ", "").split(",") if p)
        return value

    @field_validator("crash_at", mode="before")
    @classmethod
    def _parse_crash_plan(cls, value: Any) -> Any:
        return parse_crash_plan(value)

    @field_validator("webhook_secret", mode="after")
    @classmethod
    def _secret_is_whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            webhook_keys(value)
        return value

    @field_validator("webhook_endpoint_secrets", mode="after")
    @classmethod
    def _endpoint_secrets_are_whsec(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for prefix, secret in value.items():
            if not prefix.startswith(("http://", "https://")):
                raise ValueError(f"key {prefix!r} must be a URL prefix (http:// or https://)")
            webhook_keys(secret)
        return value

    @model_validator(mode="after")
    def _crashes_are_counted(self) -> Settings:
        if self.crash_at and self.crash_dir is None:
            # Without markers a planned crash would recur on every restart, for ever.
            raise ValueError(
                f"{ENV_PREFIX}CRASH_AT needs {ENV_PREFIX}CRASH_DIR, where crashes are counted"
            )
        return self

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
        for warning in unknown_variables(os.environ):
            log.warning("%s", warning)
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise SettingsError(describe_validation_error(exc)) from None
        except PydanticSettingsError as exc:  # a value that should be JSON and is not
            raise SettingsError(describe_decoding_error(exc)) from None

    @property
    def configured_redis_url(self) -> str | None:
        """BATCHBRIDGE_REDIS_URL in clear (for connecting only: never log it)."""
        return self.redis_url.get_secret_value() if self.redis_url else None

    @property
    def default_provider(self) -> ProviderName:
        """The provider used when a request names none."""
        if self.provider is not None:
            return self.provider
        key = self.together_api_key or os.environ.get("TOGETHER_API_KEY")
        return "together" if key else "local"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to SQLite under the data directory."""
        if self.database_url:
            url = self.database_url.get_secret_value()
            # The driver that ships is psycopg 3; SQLAlchemy would pick psycopg2 for these.
            for bare in ("postgresql://", "postgres://"):
                if url.startswith(bare):
                    return "postgresql+psycopg://" + url.removeprefix(bare)
            return url
        return f"sqlite:///{self.data_dir / 'batchbridge.sqlite3'}"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each BATCHBRIDGE_* variable no setting reads, naming the closest one."""
    known = {name.upper() for name in Settings.model_fields}
    warnings = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        name = variable.removeprefix(ENV_PREFIX)
        if (
            name in known
            or name in _DEPLOYMENT_VARIABLES
            or name.startswith(_OTHER_VARIABLE_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        warnings.append(f"{variable} is not a batchbridge setting and is ignored{hint}")
    return warnings


def webhook_keys(secret: SecretStr) -> list[bytes]:
    """The signing keys in a ``whsec_<base64>`` secret (several, space/comma-separated).

    Raises ValueError (never showing the secret) when one is malformed.
    """
    keys = []
    for part in _SECRET_SPLIT.split(secret.get_secret_value().strip()):
        if not part.startswith("whsec_"):
            raise ValueError("each secret must look like whsec_<base64> (Standard Webhooks)")
        try:
            key = base64.b64decode(part.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the part after whsec_ must be base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError("a secret must hold 24 to 64 bytes (32 recommended)")
        keys.append(key)
    return keys


def describe_decoding_error(exc: PydanticSettingsError) -> str:
    """Name the variable pydantic-settings could not decode as JSON (never its value)."""
    found = re.search(r'field "(\w+)"', str(exc))
    field = found.group(1) if found else ""
    name = f"{ENV_PREFIX}{field.upper()}" if field else f"a {ENV_PREFIX}* variable"
    shape = _JSON_SHAPES.get(field, "valid JSON")
    return f"invalid settings: {name}: must be {shape} (value not shown: it may hold a secret)"


def describe_validation_error(exc: ValidationError) -> str:
    """Render a settings ValidationError as one line per bad variable."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
        if field:
            name = f"{ENV_PREFIX}{str(err['loc'][0]).upper()}"
            message = str(err["msg"]).removeprefix("Value error, ")
            if "secret" in name.lower():
                lines.append(f"{name}: {message} (value not shown: it is a secret)")
            elif name.endswith("_URL"):
                lines.append(f"{name}: {message} (value not shown: it may hold a password)")
            else:
                lines.append(f"{name}: {message} (got {err.get('input')!r})")
        else:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(lines)
