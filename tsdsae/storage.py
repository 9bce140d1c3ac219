"""Where bytes go: a local directory or an S3 prefix, behind one small interface.

The one module of the project that talks to object storage (data_prep writes shards through it, the
reader loads them through it, checkpoints and Ray's storage path use it too).

    store = open_store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000")
    store.check()                                # fails fast with one clear StorageError
    store.write_bytes("dataset.json", b"...")    # -> s3://bucket/prefix/dataset.json
    store.read_bytes("dataset.json")

Locations are a local path (or file:// URI) or `s3://bucket/prefix`. For S3 the endpoint comes from
the `endpoint_url` argument, else the environment (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL), else
AWS itself; credentials come from boto3's normal chain (environment, profile, instance role) and
are never printed or logged. Relative names inside a store use "/" and may not contain "..".

Everything after `s3://bucket/` is the key prefix, verbatim (no URL decoding, no query part).
Characters that URL parsers further down (Ray's storage path, pyarrow, WebDataset's URL opener)
would cut at or rewrite - '?', '#', '\\' and control characters - are refused with a StorageError,
so two different URIs never name the same objects.

Two retry policies, one per kind of call (botocore's retry modes; pyarrow's AWS retry strategy for
the filesystem Ray gets):
    PROBE     "does this location work at all": short connect timeout, 2 attempts. `check()` uses
              it, and every S3Store runs it once per process before its first read or write, so
              a wrong endpoint or a missing bucket surfaces in seconds.
    TRANSFER  reads and writes once the location is known to work (shards, manifests,
              checkpoints in the middle of training): botocore's adaptive retries, 10 attempts
              with backoff, so a transient S3 failure (a restarted server, throttling, a reset
              connection) is waited out instead of ending a run.
S3 is reached through boto3 (error codes for the messages below, multipart transfers); Ray's
storage gets a pyarrow.fs.S3FileSystem built here from the same endpoint and policy
(`Store.arrow_filesystem`), so the project has one storage module and one set of settings.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Timeouts (seconds) and attempts of one kind of S3 call; `mode` is botocore's retry mode."""

    connect_timeout_s: float
    read_timeout_s: float
    max_attempts: int
    mode: str


# Fail fast: a wrong endpoint or a missing bucket must surface in seconds, not after minutes of
# botocore's retries. Measured against a closed port: StorageError after about 0.1 s.
PROBE = RetryPolicy(connect_timeout_s=3, read_timeout_s=10, max_attempts=2, mode="standard")
# Patient: a write that fails mid-run loses the run's progress since the last checkpoint. With
# 10 attempts botocore's backoff (up to 20 s per wait) rides out a server that is away for about
# a minute; tests/test_storage.py restarts a server during a write.
TRANSFER = RetryPolicy(connect_timeout_s=10, read_timeout_s=60, max_attempts=10, mode="adaptive")

