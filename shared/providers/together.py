"""Together AI's Batch API, through the official ``together`` SDK.

The SDK already retries 408/409/429/5xx and connection errors a couple of times (honouring
``Retry-After``); what still fails is turned into a ``ProviderError`` whose ``retryable`` flag
tells the worker whether to try again on a later beat or to give up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import together
from together import Together

from shared.providers.base import ProviderBatch, ProviderBatchStatus, ProviderError

log = logging.getLogger(__name__)
_PERMANENT = frozenset({400, 401, 402, 403, 404, 422})


class TogetherProvider:
    """``BatchProvider`` for Together AI; honours ``TOGETHER_API_KEY`` and ``TOGETHER_BASE_URL``.

    ``timeout`` (seconds) bounds every HTTP call, the create included (the SDK's
    ``with_options`` keeps it); a call that runs out of it raises a retryable "timed out"
    ProviderError.
    """

    name = "together"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        max_retries: int = 2,
        timeout: float = 60.0,
        client: Together | None = None,
    ) -> None:
        key = api_key or os.environ.get("TOGETHER_API_KEY")
        if client is None and not key:
            raise ProviderError("TOGETHER_API_KEY is not set", retryable=False)
        self._client = client or Together(
            api_key=key,
            base_url=base_url or os.environ.get("TOGETHER_BASE_URL"),
            max_retries=max_retries,
            timeout=timeout,
        )

    def upload_file(self, path: Path) -> str:
        """Upload with ``purpose="batch-api"``; the server validates the lines later."""
        with _mapped_errors("upload"):
            return str(self._client.files.upload(file=path, purpose="batch-api", check=False).id)

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        """Create a batch job over an uploaded file (the model comes from its lines)."""
        # No SDK retries here: a retried POST after a lost response would create (and bill) a
        # second job. The worker retries on a later beat, after looking for the first one.
        with _mapped_errors("create batch"):
            created = self._client.with_options(max_retries=0).batches.create(
                input_file_id=input_file_id, endpoint="/v1/chat/completions"
            )
        if created.job is None or not created.job.id:
            warning = getattr(created, "warning", None)
            raise ProviderError(f"batch was not created: {warning}", retryable=True)
        return to_provider_batch(created.job)

    def get_batch(self, batch_id: str) -> ProviderBatch:
        """Retrieve a batch job."""
        with _mapped_errors("retrieve batch"):
            return to_provider_batch(self._client.batches.retrieve(batch_id))

    def cancel_batch(self, batch_id: str) -> ProviderBatch:
        """Cancel a batch job."""
        with _mapped_errors("cancel batch"):
            return to_provider_batch(self._client.batches.cancel(batch_id))

    def list_batches(self) -> list[ProviderBatch]:
        """All the account's batch jobs."""
        with _mapped_errors("list batches"):
            return [to_provider_batch(job) for job in self._client.batches.list()]

    def file_exists(self, file_id: str) -> bool:
        """True if Together still has the file, False if it answers 404."""
        try:
            with _mapped_errors("retrieve file"):
                self._client.files.retrieve(file_id)
        except ProviderError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def download_file(self, file_id: str, dest: Path) -> None:
        """Stream a file's content to ``dest`` chunk by chunk (output files reach 100 MB)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with (
            _mapped_errors("download file"),
            self._client.files.with_streaming_response.content(id=file_id) as response,
            open(tmp, "wb") as out,
        ):
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
        tmp.replace(dest)

    def delete_file(self, file_id: str) -> None:
        """Delete a file at Together; one that answers 404 is already gone, which is fine."""
        if not file_id:
            # The SDK would raise a bare ValueError before any request.
            raise ProviderError("delete_file: file_id must not be empty", retryable=False)
        try:
            with _mapped_errors("delete file"):
                answer = self._client.files.delete(file_id)
        except ProviderError as exc:
            # A retried DELETE whose first answer was lost lands here too: it took effect.
            if exc.status_code == 404:
                return
            raise
        if answer.deleted is False:
            raise ProviderError(
                f"Together delete file answered deleted=false for {file_id}", retryable=True
            )

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def to_provider_batch(job: Any) -> ProviderBatch:
    """An SDK ``BatchJob`` as our ``ProviderBatch``; unknown statuses map to UNKNOWN."""
    raw = str(job.status or "")
    status = ProviderBatchStatus.from_together(raw)
    if status is ProviderBatchStatus.UNKNOWN:
        log.warning("Together batch %s has an unknown status %r", job.id, raw)
    return ProviderBatch(
        id=str(job.id),
        status=status,
        raw_status=raw,
        input_file_id=str(job.input_file_id or ""),
        output_file_id=job.output_file_id or None,
        error_file_id=job.error_file_id or None,
        error=job.error or None,
        progress=float(job.progress or 0.0),
        model=getattr(job, "x_model_id", None),
        created_at=job.created_at,
        completed_at=job.completed_at,
    )


@contextmanager
def _mapped_errors(action: str) -> Iterator[None]:
    try:
        yield
    except together.APIStatusError as exc:
        code = exc.status_code
        raise ProviderError(
            f"Together {action} failed with {code}: {_message(exc)}",
            retryable=code not in _PERMANENT,
            status_code=code,
            retry_after=_retry_after(exc.response.headers),
        ) from exc
    except (together.APITimeoutError, httpx.TimeoutException) as exc:
        # Before APIConnectionError, its base class. The call may have taken effect: for a
        # create, the caller must look for the job before creating another.
        raise ProviderError(
            f"Together {action} timed out: no answer within the client timeout "
            "(the call may still have taken effect)",
            retryable=True,
        ) from exc
    except together.APIConnectionError as exc:
        raise ProviderError(f"Together {action} failed: {exc}", retryable=True) from exc
    except FileNotFoundError as exc:
        raise ProviderError(f"Together {action} failed: {exc}", retryable=False) from exc
    except (together.TogetherError, httpx.HTTPError, OSError) as exc:
        # Anything else from the SDK or the stream (a malformed response, a dropped download).
        raise ProviderError(f"Together {action} failed: {exc!r}", retryable=True) from exc


def _message(exc: together.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error)
    return exc.message


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None
