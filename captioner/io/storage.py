"""Object storage: one `Store` interface over a local directory (default, no server) and
S3-compatible storage (MinIO, AWS S3, ...) through the `minio` client.

This is the only module that understands `s3://bucket/prefix` URIs; anything else that looks
like a URI (`s3:/b`, `s3:b/x`, `S3://`, `gs://`, `http://`) is refused with the accepted forms
instead of becoming a local folder. Credentials come from
flags or the environment (`CAPTIONER_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `CAPTIONER_S3_SECURE`), never from code, and never reach logs.
Writes never leave a partial object under its final name: local files are written to a
hidden temp name and renamed (captioner.io.files.atomic_write: created with the process umask,
like any other tool's files);
S3 objects appear only when the (multipart) upload completes. Object keys are untrusted:
`fetch` writes only keys that stay inside its folder.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from captioner.io.files import TMP_PREFIX, atomic_write, sha256_file

log = logging.getLogger(__name__)
SHA_META = "sha256"  # object metadata key holding the content's sha256
PART_SIZE = 16 * 1024 * 1024  # multipart part size for large objects


class StoreError(RuntimeError):
    """Storage unreachable, refused or inconsistent; the message names the endpoint/object."""


ACCEPTED_FORMS = "a local path or s3://bucket/prefix"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # what a URI scheme looks like: 's3:', 'gs:', 'http:'
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 bucket naming rules


def is_s3(uri: str | Path) -> bool:
    """True for a well-formed s3://bucket[/prefix], False for a local path; anything else that
    looks like a URI raises StoreError naming it and the accepted forms."""
    u = str(uri)
    if isinstance(uri, Path) or not _SCHEME.match(u):
        return False
    if u.startswith("s3://"):
        bucket, _, prefix = u[5:].partition("/")
        parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
        if _BUCKET.fullmatch(bucket) and not any(p in ("", ".", "..") for p in parts):
            return True
    if u.lower().startswith("s3:"):
        raise StoreError(f"malformed S3 URI {u!r}: expected s3://bucket/prefix (lowercase 's3://'; bucket: 3-63 "
                         "lowercase letters, digits, '.' or '-'; no empty, '.' or '..' path segments)")
    raise StoreError(f"unsupported storage location {u!r}: use {ACCEPTED_FORMS} "
                     "(a local folder whose name contains ':' can be written ./NAME)")


class Store:
    """Keys are relative, '/'-separated names under the store's root URI."""

    uri: str

    def put_file(self, key: str, path: str | Path, sha256: str | None = None) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def stored_sha256(self, key: str) -> str | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def cleanup_partials(self) -> int: return 0

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def download(self, key: str, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def sha256(self, key: str) -> str:
        """sha256 of the object's bytes, computed by reading it."""
        h = hashlib.sha256()
        with self.open(key) as f:
            while b := f.read(1 << 20):
                h.update(b)
        return h.hexdigest()


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _p(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents and p != self.root:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return p

    def put_file(self, key, path, sha256=None):
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        atomic_write(self._p(key), copy)

    def put_bytes(self, key, data):
        atomic_write(self._p(key), lambda f: f.write(data))

    def get_bytes(self, key):
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.url(key)} does not exist") from None

    def open(self, key):
        try:
            return open(self._p(key), "rb")
        except FileNotFoundError:
            raise StoreError(f"{self.url(key)} does not exist") from None

    def exists(self, key):
        return self._p(key).is_file()

    def size(self, key):
        p = self._p(key)
        return p.stat().st_size if p.is_file() else None

    def stored_sha256(self, key):
        return sha256_file(self._p(key)) if self.exists(key) else None

    def list(self, prefix=""):
        base = self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith(TMP_PREFIX):
                k = p.relative_to(base).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return sorted(out)

    def delete(self, key):
        self._p(key).unlink(missing_ok=True)

    def cleanup_partials(self) -> int:
        """Remove temp files a killed writer left behind."""
        n = 0
        if self.root.exists():
            for p in self.root.rglob(f"{TMP_PREFIX}*"):
                p.unlink(missing_ok=True)
                n += 1
        return n


@dataclass
class S3Settings:
    endpoint: str
    access_key: str | None
    secret_key: str | None = field(repr=False)  # never in logs, reprs or error messages
    secure: bool

    @classmethod
    def from_env(cls, endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 secure: bool | None = None) -> "S3Settings":
        ep = endpoint or os.environ.get("CAPTIONER_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if not ep:
            raise StoreError("no S3 endpoint: set CAPTIONER_S3_ENDPOINT (host:port or http(s)://host:port) "
                             "or pass --s3-endpoint")
        sec = secure
        if ep.startswith("http://") or ep.startswith("https://"):
            sec = ep.startswith("https://") if sec is None else sec
            ep = ep.split("://", 1)[1]
        if sec is None:
            sec = os.environ.get("CAPTIONER_S3_SECURE", "false").lower() in ("1", "true", "yes")
        return cls(ep.rstrip("/"), access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
                   secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"), bool(sec))

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


class S3Store(Store):
    def __init__(self, uri: str, settings: S3Settings, create_bucket: bool = False, timeout: float = 10.0):
        import urllib3
        from minio import Minio

        rest = uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StoreError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.settings = settings
        self.timeout = timeout
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=max(timeout, 60)), maxsize=32,
                                   retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                         status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(settings.endpoint, access_key=settings.access_key, secret_key=settings.secret_key,
                            secure=settings.secure, http_client=http)
        self._check(create_bucket)

    def __getstate__(self):  # DataLoader workers re-create the client
        return {"uri": self.uri, "settings": self.settings, "timeout": self.timeout}

    def __setstate__(self, s):
        self.__init__(s["uri"], s["settings"], False, s["timeout"])

    def _where(self) -> str:
        return f"{self.uri} at {self.settings.endpoint_url}"

    def _wrap(self, e: Exception, what: str) -> StoreError:
        from minio.error import S3Error

        if isinstance(e, S3Error):
            hint = ""
            if e.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            return StoreError(f"{what} {self._where()}: {e.code}: {e.message}{hint}")
        reason = getattr(e, "reason", None) or e
        return StoreError(f"{what} {self._where()}: cannot reach the endpoint ({type(reason).__name__}: {reason})")

    def _check(self, create: bool) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                if not create:
                    raise StoreError(f"bucket '{self.bucket}' does not exist at {self.settings.endpoint_url}")
                self.client.make_bucket(self.bucket)
                log.info("created bucket %s at %s", self.bucket, self.settings.endpoint_url)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into one clear line
            raise self._wrap(e, "cannot access") from None

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key, path, sha256=None):
        meta = {SHA_META: sha256 or sha256_file(path)}
        try:
            self.client.fput_object(self.bucket, self._k(key), str(path), metadata=meta, part_size=PART_SIZE)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"upload of {key} to") from None

    def put_bytes(self, key, data):
        meta = {SHA_META: hashlib.sha256(data).hexdigest()}
        try:
            self.client.put_object(self.bucket, self._k(key), io.BytesIO(data), len(data), metadata=meta)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"upload of {key} to") from None

    def get_bytes(self, key):
        r = self.open(key)
        try:
            return r.read()
        finally:
            r.close()

    def open(self, key):
        from minio.error import S3Error

        try:
            r = self.client.get_object(self.bucket, self._k(key))
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise StoreError(f"{self.url(key)} does not exist") from None
            raise self._wrap(e, f"download of {key} from") from None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"download of {key} from") from None
        return _Response(r)

    def _stat(self, key):
        from minio.error import S3Error

        try:
            return self.client.stat_object(self.bucket, self._k(key))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise self._wrap(e, f"stat of {key} in") from None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"stat of {key} in") from None

    def exists(self, key):
        return self._stat(key) is not None

    def size(self, key):
        st = self._stat(key)
        return None if st is None else st.size

    def stored_sha256(self, key):
        st = self._stat(key)
        if st is None:
            return None
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return meta.get(f"x-amz-meta-{SHA_META}") or meta.get(SHA_META)

    def list(self, prefix=""):
        pre = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            keys = [o.object_name for o in self.client.list_objects(self.bucket, prefix=pre, recursive=True)]
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "listing of") from None
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in keys)

    def delete(self, key):
        try:
            self.client.remove_object(self.bucket, self._k(key))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, f"delete of {key} in") from None


