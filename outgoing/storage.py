"""Durable message storage for the quarantine and the archive.

A stored message is a database row (``QuarantinedMessage`` or ``ArchivedMessage``) plus its
body. Where the body lives is told by the row's ``storage_key``:

- a plain relative path (``quarantine/2026/11/29/<uuid>.eml``): a file under ``STORAGE_DIR``
  (:class:`FileStore`, the default, ``MESSAGE_STORE = "file"``);
- ``db:``: the row's own ``body`` column (:class:`DatabaseStore`, ``MESSAGE_STORE =
  "database"``), for deployments where the proxy, the worker and the control panel run on
  different hosts and share only the database (PostgreSQL).

Reading and deleting dispatch on the key, so switching ``MESSAGE_STORE`` never strands the
messages stored before. Another store (S3-compatible) only needs ``attach`` / ``read`` /
``discard`` and a key prefix of its own (``s3:``).

Durability: ``FileStore.put`` returns only once the bytes are on disk (temporary file,
fsync, rename, fsync of the directory); a database body is durable when its row's
transaction commits. The proxy answers 250 for a quarantined message only after both.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

DB_PREFIX = "db:"
STORES = ("file", "database")


class StorageError(Exception):
    """The store is misconfigured or a body cannot be read."""


class FileStore:
    """Bodies as files under one folder (``STORAGE_DIR``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def new_key(self, area: str) -> str:
        day = datetime.now(UTC).strftime("%Y/%m/%d")
        return f"{area}/{day}/{uuid.uuid4().hex}.eml"

    def _path(self, key: str) -> Path:
        """The file of ``key``, which must name one below the store: a relative path of
        plain names (no ``..``, no empty or absolute part). Checked by its text: resolving
        the path on every message cost a sixteenth of the content pipeline's CPU."""
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") or "\0" in part for part in parts):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Every body on disk before it returns. All the files are written before the first
        is synced, so that the file system can flush them together (one journal commit on
        ext4, where a sync per file written would wait for one each); then each is renamed
        into place and each folder synced once for all the files it got."""
        written: list[tuple[Path, Path, int]] = []
        folders: dict[Path, None] = {}
        try:
            for key, data in items:
                path = self._path(key)
                if path.parent not in folders:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    folders[path.parent] = None
                tmp = path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                written.append((tmp, path, fd))
                with memoryview(data) as view:
                    while view:
                        view = view[os.write(fd, view):]
            for _, _, fd in written:
                os.fsync(fd)
            for tmp, path, _ in written:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _, _ in written:  # those not yet in place (the caller removes the rest)
                tmp.unlink(missing_ok=True)
            raise
        finally:
            for _, _, fd in written:
                os.close(fd)
        for folder in folders:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # -- the store interface -----------------------------------------------------------------
    def attach(self, row, data: bytes, area: str) -> None:
        """Write ``data`` durably and point ``row`` at it (before the row is committed)."""
        self.attach_many([(row, data)], area)

    def attach_many(self, rows: list[tuple[object, bytes]], area: str) -> None:
        keys = [self.new_key(area) for _ in rows]
        try:
            self.put_many([(key, data) for key, (_, data) in zip(keys, rows, strict=True)])
        except BaseException:
            for key in keys:  # the ones written before the failure
                self.delete(key)
            raise
        for key, (row, _) in zip(keys, rows, strict=True):
            row.storage_key = key

    def discard(self, key: str) -> None:
        """Forget a body whose row is gone (or was never committed)."""
        self.delete(key)


class DatabaseStore:
    """Bodies in the row's ``body`` column: durable with the row's commit."""

    def attach(self, row, data: bytes, area: str) -> None:
        row.body = bytes(data)
        row.storage_key = DB_PREFIX

    def attach_many(self, rows: list[tuple[object, bytes]], area: str) -> None:
        for row, data in rows:
            self.attach(row, data, area)

    def discard(self, key: str) -> None:
        """Nothing to do: the body went with its row."""


def store_for(config: dict):
    """The store new messages go to, as ``MESSAGE_STORE`` says."""
    kind = (config.get("MESSAGE_STORE") or "file").strip().lower()
    if kind == "file":
        return FileStore(config["STORAGE_DIR"])
    if kind == "database":
        return DatabaseStore()
    raise StorageError(f"MESSAGE_STORE: expected one of {', '.join(STORES)}, got {kind!r}")


def read_body(config: dict, row) -> bytes:
    """The stored bytes of ``row`` (quarantined or archived), wherever they live.

    Needs the row's session to be open when the body is in the database (the column is
    deferred, loaded on first access).
    """
    key = row.storage_key or ""
    if key.startswith(DB_PREFIX):
        if row.body is None:
            raise StorageError(f"message {row.id} has no body in the database")
        return bytes(row.body)
    try:
        return FileStore(config["STORAGE_DIR"]).get(key)
    except (OSError, ValueError) as exc:
        raise StorageError(f"message {row.id}: cannot read {key!r}: {exc}") from exc


def discard_body(config: dict, key: str) -> None:
    """Delete a body after its row was deleted (files only; database bodies went with it)."""
    if not key or key.startswith(DB_PREFIX):
        return
    FileStore(config["STORAGE_DIR"]).delete(key)


def commit_with_bodies(session, store, rows) -> None:
    """Commit ``rows``, whose bodies ``store`` already holds. A failure before the commit was
    sent (the INSERTs) discards the bodies: no row will ever name them. A failure of the
    commit itself keeps them: the database may have committed and only its answer was lost
    (a cut connection), and a row whose body was deleted could never be read or released,
    where a body without a row only takes disk space."""
    try:
        session.flush()
    except BaseException:
        for row in rows:
            store.discard(row.storage_key)
        raise
    session.commit()

