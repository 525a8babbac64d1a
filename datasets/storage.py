"""Resolve dataset/storage URLs (local path, file://, s3://) to filesystems.

One place decides how S3 is reached (endpoint, credentials or anonymous access, region) so the
writer, the reader, the Ray Data stream and Ray Train storage all talk to the same store.
Options come from explicit values first, then the PLATEBENCH_S3_* / AWS_* environment variables.
"""

from __future__ import annotations

import errno
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import fsspec

from .errors import StorageError, StorageURLError


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Serialisable, so it travels to Ray tasks unchanged.

    Credentials are not read from the environment here: boto/pyarrow read AWS_* (or an instance role) on each node
    themselves, so they never ride along in a Launch. Explicit `key`/`secret` (tests, callers that need them) stay
    in memory: they are left out of repr() and to_dict(), which is what gets logged or written.
    """

    endpoint_url: str | None = None
    anon: bool = False
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    region: str | None = None
    connect_timeout: float = 5.0
    retries: int = 3
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> StorageOptions:
        env = os.environ
        base = dict(
            endpoint_url=env.get("PLATEBENCH_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
            anon=env.get("PLATEBENCH_S3_ANON", "0").lower() in ("1", "true", "yes"),
            region=env.get("PLATEBENCH_S3_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def to_dict(self) -> dict:
        """The non-secret settings (what may be written to specs, records or logs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("key", "secret")}

    def s3fs_kwargs(self) -> dict:
        kw: dict = {
            "anon": self.anon,
            "config_kwargs": {
                "connect_timeout": self.connect_timeout,
                "read_timeout": 60,
                "retries": {"max_attempts": self.retries, "mode": "standard"},
            },
        }
        if self.key and not self.anon:
            kw["key"], kw["secret"] = self.key, self.secret
        client = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            kw["client_kwargs"] = client
        kw.update(self.extra)
        return kw


def _storage_exceptions() -> tuple[type[BaseException], ...]:
    excs: list[type[BaseException]] = [OSError]
    try:  # botocore's connection/credential errors are not OSErrors
        from botocore.exceptions import BotoCoreError, ClientError

        excs += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    return tuple(excs)


