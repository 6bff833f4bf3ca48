"""Where a backup's files live: a directory, or a prefix of an S3-compatible bucket.

:mod:`engram.control.backups` writes and reads a backup only through a :class:`BackupStore`,
so both destinations hold the same format (:mod:`backup_format`) and the same commit rule:
``backup.json`` is written last, whole, and a location without it holds no backup::

    store = open_store("s3://bucket/nightly", s3_endpoint="http://minio:9000")
    space = store.space("agent-7")            # s3://bucket/nightly/agent-7/
    sink = await space.create("wal.log")      # streamed: parts of PART_BYTES, never the file
    await sink.write(data); await sink.close()
    await space.put(MANIFEST, raw)            # the commit point
    async for data in space.read("wal.log"): ...

A directory store writes with ``fsync`` and renames the manifest into place. An S3 store
(boto3, the optional ``s3`` extra) sends a file of up to ``PART_BYTES`` with one PUT and a
larger one as a multipart upload, one part in memory at a time; an upload that fails is
aborted. Credentials come the standard boto3 way (environment, shared files, instance roles);
the endpoint from ``s3_endpoint``, else boto3's own ``AWS_ENDPOINT_URL``. Every blocking S3
call runs in a thread, so a backup's gRPC streams are read meanwhile. S3 failures are
:class:`~engram.contract.errors.StorageError` naming the object.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from engram.contract.errors import StorageError
from engram.control.backup_format import MANIFEST, BackupError

CHUNK_BYTES = 1 << 20
# One multipart part: S3 wants at least 5 MiB for every part but the last; 10,000 parts at
# most, so a file of up to ~80 GiB.
PART_BYTES = 8 << 20
S3_EXTRA = "pip install '.[s3]'"  # the optional dependency (boto3), named in the error

T = TypeVar("T")


class Sink(ABC):
    """One file being written; durable once :meth:`close` returns."""

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def abort(self) -> None:
        """Drops what was written (an upload that failed): nothing is left half-made."""


class BackupStore(ABC):
    """A location that holds one backup (``space(name)``) or several, one per space."""

    location: str  # as a person would name it: a path or s3://bucket/prefix

    def __str__(self) -> str:
        return self.location

    @abstractmethod
    def space(self, name: str) -> BackupStore:
        """The location of the backup of ``name`` under this one."""

    @abstractmethod
    async def size(self, name: str) -> int | None:
        """The size of file ``name`` here, None if there is none."""

    @abstractmethod
    async def clear(self) -> None:
        """Removes the files of a backup that did not finish (those directly here)."""

    @abstractmethod
    async def create(self, name: str) -> Sink: ...

    @abstractmethod
    async def put(self, name: str, data: bytes) -> None:
        """Writes a small file whole (the manifest): it appears complete or not at all."""

    @abstractmethod
    async def get(self, name: str) -> bytes | None:
        """A small file's bytes, None if there is none."""

    @abstractmethod
    def read(self, name: str) -> AsyncIterator[bytes]:
        """A file's bytes in chunks of at most ``CHUNK_BYTES``."""

    @abstractmethod
    async def backups(self) -> list[BackupStore]:
        """The locations directly under this one that hold a finished backup, by name."""


