"""Durable message storage for the quarantine and the archive.

``put`` returns only once the bytes are on disk (written to a temporary file, fsynced, renamed
and the directory fsynced), because the proxy answers 250 for a quarantined message only after
this. Another store (S3-compatible, or the database) only has to offer the same three calls.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path


class FileStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def new_key(self, area: str) -> str:
        day = datetime.now(UTC).strftime("%Y/%m/%d")
        return f"{area}/{day}/{uuid.uuid4().hex}.eml"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
