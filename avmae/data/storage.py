"""A shard folder as a flat set of named files, local or on an S3-compatible object store
(``s3://bucket/prefix``): the few operations the shard writer needs from either. Writes are
whole-file and atomic (a reader or a restarted writer never sees half a file), which is what
lets several machines write one folder and resume after a crash (docs/data.md). Object-store
errors are classified and passing faults retried by ``avmae.data.object_store``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from avmae.data import object_store


def is_url(location: str) -> bool:
    return "://" in location


class Location:
    """A local folder or an ``s3://bucket/prefix`` URL. The S3 client reads the usual environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and
    ``AWS_ENDPOINT_URL`` for a store other than AWS); one client per process."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/")
        self.remote = is_url(self.location)
        if self.remote:
            if not self.location.startswith("s3://"):
                raise ValueError(f"{location}: shards live in a folder or under an s3:// URL")
            self.bucket, _, self.prefix = self.location[len("s3://") :].partition("/")
        self._client = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_pid": None}

    def __str__(self) -> str:
        return self.location

    def path(self, name: str) -> str:
        """The full path or URL of ``name``, for messages."""
        return f"{self.location}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():  # a boto3 client is not fork-safe
            import boto3

            self._client, self._pid = boto3.client("s3", config=object_store.client_config()), os.getpid()
        return self._client

    def _call(self, fn, name: str):
        """``fn()``, an object-store request about ``name``, through ``object_store.call``."""
        return object_store.call(fn, self.path(name))

    def read(self, name: str) -> bytes:
        """The bytes of ``name``; ``FileNotFoundError`` naming it when it cannot be read."""
        if not self.remote:
            path = Path(self.location) / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found")
            return path.read_bytes()
        return self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read(), name)

    def write(self, name: str, data: bytes) -> None:
        """Store ``name`` whole: a local file is written aside and renamed, an object is one PUT."""
        if self.remote:
            self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data), name)
            return
        folder = Path(self.location)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.{socket.gethostname()}-{os.getpid()}.partial"
        partial.write_bytes(data)
        os.replace(partial, folder / name)

    def put(self, name: str, local: Path) -> None:
        """Move the finished local file ``local`` (from ``staging``) to ``name``."""
        if self.remote:
            self._call(lambda: self.client.upload_file(str(local), self.bucket, self._key(name)), name)
            local.unlink()
        else:
            os.replace(local, Path(self.location) / name)  # staging is inside the folder: same file system

    def names(self, prefix: str = "") -> list[str]:
        """The names of the files directly in the location that start with ``prefix``."""
        if not self.remote:
            folder = Path(self.location)
            return sorted(p.name for p in folder.glob(f"{prefix}*") if p.is_file()) if folder.is_dir() else []
        base = self._key("")

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            return [obj["Key"][len(base) :] for page in pages for obj in page.get("Contents", [])]

        return sorted(n for n in self._call(listing, prefix + "*") if "/" not in n)

    def delete(self, name: str) -> None:
        if self.remote:
            self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(name)), name)
        else:
            (Path(self.location) / name).unlink(missing_ok=True)

    def staging(self, tag: str) -> Path:
        """A fresh local folder to write files in before ``put``: inside the folder itself (so the
        move is a rename), or a temporary folder for an object store."""
        if self.remote:
            return Path(tempfile.mkdtemp(prefix=f"avmae-{tag}-"))
        path = Path(self.location) / ".staging" / f"{tag}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def clear_staging(self) -> None:
        """Remove what killed writers left in the local staging folder (call when none is writing)."""
        if not self.remote:
            shutil.rmtree(Path(self.location) / ".staging", ignore_errors=True)
