"""Streams a new file into the store so it appears complete or not at all."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from shared.providers.local.records import StoredFile


class FileWriter:
    """Streams a new file into the store; it appears (atomically) only on ``commit``."""

    def __init__(
        self,
        *,
        file_id: str,
        part_path: Path,
        filename: str,
        purpose: str,
        publish: Callable[[StoredFile, Path], None],
        clock: Callable[[], float] = time.time,
        file_type: str = "jsonl",
    ) -> None:
        self.id = file_id
        self.file_type = file_type
        self._clock = clock
        self._part_path = part_path
        self._filename = filename
        self._purpose = purpose
        self._publish = publish
        # Written a line at a time: 1 MB of buffer makes that a few large writes.
        self._fh = open(part_path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed by commit/abort
        self._bytes = 0
        self._newlines = 0
        self._last_byte = b"\n"
        self._done = False

    @property
    def bytes_written(self) -> int:
        """How many bytes were written so far."""
        return self._bytes

    def write(self, data: bytes) -> None:
        """Append bytes to the file."""
        if not data:
            return
        self._fh.write(data)
        self._bytes += len(data)
        self._newlines += data.count(b"\n")
        self._last_byte = data[-1:]

    def commit(self) -> StoredFile:
        """Make the file durable and visible in the store."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._done = True
        unterminated = 1 if self._last_byte != b"\n" else 0
        stored = StoredFile(
            id=self.id,
            filename=self._filename,
            bytes=self._bytes,
            purpose=self._purpose,
            created_at=int(self._clock()),
            line_count=self._newlines + unterminated,
            file_type=self.file_type,
        )
        self._publish(stored, self._part_path)
        return stored

    def abort(self) -> None:
        """Throw the partial file away."""
        if not self._done:
            self._done = True
            self._fh.close()
            self._part_path.unlink(missing_ok=True)

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()
