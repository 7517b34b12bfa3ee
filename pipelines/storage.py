"""Local paths and `s3://` URIs through one fsspec interface.

Credentials come the standard AWS way (environment, profiles, instance roles); an S3-compatible store's
endpoint comes from `endpoint_url` or the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables.
Nothing is written into files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or a URI such as s3://bucket/prefix."""
    options: dict = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = endpoint_url or endpoint_from_env()
        if endpoint:
            options["endpoint_url"] = endpoint
        uri = "s3://" + uri.split("://", 1)[1]
    fs, path = url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


@dataclass(frozen=True)
class Location:
    """A place in storage, made once and handed on: the URI a user gave, the filesystem it lives on (with the
    endpoint of an S3-compatible store already applied) and the root path within that filesystem. Picklable, so it
    crosses the Ray boundary as it is (fsspec filesystems pickle by their options)."""

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def of(cls, where: Location | str, endpoint_url: str | None = None) -> Location:
        """A Location for a local path or URI (a Location is returned as it is)."""
        if isinstance(where, Location):
            return where
        fs, root = filesystem(where, endpoint_url)
        return cls(where.rstrip("/") or where, fs, root)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def path(self, *parts: str) -> str:
        """A path within the filesystem under the root."""
        return join(self.root, *parts) if parts else self.root

    def child(self, *parts: str) -> Location:
        return Location(join(self.uri, *parts), self.fs, join(self.root, *parts))

    def refreshed(self) -> Location:
        """The same place with the filesystem's cached listings dropped: for state other processes change
        (checkpoints, run records), where s3fs would otherwise answer from a stale directory cache."""
        self.fs.invalidate_cache()
        return self

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, relative: str, data: bytes) -> None:
        write_bytes(self.fs, self.path(relative), data)

    def __str__(self) -> str:
        return self.uri


def refreshed(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem()`, with the listings it cached for this path dropped: for state that other processes change
    (checkpoints, run records), where s3fs would otherwise answer from a stale directory cache."""
    fs, path = filesystem(uri, endpoint_url)
    fs.invalidate_cache()  # all of it: children listings (a checkpoint folder's files) go stale too
    return fs, path


def require_bucket(uri: str, field: str, endpoint_url: str | None = None) -> None:
    """Fail, naming the config `field`, when an object-store URI's bucket is missing: never create one from a typo."""
    if not is_remote(uri):
        return
    fs, root = filesystem(uri, endpoint_url)
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"{field}: bucket {bucket!r} does not exist or is not reachable")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file, creating its folder on local disk (object stores have no folders)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and bucket paths alike."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")
