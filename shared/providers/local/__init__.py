"""A local stand-in for Together's Batch API: an on-disk store, a runner and a provider."""

from __future__ import annotations

from shared.providers.local.engines import (
    DRY_RUN_FINGERPRINT,
    EchoEngine,
    Engine,
    LineError,
    get_engine,
)
from shared.providers.local.faults import CallFaults, Faults, InjectedFailure
from shared.providers.local.file_writer import FileWriter
from shared.providers.local.provider import LocalProvider, to_provider_batch
from shared.providers.local.records import BatchJob, JobStatus, PendingUpload, StoredFile, iso_z
from shared.providers.local.runner import run_job
from shared.providers.local.shuffle import BucketShuffler
from shared.providers.local.store import FILE_PURPOSES, FILE_TYPES, LocalStore, NotFound
from shared.providers.local.validation import ValidationResult, read_requests, validate_input_file

__all__ = [
    "DRY_RUN_FINGERPRINT",
    "FILE_PURPOSES",
    "FILE_TYPES",
    "BatchJob",
    "BucketShuffler",
    "CallFaults",
    "EchoEngine",
    "Engine",
    "Faults",
    "FileWriter",
    "InjectedFailure",
    "JobStatus",
    "LineError",
    "LocalProvider",
    "LocalStore",
    "NotFound",
    "PendingUpload",
    "StoredFile",
    "ValidationResult",
    "get_engine",
    "iso_z",
    "read_requests",
    "run_job",
    "to_provider_batch",
    "validate_input_file",
]