# S3 key characters that some URL parser between here and the object store would cut at or
# rewrite (Ray's storage path, pyarrow URIs, WebDataset's URL opener), plus control characters.
_UNSUPPORTED_KEY_CHARS = frozenset("?#\\") | frozenset(map(chr, range(32))) | {chr(127)}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageError(RuntimeError):
    """A storage location cannot be used; the message names the URI, the endpoint and a fix."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """A named object or file does not exist in an otherwise usable store."""


def is_s3_uri(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def absolute_location(uri: str) -> str:
    """A URI (s3://...) unchanged; a local path made absolute, for processes that run in another
    working directory (Ray workers, Tune trials)."""
    return uri if "://" in uri else str(Path(uri).expanduser().absolute())


def split_s3_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/a/b/" -> ("bucket", "a/b"): the key prefix is everything after the bucket,
    verbatim, without leading/trailing "/". Raises StorageError on a URI without a valid bucket
    name or with characters that are not supported in keys (see the module docstring)."""
    uri = str(uri)
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an S3 URI of the form s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket: use s3://bucket/prefix")
    bad = sorted({c for c in uri if c in _UNSUPPORTED_KEY_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise StorageError(
            f"{uri!r}: {shown} cannot be used in an S3 location (URL parsers in Ray, pyarrow and "
            "WebDataset cut or rewrite the key there, so two different prefixes could share "
            "objects); choose a prefix without them, e.g. letters, digits, '-', '_', '.', '/'")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(
            f"{uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)")
    return bucket, prefix.strip("/")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint in effect: the argument, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else None."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def redact_url(value: str) -> str:
    """`value` as it may be logged, stored or printed: a URL's user:password@ and its query
    string and fragment removed ("http://u:p@host:9000/?X-Amz-Signature=s" ->
    "http://host:9000/"); anything that is not a URL with a host comes back unchanged. The full
    URL is only ever used for the connection itself."""
    from urllib.parse import urlsplit, urlunsplit

    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:                         # unparseable (e.g. a bad port): keep the scheme
        return value.split("://", 1)[0] + "://<redacted>"
    netloc = parts.netloc.rpartition("@")[2]
    if netloc == parts.netloc and not parts.query and not parts.fragment:
        return value
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def redact_text(text: str) -> str:
    """`text` with the user:password@ of every URL in it removed (messages, printed summaries)."""
    return _USERINFO.sub(r"\1", text)


def _describe_endpoint(endpoint_url: str | None) -> str:
    return f"endpoint {redact_url(endpoint_url)}" if endpoint_url else "the default AWS endpoint"


def _check_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").strip("/")
    if any(part in ("..", ".") for part in rel.split("/")) or rel.startswith("~"):
        raise StorageError(f"invalid relative name {rel!r}: no '.' or '..' components allowed")
    return rel


@functools.lru_cache(maxsize=16)
def _cached_client(endpoint_url: str | None, policy: RetryPolicy, pid: int):
    # Keyed by pid too: a boto3 client must not be shared across fork (DataLoader workers).
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(connect_timeout=policy.connect_timeout_s, read_timeout=policy.read_timeout_s,
                    retries={"max_attempts": policy.max_attempts, "mode": policy.mode},
                    max_pool_connections=32,
                    # Custom endpoints (MinIO, moto, Ceph) rarely serve virtual-host bucket names.
                    s3={"addressing_style": "path"} if endpoint_url else None)
    return session.client("s3", endpoint_url=endpoint_url, config=config,
                          region_name=session.region_name or "us-east-1")


def s3_client(endpoint_url: str | None = None, policy: RetryPolicy = TRANSFER):
    """A boto3 S3 client for `endpoint_url` (resolved as in resolve_endpoint) with `policy`."""
    return _cached_client(resolve_endpoint(endpoint_url), policy, os.getpid())


class Store(abc.ABC):
    """A location holding named objects: `rel` names are "/"-separated paths below `uri`."""

    uri: str
    endpoint_url: str | None = None

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """True if the object `rel` exists."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole object; ObjectNotFound if it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Store `data` atomically: readers never see a partial object."""

    @abc.abstractmethod
    def upload_file(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file to `rel` (atomically, as write_bytes)."""

    @abc.abstractmethod
    def download_file(self, rel: str, local: str | os.PathLike) -> None:
        """Copy the object `rel` to the local file `local`."""

    @abc.abstractmethod
    def open_read(self, rel: str) -> BinaryIO:
        """A readable binary stream of the object (the caller closes it)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative names of all objects whose name starts with `prefix`."""

    @abc.abstractmethod
    def delete(self, rel: str) -> None:
        """Remove `rel` (no error if it does not exist)."""

    @abc.abstractmethod
    def url(self, rel: str = "") -> str:
        """Full location of `rel`: an absolute local path or an s3:// URI."""

    @abc.abstractmethod
    def size(self, rel: str) -> int:
        """Size of the object in bytes."""

    @abc.abstractmethod
    def check(self, create: bool = False) -> "Store":
        """Fail fast with a StorageError if the location cannot be used (and create it if asked)."""

    @abc.abstractmethod
    def arrow_filesystem(self) -> tuple[str, object]:
        """(path, pyarrow filesystem or None) of this location, for Ray's `storage_path` /
        `storage_filesystem` (and ray.train.Checkpoint)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    """A local directory. Writes are atomic: a temporary file in the same directory, then rename."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if root.startswith("file://"):
            root = urlparse(root).path
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / _check_rel(rel)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from None

    @contextlib.contextmanager
    def _atomic_target(self, rel: str) -> Iterator[Path]:
        path = self._path(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot write to {path.parent}: {exc}; check the path and its "
                               "permissions") from None
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._atomic_target(rel) as tmp:
            tmp.write_bytes(data)

    def upload_file(self, local: str | os.PathLike, rel: str) -> None:
        with self._atomic_target(rel) as tmp:
            shutil.copyfile(local, tmp)

    def download_file(self, rel: str, local: str | os.PathLike) -> None:
        path = self._path(rel)
        if not path.is_file():
            raise ObjectNotFound(f"{path} does not exist")
        shutil.copyfile(path, local)

    def open_read(self, rel: str) -> BinaryIO:
        path = self._path(rel)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def url(self, rel: str = "") -> str:
        return str(self._path(rel)) if rel else self.uri

    def size(self, rel: str) -> int:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"{self._path(rel)} does not exist") from None

    def check(self, create: bool = False) -> "LocalStore":
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} exists and is not a directory; choose another path")
        if not self.root.exists():
            if not create:
                raise StorageError(f"{self.root} does not exist; check the path (or create the "
                                   "dataset first)")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {self.root}: {exc}") from None
        if create and not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable; fix its permissions or choose "
                               "another path")
        return self

    def arrow_filesystem(self) -> tuple[str, None]:
        """(absolute path, None): Ray uses its local filesystem."""
        return self.uri, None


class S3Store(Store):
    """An S3 prefix `s3://bucket/prefix` reached through boto3 (any S3-compatible endpoint).

    The first read or write in a process probes the bucket with the PROBE policy (seconds to a
    clear StorageError); reads and writes use the TRANSFER policy (see the module docstring).
    """

    _probed: set = set()         # (endpoint, bucket, pid) that answered a probe

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = resolve_endpoint(endpoint_url)

    @property
    def client(self):
        """The TRANSFER-policy client, after this process's first successful probe."""
        if (self.endpoint_url, self.bucket, os.getpid()) not in S3Store._probed:
            self.check()
        return s3_client(self.endpoint_url, TRANSFER)

    def _key(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @contextlib.contextmanager
    def _errors(self, action: str, rel: str | None = None) -> Iterator[None]:
        """Translate botocore failures into one StorageError naming the URI and endpoint."""
        from botocore import exceptions as bex

        where = self.url(rel) if rel else self.uri
        endpoint = _describe_endpoint(self.endpoint_url)
        try:
            yield
        except (bex.NoCredentialsError, bex.PartialCredentialsError):
            raise StorageError(
                f"cannot {action} {where} ({endpoint}): no AWS credentials found; set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                bex.ConnectionClosedError, bex.ProxyConnectionError) as exc:
            raise StorageError(
                f"cannot {action} {where}: {endpoint} is unreachable ({type(exc).__name__}); "
                "check --endpoint-url / AWS_ENDPOINT_URL and that the server is running") from None
        except bex.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code == "404" and rel is None):
                raise StorageError(
                    f"cannot {action} {where}: bucket {self.bucket!r} does not exist at "
                    f"{endpoint}; create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix the "
                    "URI") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{where} does not exist ({endpoint})") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "403", "ExpiredToken", "InvalidToken") or status == 403:
                raise StorageError(
                    f"cannot {action} {where}: access denied by {endpoint} ({code}); check the "
                    "credentials in boto3's chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, role) and the "
                    "bucket policy") from None
            raise StorageError(f"cannot {action} {where} ({endpoint}): {code} "
                               f"{error.get('Message', '')}".rstrip()) from None
        except bex.BotoCoreError as exc:
            raise StorageError(f"cannot {action} {where} ({endpoint}): {exc}") from None

    def exists(self, rel: str) -> bool:
        try:
            with self._errors("look up", rel):
                self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ObjectNotFound:
            return False

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("read", rel):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        # A single PUT is atomic: readers see the old object or the new one, never a part.
        with self._errors("write", rel):
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def upload_file(self, local: str | os.PathLike, rel: str) -> None:
        with self._errors("upload to", rel):
            self.client.upload_file(str(local), self.bucket, self._key(rel))

    def download_file(self, rel: str, local: str | os.PathLike) -> None:
        with self._errors("download", rel):
            self.client.download_file(self.bucket, self._key(rel), str(local))

    def open_read(self, rel: str) -> BinaryIO:
        with self._errors("read", rel):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        with self._errors("list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                out.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
        return sorted(out)

    def delete(self, rel: str) -> None:
        with self._errors("delete", rel):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def url(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(rel)}" if rel else self.uri

    def size(self, rel: str) -> int:
        with self._errors("look up", rel):
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))[
                "ContentLength"])

    def check(self, create: bool = False) -> "S3Store":
        # `create` does not create buckets: that is an account-level decision left to the user.
        with self._errors("access"):
            s3_client(self.endpoint_url, PROBE).head_bucket(Bucket=self.bucket)
        S3Store._probed.add((self.endpoint_url, self.bucket, os.getpid()))
        return self

    def arrow_filesystem(self):
        """("bucket/prefix", pyarrow.fs.S3FileSystem): with an explicit filesystem Ray wants the
        path without "s3://". Same endpoint as this store, TRANSFER's timeouts and attempts."""
        import pyarrow.fs

        kwargs: dict = {"connect_timeout": TRANSFER.connect_timeout_s,
                        "request_timeout": TRANSFER.read_timeout_s,
                        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(
                            max_attempts=TRANSFER.max_attempts)}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path,
                          scheme=parsed.scheme or "https", region=region or "us-east-1")
        elif region:
            kwargs["region"] = region
        # Credentials: pyarrow's AWS SDK reads the same chain as boto3 (env, profile, role).
        fs = pyarrow.fs.S3FileSystem(**kwargs)
        return (f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket), fs


def open_store(uri: str | os.PathLike, endpoint_url: str | None = None) -> Store:
    """A Store for a local path / file:// URI or an s3://bucket/prefix URI."""
    uri = str(uri)
    if is_s3_uri(uri):
        return S3Store(uri, endpoint_url)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(uri)


def pyarrow_filesystem(uri: str | os.PathLike, endpoint_url: str | None = None):
    """(path, filesystem) for Ray's `storage_path` / `storage_filesystem`: see
    Store.arrow_filesystem. Local: (absolute path, None)."""
    return open_store(uri, endpoint_url).arrow_filesystem()
