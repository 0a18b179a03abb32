"""Building the provider a batch names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.providers.base import BatchProvider
from shared.settings import Settings

PROVIDER_NAMES = ("local", "together")


class UnknownProvider(ValueError):
    """A batch or request named a provider batchbridge does not have."""


def build_provider(
    name: str, settings: Settings, *, dispatch: Callable[[str], None] | None = None
) -> BatchProvider:
    """The provider called ``name``; ``dispatch`` runs local batches (see LocalProvider)."""
    if name == "local":
        from shared.providers.local import LocalProvider, LocalStore
        from shared.providers.local.faults import Faults

        # The BATCHBRIDGE_LOCAL_* fault knobs work in-process too, to rehearse failures.
        store = LocalStore(local_provider_root(settings))
        return LocalProvider(
            store,
            dispatch=dispatch,
            faults=Faults.from_env(),
            timeout=settings.provider_timeout_seconds,
        )
    if name == "together":
        from shared.providers.together import TogetherProvider

        key = settings.together_api_key
        return TogetherProvider(
            api_key=key.get_secret_value() if key else None,
            timeout=settings.provider_timeout_seconds,
        )
    raise UnknownProvider(f"provider must be one of {PROVIDER_NAMES} (got {name!r})")


def local_provider_root(settings: Settings) -> Path:
    """Where the local provider keeps its files and jobs."""
    return settings.data_dir / "local_provider"
