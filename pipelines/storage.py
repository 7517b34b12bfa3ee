"""Local paths and `s3://` URIs through one fsspec interface.

Credentials come the standard AWS way (environment, profiles, instance roles); an S3-compatible store's
endpoint comes from `endpoint_url` or the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables.
Nothing is written into files.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# A write refused for want of room: no space left on the device, or over the user's quota. Neither goes away by
# retrying, so the jobs stop on it once (`DiskFull`) instead of spending their retries.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("No space left on device", "Disk quota exceeded")
NO_SPACE = FULL_WORDS[0]


class DiskFull(OSError):
    """A write that found no room, with where, how many bytes it needed and how many were free (None: unknown)."""

    def __init__(self, path: str, needed: int | None, free: int | None, then: str = "",
                 reason: str = NO_SPACE) -> None:
        super().__init__(errno.ENOSPC, disk_full_message(path, needed, free, then, reason))
        self.path, self.needed, self.free, self.then, self.reason = path, needed, free, then, reason

    @classmethod
    def of(cls, error: BaseException, path: str, needed: int | None) -> DiskFull:
        """`error`, a write refused for want of room, as a DiskFull at `path` (its own reason kept: a quota's)."""
        if isinstance(error, DiskFull):
            return error
        quota = (isinstance(error, OSError) and error.errno == errno.EDQUOT) or FULL_WORDS[1] in str(error)
        return cls(path, needed, free_bytes(path), reason=FULL_WORDS[1] if quota else NO_SPACE)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # crosses Ray's boundary (a task's or a worker's error) with its fields
        return (type(self), (self.path, self.needed, self.free, self.then, self.reason))


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def disk_full_message(path: str, needed: int | None, free: int | None, then: str = "",
                      reason: str = "No space left on device") -> str:
    """One line: the path a write failed on, the bytes it needed, the bytes free there, and what to do."""
    then = then or "free space there (or write elsewhere) and run the same command again"
    return f"disk full ({reason}): writing {path} needs {_size(needed)}, {_size(free)} free; {then}"


def free_bytes(path: str) -> int | None:
    """Bytes free to this user on the local filesystem holding `path` (its nearest existing folder); None for an
    object store or a path that cannot be examined. A quota (EDQUOT) may allow less than this."""
    if is_remote(path):
        return None
    path = os.path.abspath(path.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a write refused for want of room (ENOSPC or EDQUOT;
    pyarrow's and Ray's wrappers carry only the message)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno in FULL_ERRNOS):
            return True
        if any(word in str(error) for word in FULL_WORDS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def find_disk_full(error: BaseException | None) -> DiskFull | None:
    """The DiskFull behind `error` (through Ray's task errors and chained causes), or None."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DiskFull) and type(error) is DiskFull:
            return error
        cause = getattr(error, "cause", None)  # a Ray task's error carries the task's own exception as `cause`
        if isinstance(cause, DiskFull):
            return cause
        error, seen = cause if isinstance(cause, BaseException) else error.__cause__ or error.__context__, seen + 1
    return None


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

    def write_folder(self, relative: str, local: str) -> None:
        write_folder(self.fs, local, self.path(relative))

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
    """Write a whole file, creating its folder on local disk, so that a reader (a later start of a job) finds the old
    content or the new one, never a part: a crash, a kill or a full disk mid-write leaves the old file as it was."""
    if not isinstance(fs, LocalFileSystem):
        # An object store's PUT makes the object appear whole or not at all: no temporary name is needed there.
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        return
    path = fs._strip_protocol(path)
    folder = os.path.dirname(path)
    temporary = _temporary_name(path)
    try:
        os.makedirs(folder or ".", exist_ok=True)
        # os.open rather than mkstemp: the file gets the usual permissions (0o666 less the umask), not 0o600
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if is_disk_full(error) and not isinstance(error, DiskFull):
            raise DiskFull.of(error, path, len(data)) from error
        raise
    _fsync_folder(folder or ".")


def write_folder(fs: fsspec.AbstractFileSystem, local: str, path: str) -> None:
    """Put the local folder `local` at `path` in place of what is there, as a whole on local disk.

    On local disk the copy goes to a sibling `<path>.new`, then the old folder is renamed aside to `<path>.old`, the
    new one renamed into place and the old one deleted: a kill leaves the old folder or the new one at `path` (or,
    between the two renames, the old one whole at `<path>.old`, which the next call puts back first)."""
    if not isinstance(fs, LocalFileSystem):
        # An object store has no folder rename. Each file's PUT is whole; the new files go over the old ones, then
        # the old files the new folder lacks are deleted. Meanwhile (and after a kill) a reader sees whole files,
        # some of the old folder and some of the new; the job that writes the folder again completes it.
        fs.invalidate_cache()
        fs.put(local.rstrip("/") + "/", path + "/", recursive=True)
        fs.invalidate_cache()
        keep = {os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/")
                for d, _, files in os.walk(local) for f in files}
        prefix = path.rstrip("/") + "/"
        for found in fs.find(path):
            if found.startswith(prefix) and found[len(prefix):] not in keep:
                fs.rm_file(found)
        return
    path = fs._strip_protocol(path).rstrip("/")
    staging, aside = path + ".new", path + ".old"
    if not os.path.exists(path) and os.path.isdir(aside):
        os.rename(aside, path)  # a kill between the two renames below: the old folder is whole, put it back
    for leftover in (staging, aside):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        shutil.copytree(local, staging)
        for folder, _, files in os.walk(staging):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_folder(folder)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk leaves no staging folder behind
        if is_disk_full(error):
            raise DiskFull.of(error, path, folder_bytes(local)) from error
        raise
    if os.path.exists(path):
        os.rename(path, aside)
    os.rename(staging, path)
    _fsync_folder(os.path.dirname(path) or ".")
    shutil.rmtree(aside, ignore_errors=True)


def folder_bytes(local: str) -> int:
    """The bytes of the files under a local folder."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local) for f in files)


def _temporary_name(path: str) -> str:
    """A unique hidden sibling of `path` ending in `.tmp`, so readers that list `*.json` or `*.parquet` skip it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable; skipped where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and bucket paths alike."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(path: str | None) -> str | None:
    """A relative local path made absolute here (Ray's workers start in folders of their own); a URI, an absolute
    path or None as it is."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(path)
