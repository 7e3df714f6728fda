"""Sources: where documents live (local paths, globs, directories, ``s3://`` URIs) and how
to read them.

Every path goes through a pyarrow filesystem: :class:`pyarrow.fs.LocalFileSystem` or
:class:`pyarrow.fs.S3FileSystem` (standard AWS credential chain; ``endpoint_url`` for
S3-compatible stores). A :class:`Location` is the picklable description a Ray task turns
back into a filesystem (:func:`filesystem`, cached per process).

Reading text files (encodings, gzip members) is :mod:`raydrat.core.data.text`.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raydrat.core.data.errors import DataError
from raydrat.redact import describe_aws_credentials, redact

S3_SCHEME = "s3://"
WILDCARDS = "*?["


@dataclass(frozen=True)
class Location:
    """A filesystem: ``local``, or ``s3`` with its endpoint and region."""

    kind: str = "local"
    endpoint_url: str | None = None
    region: str | None = None


def location_for(path: str, endpoint_url: str | None = None, region: str | None = None) -> Location:
    if path.startswith(S3_SCHEME):
        return Location("s3", endpoint_url, region)
    if "://" in path:
        raise DataError(
            f"{path}: only local paths and s3:// URIs are supported (for GCS use its S3 "
            "interoperability endpoint as s3:// with endpoint_url)"
        )
    return Location()


@lru_cache(maxsize=8)
def filesystem(loc: Location) -> pafs.FileSystem:
    """The pyarrow filesystem of ``loc`` (one per process and location)."""
    if loc.kind == "local":
        return pafs.LocalFileSystem()
    kwargs: dict = {"region": loc.region} if loc.region else {}
    if loc.endpoint_url:
        url = urlparse(loc.endpoint_url if "://" in loc.endpoint_url else f"https://{loc.endpoint_url}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
        kwargs.setdefault("region", "us-east-1")
    return pafs.S3FileSystem(**kwargs)


def fs_path(path: str) -> str:
    """The path as its filesystem names it (``bucket/key`` for S3, absolute locally)."""
    if path.startswith(S3_SCHEME):
        return path[len(S3_SCHEME) :].rstrip("/")
    return str(Path(path).expanduser().absolute())


def uri(loc: Location, path: str) -> str:
    """The user-facing name of a filesystem path."""
    return f"{S3_SCHEME}{path}" if loc.kind == "s3" else path


CREDENTIAL_SIGNS = (
    "access denied",
    "accessdenied",
    "access_denied",
    "invalidaccesskeyid",
    "invalid_access_key_id",
    "signaturedoesnotmatch",
    "signature_does_not_match",
    "credential",
    "forbidden",
    "403",
    "expiredtoken",
    "expired_token",
    "invalidtoken",
    "permission denied",
)


def is_credential_error(exc: BaseException) -> bool:
    """Whether a filesystem error is a permission or credential refusal (never corruption)."""
    return isinstance(exc, PermissionError) or any(k in str(exc).lower() for k in CREDENTIAL_SIGNS)


def describe_os_error(where: str, exc: BaseException, loc: Location | None = None) -> DataError:
    """A DataError for a filesystem failure, with the likely fix. A refused permission or
    credential names the credentials that were used (never their secret) and is never
    taken for a corrupt file."""
    msg = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
    low = str(exc).lower()
    if is_credential_error(exc) and (loc is None or loc.kind == "s3") and not isinstance(exc, PermissionError):
        fix = (
            f"access was refused to the credentials used, {describe_aws_credentials()}: give them "
            "read access (IAM policy, bucket policy) or use other credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws); this is not a corrupt file, "
            "data.on_corrupt does not apply"
        )
    elif is_credential_error(exc):
        fix = "permission denied: check the file's permissions (data.on_corrupt does not apply)"
    elif any(k in low for k in ("nosuchbucket", "bucket does not exist", "not found", "404")):
        fix = "check the bucket name and data.sources[].path"
    elif any(k in low for k in ("connect", "resolve", "curl", "timeout")):
        fix = "check data.sources[].endpoint_url and the network"
    else:
        fix = "check the path and its permissions"
    return DataError(f"{where}: {msg}: {fix}")


def check_writable(loc: Location, root: str, where: str) -> None:
    """Before any work: the output location exists (the bucket, or a local directory that
    can be made) and takes a write (a probe object, written and removed)."""
    fs = filesystem(loc)
    name = uri(loc, root)
    try:
        if loc.kind == "s3":
            bucket = root.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DataError(
                    f"{where}: bucket {bucket!r} does not exist (or the credentials used, "
                    f"{describe_aws_credentials()}, cannot see it): create it, or fix --out "
                    "(and --endpoint-url for an S3-compatible store)"
                )
        else:
            fs.create_dir(root, recursive=True)
        probe = f"{root}/.raydrat-write-check-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except DataError:
        raise
    except OSError as exc:
        raise describe_os_error(f"{where}: cannot write to {name}", exc, loc) from None


def _check_bucket(fs: pafs.FileSystem, loc: Location, path: str, where: str) -> None:
    """For an S3 path that lists nothing: say so when its bucket is missing (rather than
    calling the prefix missing)."""
    if loc.kind != "s3":
        return
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return  # no answer about the bucket: the caller's message stands
    if missing:
        raise DataError(
            f"{where}: bucket {bucket!r} does not exist (or the credentials used, {describe_aws_credentials()}, "
            "cannot see it): fix the bucket name in data.sources (and endpoint_url for an S3-compatible store)"
        )


def _hidden(rel: str) -> bool:
    """Dot files and ``_``-files (``_SUCCESS``, ``.crc``) written beside data by Spark & co."""
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(path: str, loc: Location, suffix: str | tuple[str, ...] | None, where: str) -> list[pafs.FileInfo]:
    """The files named by ``path`` (a file, a directory or prefix, or a glob), sorted.
    ``suffix`` (one or a tuple) filters directory listings (``.parquet``); globs are taken as
    written."""
    fs = filesystem(loc)
    p = fs_path(path)
    try:
        if any(ch in path for ch in WILDCARDS):
            if loc.kind == "local":
                names = sorted(glob.glob(p, recursive=True))
                infos = fs.get_file_info(names) if names else []
            else:
                base = p[: min(p.find(ch) for ch in WILDCARDS if ch in p)].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                infos = [i for i in infos if fnmatch.fnmatchcase(i.path, p)]
        else:
            info = fs.get_file_info(p)
            if info.type == pafs.FileType.File:
                infos = [info]
            elif info.type == pafs.FileType.Directory:
                infos = [
                    i
                    for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
                    if not _hidden(i.path[len(p) :]) and (suffix is None or i.path.endswith(suffix))
                ]
            else:
                _check_bucket(fs, loc, p, where)
                raise FileNotFoundError(f"{uri(loc, p)} does not exist")
    except FileNotFoundError as exc:
        raise DataError(
            f"{where}: {exc}: fix data.sources, or use `path: demo` (`raydrat data demo` builds the demo corpus)"
        ) from None
    except OSError as exc:
        _check_bucket(fs, loc, p, where)
        raise describe_os_error(where, exc) from None
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if not files:
        _check_bucket(fs, loc, p, where)
        ends = " or ".join(suffix) if isinstance(suffix, tuple) else suffix
        raise DataError(f"{where} matches no files{f' ending in {ends}' if suffix else ''}: fix data.sources")
    return files


class CorruptFile(DataError):
    """A file that cannot be read (bad parquet footer, broken gzip)."""


def text_size(loc: Location, info: pafs.FileInfo) -> int:
    """Bytes of text in a file: its size, or for ``.gz`` the uncompressed size from the
    gzip trailer (modulo 2**32, as gzip stores it)."""
    if not info.path.endswith(".gz") or info.size < 18:
        return info.size
    try:
        with filesystem(loc).open_input_file(info.path) as f:
            return int.from_bytes(f.read_at(4, info.size - 4), "little") or info.size
    except OSError:
        return info.size


def file_fingerprint(loc: Location, info: pafs.FileInfo) -> dict:
    """What the manifest records of an input file: size, and sha256 (local) or ETag (S3)."""
    out = {"path": uri(loc, info.path), "size": info.size}
    if loc.kind == "local":
        h = hashlib.sha256()
        with open(info.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    else:
        out["etag"] = _s3_etag(loc, info.path)
    return out


def _s3_etag(loc: Location, path: str) -> str | None:
    """pyarrow does not expose ETags; ask boto3 (same endpoint, same credential chain)."""
    try:
        import boto3  # inside: botocore is slow to import and only S3 fingerprints need it

        bucket, key = path.split("/", 1)
        client = boto3.client("s3", endpoint_url=loc.endpoint_url, region_name=loc.region or None)
        return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    except Exception:
        return None