class _Response(io.RawIOBase):
    """A urllib3 response as a closeable binary stream (releases the connection)."""

    def __init__(self, r):
        self.r = r

    def readable(self):
        return True

    def readinto(self, b):
        data = self.r.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def read(self, n=-1):
        return self.r.read() if n is None or n < 0 else self.r.read(n)

    def close(self):
        if not self.closed:
            self.r.close()
            self.r.release_conn()
        super().close()


def open_store(uri: str, endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
               secure: bool | None = None, create: bool = False) -> Store:
    """A store for a local path or an s3:// URI (checked for access right away: fails fast)."""
    if is_s3(uri):
        t0 = time.time()
        s = S3Store(uri, S3Settings.from_env(endpoint, access_key, secret_key, secure), create_bucket=create)
        log.debug("connected to %s in %.2fs", s.uri, time.time() - t0)
        return s
    return LocalStore(uri)


def put_dir(store: Store, local_dir: str | Path, prefix: str = "") -> list[str]:
    """Upload every file under local_dir to prefix/ (each object atomic)."""
    keys = []
    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file():
            k = f"{prefix.strip('/')}/{p.relative_to(local_dir).as_posix()}".lstrip("/")
            store.put_file(k, p)
            keys.append(k)
    return keys


def confined(root: str | Path, key: str) -> Path | None:
    """root/key when that stays inside root, else None (absolute keys, '..', empty segments:
    an object named `prefix//abs/path` lists as '/abs/path')."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        return None
    base = Path(root).resolve()
    dst = (base / key).resolve()
    return dst if base in dst.parents else None


def fetch(uri: str, local_dir: str | Path) -> Path:
    """A local path for `uri`: the path itself when local, else the objects under the
    s3:// prefix downloaded into local_dir (a file URI downloads that one object). Keys that
    would land outside local_dir are skipped with a warning naming them."""
    if not is_s3(uri):
        return Path(uri)
    local = Path(local_dir)
    head, tail = split_uri(uri)
    if "." in tail:  # looks like one object
        dst = confined(local, tail)
        if dst is None:
            raise StoreError(f"{uri}: object name {tail!r} cannot be a local file name")
        open_store(head).download(tail, dst)
        return dst
    store = open_store(uri)
    for k in store.list():
        dst = confined(local, k)
        if dst is None:
            if not k.endswith("/"):  # 'folder/' markers hold nothing
                log.warning("skipping object %r under %s: its name would land outside the download folder %s",
                            k, store.uri, local)
            continue
        store.download(k, dst)
    return local


def publish(local: str | Path, uri: str) -> str:
    """Copy a local file or folder to a path or s3:// URI; returns the URI written."""
    local = Path(local)
    if is_s3(uri):
        if local.is_dir():
            put_dir(open_store(uri, create=True), local)
        else:
            head, tail = split_uri(uri)
            open_store(head, create=True).put_file(tail, local)
        return uri
    dst = Path(uri)
    if local.resolve() == dst.resolve():
        return uri
    if local.is_dir():
        shutil.copytree(local, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, dst)
    return uri


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/p/manifest.json' -> ('s3://b/p', 'manifest.json'); same for local paths."""
    u = str(uri).rstrip("/")
    head, _, tail = u.rpartition("/")
    return head, tail