# Exceptions that mean "the store failed or refused", to be turned into one clear StorageError line.
STORAGE_ERRORS = _storage_exceptions()


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers and Tune trials run in other working directories); URLs as given."""
    url = str(url)
    scheme = urlparse(url).scheme
    if scheme in S3_SCHEMES:  # checked here, the first use, so the error line shows the URL as typed
        s3_location(url)
    if scheme == "file":
        return "file://" + os.path.abspath(_file_path(url))
    return url if scheme else os.path.abspath(url)


def _file_path(url: str) -> str:
    """The path of a file:// URL. `file:/x`, `file:x` and `file://` are one StorageURLError line: read as the text
    after `file://`, they would name the working folder."""
    if not url.lower().startswith("file://") or not url[len("file://"):]:
        raise StorageURLError(f"{url}: not a valid file URL (expected file:///PATH, or the path alone)")
    return url[len("file://"):]


S3_SCHEMES = ("s3", "s3a")
# botocore's own client-side rule for a bucket name (S3 itself is stricter, S3-compatible stores looser)
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def _shown(url: str) -> str:
    """`url` for an error line, without credentials written into it (s3://KEY:SECRET@bucket/...)."""
    return re.sub(r"(://)[^/@]*@", r"\1...@", url)


def s3_location(url: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// or s3a:// URL; a malformed one (`s3:/b/p`, `s3://`, `s3:///x`) is one
    StorageURLError line naming it, before any filesystem is made."""
    _, sep, rest = str(url).partition("://")
    bucket, _, key = rest.partition("/")
    if not sep or not _BUCKET.fullmatch(bucket):
        raise StorageURLError(f"{_shown(str(url))}: not a valid S3 URL (expected s3://BUCKET/PATH)")
    return bucket, key.strip("/")


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path inside it) for a URL or local path."""
    url = str(url)
    scheme = urlparse(url).scheme
    if scheme in S3_SCHEMES:
        bucket, key = s3_location(url)
        opts = options or StorageOptions.from_env()
        fs = _s3_filesystem_class()(**opts.s3fs_kwargs())
        return fs, f"{bucket}/{key}".rstrip("/")
    if scheme in ("", "file"):
        path = _file_path(url) if scheme == "file" else url
        return fsspec.filesystem("file"), os.path.abspath(path).rstrip("/") or "/"
    # Other fsspec protocols (ftp://, http://, ...) are not offered: they would be tried, and fail late, as a network
    # error that does not say the scheme is the problem.
    raise StorageURLError(f"{_shown(url)}: unsupported URL scheme {scheme!r} (expected a folder, file:// or s3:// URL)")


_S3_CLASS: list = []


def _s3_filesystem_class():
    """s3fs's filesystem, except that makedirs never creates a bucket (s3fs's does, with the client's region as its
    location constraint: on us-east-1 that is refused as 'location-constraint is not valid', elsewhere a typo in
    --storage would make a new bucket). Built on first use: s3fs takes seconds to import."""
    if _S3_CLASS:
        return _S3_CLASS[0]
    import s3fs
    from fsspec.asyn import sync_wrapper

    class PlatebenchS3FileSystem(s3fs.S3FileSystem):
        async def _makedirs(self, path, exist_ok=False):
            # Object storage has no folders: only the bucket must exist.
            bucket = self.split_path(path)[0]
            try:
                await self._call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"no such bucket {bucket}") from None
            except PermissionError:  # HEAD needs s3:ListBucket; the write that follows says whether it is allowed
                pass

        makedirs = sync_wrapper(_makedirs)

    # fsspec pickles a filesystem by its class: found by name through the module's __getattr__
    PlatebenchS3FileSystem.__module__, PlatebenchS3FileSystem.__qualname__ = __name__, "PlatebenchS3FileSystem"
    _S3_CLASS.append(PlatebenchS3FileSystem)
    return PlatebenchS3FileSystem


def __getattr__(name: str):
    if name == "PlatebenchS3FileSystem":
        return _s3_filesystem_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def pyarrow_filesystem(url: str, options: StorageOptions | None = None):
    """A pyarrow filesystem for Ray Data / Ray Train storage plus the path inside it.

    S3 uses pyarrow's native client (about 3x faster than s3fs through pyarrow's FSSpecHandler on the same reads).
    """
    import pyarrow.fs as pafs

    scheme = urlparse(str(url)).scheme
    if scheme in S3_SCHEMES:
        opts = options or StorageOptions.from_env()
        kw: dict = {"connect_timeout": opts.connect_timeout, "request_timeout": 60}
        if opts.anon:
            kw["anonymous"] = True
        elif opts.key:
            kw["access_key"], kw["secret_key"] = opts.key, opts.secret
        if opts.endpoint_url:
            parsed = urlparse(opts.endpoint_url)
            kw["endpoint_override"] = parsed.netloc or opts.endpoint_url
            kw["scheme"] = parsed.scheme or "https"
        kw["region"] = opts.region or "us-east-1"
        try:
            kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=opts.retries)
        except AttributeError:  # pragma: no cover - very old pyarrow
            pass
        bucket, key = s3_location(str(url))
        return pafs.S3FileSystem(**kw), f"{bucket}/{key}".rstrip("/")
    _, path = filesystem(url, options)  # a local path; any other scheme is refused there
    return pafs.LocalFileSystem(), path


