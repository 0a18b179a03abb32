"""Deleting a collected batch's files at its provider, so they do not pile up there."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded

from shared.models import Batch
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def provider_file_ids(batch: Batch) -> list[str]:
    """The batch's input, output and error file ids at its provider (known ones, each once)."""
    ids = (batch.provider_file_id, batch.output_file_id, batch.error_file_id)
    return list(dict.fromkeys(file_id for file_id in ids if file_id))


def delete_provider_files(ctx: WorkerContext, batch: Batch) -> list[str]:
    """Delete a FINISHED batch's provider files unless ``keep_provider_files``; the ids deleted.

    Best effort: the results are already in the record, so a file that cannot be deleted
    only costs storage at the provider. Failures are logged in one WARNING and never raised.
    """
    if ctx.settings.keep_provider_files:
        return []
    file_ids = provider_file_ids(batch)
    if not file_ids:
        return []
    deleted: list[str] = []
    failures: list[str] = []
    try:
        provider = ctx.provider(batch.provider)
    except Exception as exc:  # an unknown or misconfigured provider: nothing can be deleted
        failures = [f"provider {batch.provider!r} unavailable: {_describe(exc)}"]
    else:
        for file_id in file_ids:
            try:
                provider.delete_file(file_id)
            except SoftTimeLimitExceeded:
                raise  # out of time: the task must stop, not carry on deleting
            except Exception as exc:
                failures.append(f"{file_id}: {_describe(exc)}")
            else:
                deleted.append(file_id)
    if failures:
        # Only the provider's error text: ProviderError messages never carry the API key, and
        # a traceback would add nothing the operator can act on.
        log.warning(
            "batch %s: could not delete %d of its %d files at provider %s (they stay there): %s",
            batch.id,
            len(file_ids) - len(deleted),
            len(file_ids),
            batch.provider,
            "; ".join(failures),
        )
    return deleted


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