def open_store(
    location: str | os.PathLike[str], *, s3_endpoint: str = "", part_bytes: int = PART_BYTES
) -> BackupStore:
    """A directory, or ``s3://bucket/prefix`` (``s3_endpoint``: an S3-compatible service;
    ``part_bytes``: the size of a multipart upload's parts)."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        return S3Store.open(text, endpoint=s3_endpoint, part_bytes=part_bytes)
    return DirStore(Path(text))


def as_store(location: BackupStore | str | os.PathLike[str]) -> BackupStore:
    return location if isinstance(location, BackupStore) else open_store(location)


# ---------------------------------------------------------------------------- a directory


class DirStore(BackupStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def space(self, name: str) -> DirStore:
        return DirStore(self.path / name)

    async def size(self, name: str) -> int | None:
        f = self.path / name
        return f.stat().st_size if f.is_file() else None

    async def clear(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.iterdir():
            if leftover.is_file():
                leftover.unlink()

    async def create(self, name: str) -> Sink:
        self.path.mkdir(parents=True, exist_ok=True)
        return _FileSink(self.path / name)

    async def put(self, name: str, data: bytes) -> None:
        tmp = self.path / (name + ".tmp")
        with open(tmp, "wb") as f:  # noqa: ASYNC230 (a few kB)
            f.write(data)
            _fsync_open(f)
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)

    async def get(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    async def read(self, name: str) -> AsyncIterator[bytes]:
        with open(self.path / name, "rb") as f:  # noqa: ASYNC230 (page-cache reads)
            while data := f.read(CHUNK_BYTES):
                yield data

    async def backups(self) -> list[BackupStore]:
        if not self.path.is_dir():
            return []
        return [DirStore(d) for d in sorted(self.path.iterdir()) if (d / MANIFEST).is_file()]


class _FileSink(Sink):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close/abort)

    async def write(self, data: bytes) -> None:
        self.file.write(data)  # page cache; fsync at close

    async def close(self) -> None:
        _fsync_open(self.file)
        self.file.close()

    async def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _fsync_open(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- S3


class S3Store(BackupStore):
    """``s3://bucket/prefix``: objects ``prefix/<name>``, the prefix ending in ``/``."""

    def __init__(self, client: Any, bucket: str, prefix: str, part_bytes: int = PART_BYTES) -> None:
        self.client = client
        self.part_bytes = part_bytes
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}"

    @classmethod
    def open(cls, url: str, *, endpoint: str = "", part_bytes: int = PART_BYTES) -> S3Store:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise BackupError(f"{url!r} names no bucket: write s3://BUCKET/PREFIX")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise BackupError(
                f"backups to {url} need boto3, which is not installed: {S3_EXTRA}"
            ) from None
        config = Config(retries={"max_attempts": 5, "mode": "standard"})
        client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
        return cls(client, bucket, prefix, part_bytes)

    def space(self, name: str) -> S3Store:
        return S3Store(self.client, self.bucket, self.prefix + name, self.part_bytes)

    def key(self, name: str) -> str:
        return self.prefix + name

    async def call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """``fn(**kwargs)`` in a thread; its failure a StorageError naming ``what``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            if code in _MISSING:
                raise _Missing(f"s3://{self.bucket}/{what} does not exist") from None
            raise StorageError(
                f"s3://{self.bucket}/{what}: {code}: {err.get('Message', exc)}"
            ) from None
        except BotoCoreError as exc:
            raise StorageError(f"s3://{self.bucket}/{what}: {exc}") from None

    async def size(self, name: str) -> int | None:
        key = self.key(name)
        try:
            head = await self.call(key, self.client.head_object, Bucket=self.bucket, Key=key)
        except _Missing:
            return None
        return int(head["ContentLength"])

    async def _pages(self) -> AsyncIterator[dict[str, Any]]:
        """The listing of what is directly under the prefix (objects and sub-prefixes)."""
        token: dict[str, str] = {}
        while True:
            page: dict[str, Any] = await self.call(
                self.prefix,
                self.client.list_objects_v2,
                Bucket=self.bucket,
                Prefix=self.prefix,
                Delimiter="/",
                **token,
            )
            yield page
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    async def clear(self) -> None:
        keys = [o["Key"] async for page in self._pages() for o in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            await self.call(
                self.prefix,
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    async def create(self, name: str) -> Sink:
        return _S3Sink(self, self.key(name))

    async def put(self, name: str, data: bytes) -> None:
        key = self.key(name)
        await self.call(key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data)

    async def get(self, name: str) -> bytes | None:
        key = self.key(name)
        try:
            reply = await self.call(key, self.client.get_object, Bucket=self.bucket, Key=key)
        except _Missing:
            return None
        data: bytes = await self.call(key, reply["Body"].read)
        return data

    async def read(self, name: str) -> AsyncIterator[bytes]:
        key = self.key(name)
        reply = await self.call(key, self.client.get_object, Bucket=self.bucket, Key=key)
        body = reply["Body"]
        try:
            while data := await self.call(key, body.read, amt=CHUNK_BYTES):
                yield data
        finally:
            body.close()

    async def backups(self) -> list[BackupStore]:
        found: list[BackupStore] = []
        async for page in self._pages():
            for common in page.get("CommonPrefixes", []):
                child = S3Store(self.client, self.bucket, common["Prefix"], self.part_bytes)
                if await child.size(MANIFEST) is not None:
                    found.append(child)
        return sorted(found, key=lambda s: s.location)


# S3's answers for an object that is not there (HEAD answers a bare status).
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


class _Missing(StorageError):
    """The object is not there (a size or a manifest looked up: None to the caller)."""


class _S3Sink(Sink):
    """One object: a PUT when it fits in one part, else a multipart upload."""

    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.buffer = bytearray()
        self.upload_id = ""
        self.parts: list[dict[str, Any]] = []

    async def write(self, data: bytes) -> None:
        self.buffer += data
        size = self.store.part_bytes
        while len(self.buffer) >= size:
            part = bytes(self.buffer[:size])
            del self.buffer[:size]
            await self._upload_part(part)

    async def _upload_part(self, part: bytes) -> None:
        s, client = self.store, self.store.client
        if not self.upload_id:
            started = await s.call(
                self.key, client.create_multipart_upload, Bucket=s.bucket, Key=self.key
            )
            self.upload_id = started["UploadId"]
        number = len(self.parts) + 1
        reply = await s.call(
            self.key,
            client.upload_part,
            Bucket=s.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=part,
        )
        self.parts.append({"PartNumber": number, "ETag": reply["ETag"]})

    async def close(self) -> None:
        s, client = self.store, self.store.client
        rest = bytes(self.buffer)
        self.buffer.clear()
        if not self.upload_id:
            await s.call(self.key, client.put_object, Bucket=s.bucket, Key=self.key, Body=rest)
            return
        try:
            if rest:
                await self._upload_part(rest)
            await s.call(
                self.key,
                client.complete_multipart_upload,
                Bucket=s.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        self.buffer.clear()
        if self.upload_id:
            upload_id, self.upload_id = self.upload_id, ""
            s = self.store
            try:
                await s.call(
                    self.key,
                    s.client.abort_multipart_upload,
                    Bucket=s.bucket,
                    Key=self.key,
                    UploadId=upload_id,
                )
            except StorageError:
                pass  # the bucket's lifecycle rule for incomplete uploads removes it