def describe_error(exc: BaseException, where: str) -> StorageError:
    """Turn botocore/aiohttp/OS errors into one clear line naming the URL."""
    text = f"{type(exc).__name__}: {exc}".strip()
    low = text.lower()
    named = re.match(r"no such bucket (\S+)", str(exc))
    if named:  # PlatebenchS3FileSystem.makedirs: the whole story
        return StorageError(f"{where}: no such bucket {named[1]}")
    if "nosuchbucket" in low or "bucket does not exist" in low:
        reason = "no such bucket"
    elif "could not connect" in low or "connect" in low and "endpoint" in low or "connection refused" in low:
        reason = "cannot reach the S3 endpoint"
    elif "nocredentials" in low or "unable to locate credentials" in low:
        reason = ("no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                  "or use --s3-anon for public buckets)")
    elif isinstance(exc, PermissionError) and getattr(exc, "filename", None):  # the OS's, on a local path
        reason = "permission denied"
    elif isinstance(exc, PermissionError) or "forbidden" in low or "access denied" in low or "accessdenied" in low:
        reason = "access denied (private bucket? check credentials, or --s3-anon only for public buckets)"
    elif getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device (free some, or write elsewhere)"
    elif getattr(exc, "errno", None) == errno.EROFS:
        reason = "read-only file system"
    elif isinstance(exc, FileNotFoundError) or "nosuchbucket" in low or "not found" in low:
        reason = "not found"
    else:
        reason = "storage error"
    first = text.splitlines()[0] if text else type(exc).__name__
    return StorageError(f"{where}: {reason} ({first[:300]})")


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def put_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` so that readers see the old object or the whole new one, and an interrupted write leaves
    nothing behind: on a local disk a temporary file renamed over the target; on object storage one PUT
    (atomic there; a temporary key plus copy would leave a stray object when interrupted between the two)."""
    put_all_atomic(fs, {path: data})


def put_all_atomic(fs, files: dict[str, bytes]) -> None:
    """Write a set of files that belong together (a leaderboard's formats) so that readers see the old set or the
    whole new one: every file written under a temporary name first, then all renamed; a failed write (a full
    disk) removes the temporary files and leaves the old set as it was. Object storage: one PUT each."""
    if not is_local(fs):
        for path, data in files.items():
            fs.pipe_file(path, data)
        return
    tmps = {path: f"{path}.tmp-{uuid.uuid4().hex[:8]}" for path in files}
    try:
        for path, data in files.items():
            fs.pipe_file(tmps[path], data)
        for path, tmp in tmps.items():
            fs.mv(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            if fs.exists(tmp):
                fs.rm_file(tmp)
        raise


# Errors a retry cannot fix: reported at once. A local --out under a file (NotADirectoryError) was retried for 60 s.
_PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
_PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk or quota, a read-only file system

# How long storage reads and writes are retried through an outage before the command gives up, in seconds.
RETRY_WINDOW_ENV = "PLATEBENCH_STORAGE_RETRY_S"
DEFAULT_RETRY_WINDOW_S = 60.0


def env_seconds(name: str, default: float, error: type[Exception]) -> float:
    """A wait in seconds from environment variable `name` (`default` when unset); anything but a finite number
    > 0 raises `error` with one line naming the variable and its value."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise error(f"{name}={text!r}: expected a number of seconds > 0")
    return value


def retry_window_s() -> float:
    """$PLATEBENCH_STORAGE_RETRY_S, else DEFAULT_RETRY_WINDOW_S."""
    return env_seconds(RETRY_WINDOW_ENV, DEFAULT_RETRY_WINDOW_S, StorageURLError)


def with_retries(fn, where: str, deadline_s: float | None = None, first_wait_s: float = 1.0):
    """`fn()`, retried with exponential backoff while object storage fails for at most `deadline_s` seconds
    (default `retry_window_s()`: an outage, a throttled request); then one StorageError line naming `where`.
    Errors a retry cannot fix (access denied, not found, a full disk) are reported at once."""
    deadline_s = retry_window_s() if deadline_s is None else deadline_s
    start, wait = time.monotonic(), first_wait_s
    while True:
        try:
            return fn()
        except _PERMANENT as exc:
            raise describe_error(exc, where) from exc
        except STORAGE_ERRORS as exc:
            if getattr(exc, "errno", None) in _PERMANENT_ERRNOS:
                raise describe_error(exc, where) from exc
            if time.monotonic() - start + wait > deadline_s:
                raise describe_error(exc, f"{where} (still failing after {deadline_s:.0f} s of retries)") from exc
            time.sleep(wait)
            wait = min(2 * wait, 15.0)
