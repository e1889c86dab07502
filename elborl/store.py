"""Artifact store: directories of safe files at `s3://bucket/prefix` or at a local path (or `file://` URI).

An artifact is the set of files under one prefix. `put_artifact` uploads every file first and writes
`manifest.json` (each file's relative path, size and sha256, plus optional user metadata) last, so a reader
that finds the manifest finds a complete artifact, and an interrupted upload never looks finished.
`get_artifact` checks every file against the manifest before the download appears under its final name.
Only formats that cannot run code when loaded cross the store (no pickle: .pt, .pkl, .bin, .ckpt, ...).

S3 endpoint and credentials come from the standard AWS environment and profiles (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, all read by boto3 itself);
an explicit `endpoint_url` or `profile` overrides them. Nothing about credentials is logged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "elborl-artifact/1"
SAFE_SUFFIXES = frozenset(
    {".safetensors", ".json", ".jsonl", ".parquet", ".csv", ".png", ".jpg", ".jpeg", ".txt", ".yaml", ".yml", ".md"}
)
MiB = 1024 * 1024

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


class ArtifactNotFoundError(FileNotFoundError):
    """No manifest at the URI: nothing was published there, or its upload was interrupted."""


class ChecksumError(ValueError):
    """A fetched file's size or sha256 differs from the manifest: corrupted in transit or changed in the store."""


# --- what may cross the store -------------------------------------------------------------------
def check_safe_format(name: str) -> None:
    """Refuses files that can run code when loaded (pickle-based .pt/.pkl/.bin/.ckpt) and any unknown format."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in SAFE_SUFFIXES:
        allowed = " ".join(sorted(SAFE_SUFFIXES))
        raise ValueError(f"{name}: {suffix or 'no suffix'} is not a safe format for the artifact store ({allowed})")


def _check_relative(path: str, uri: str) -> None:
    """Manifest paths come from the remote side: refuse any that would land outside the download directory."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{uri}/{MANIFEST}: unsafe file path {path!r}")


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _collect(source: Path) -> list[tuple[str, Path]]:
    """The files to publish as (relative posix path, local path), every one checked before anything is sent."""
    if not source.exists():
        raise FileNotFoundError(f"nothing to publish: {source} does not exist")
    if source.is_file():
        files = [(source.name, source)]
    else:
        files = sorted((path.relative_to(source).as_posix(), path) for path in source.rglob("*") if path.is_file())
    if not files:
        raise ValueError(f"nothing to publish: {source} holds no files")
    for relative, path in files:
        if relative == MANIFEST:
            raise ValueError(f"{path}: {MANIFEST} is reserved for the store's own manifest")
        check_safe_format(str(path))
    return files


def _build_manifest(files: list[tuple[str, Path]], meta: dict | None) -> dict:
    entries = [{"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)} for rel, path in files]
    return {"format": MANIFEST_FORMAT, "files": entries, "meta": meta or {}}


def _parse_manifest(data: bytes, uri: str) -> dict:
    """Validates a manifest read from the store, so a malformed or hostile one fails before any download."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ValueError(f"{uri}/{MANIFEST} is not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{uri}/{MANIFEST} is not an {MANIFEST_FORMAT} manifest")
    for entry in files:
        well_formed = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and _SHA256.fullmatch(str(entry.get("sha256")))
        )
        if not well_formed:
            raise ValueError(f"{uri}/{MANIFEST}: malformed file entry {entry!r}")
        _check_relative(entry["path"], uri)
        check_safe_format(f"{uri}/{entry['path']}")
    return manifest


def _verify(path: Path, entry: dict, uri: str) -> None:
    size, digest = path.stat().st_size, _sha256(path)
    if size != entry["size"] or digest != entry["sha256"]:
        raise ChecksumError(
            f"{uri}/{entry['path']}: got sha256 {digest} ({size} bytes), "
            f"manifest says {entry['sha256']} ({entry['size']} bytes)"
        )


_VERIFIED_IN_PLACE: set[tuple[str, str]] = set()  # (directory, manifest digest) checked by this process


def _verify_in_place(directory: Path, manifest: dict, uri: str, digest: str) -> None:
    key = (str(directory.resolve()), digest)
    if key in _VERIFIED_IN_PLACE:
        return
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file():
            raise ChecksumError(f"{uri}/{entry['path']}: missing, though the manifest lists it")
        _verify(path, entry, uri)
    _VERIFIED_IN_PLACE.add(key)


def _staging_dir(target: Path) -> Path:
    """A fresh directory beside `target`, so the final rename stays on one filesystem and is atomic."""
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir(parents=True)
    return staging


def _encode(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# --- URIs ---------------------------------------------------------------------------------------
def _parse_uri(uri: str | os.PathLike) -> tuple[str | None, str]:
    """('bucket', 'key') for s3:// URIs, (None, 'path') for local paths and file:// URIs; ValueError otherwise."""
    text = os.fspath(uri)
    if not text:
        raise ValueError("bad URI: empty")
    scheme = _SCHEME.match(text)
    if scheme is None:
        return None, text
    if scheme.group(1) == "s3":
        bucket, _, key = text[len("s3://"):].partition("/")
        if not text.startswith("s3://") or not _BUCKET.fullmatch(bucket):
            raise ValueError(f"bad URI {text!r}: expected s3://bucket/prefix")
        segments = key.rstrip("/").split("/") if key.rstrip("/") else []
        if any(segment in ("", ".", "..") for segment in segments):
            # S3 keeps such keys literally, but the same names on disk (the cache, a mirror) would climb out
            raise ValueError(f"bad URI {text!r}: a key may not have empty, '.' or '..' segments")
        return bucket, key
    if scheme.group(1) == "file":
        parsed = urlparse(text)
        if not text.startswith("file://") or parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ValueError(f"bad URI {text!r}: expected file:///absolute/path")
        return None, unquote(parsed.path)
    raise ValueError(f"bad URI {text!r}: only s3://, file:// and local paths are supported")


class _LocalPrefix:
    """A directory on the local filesystem, seen through the same small interface as an S3 prefix."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Writes through a temporary file and a rename, so readers never see half a file."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        partial.write_bytes(data)
        partial.replace(path)

    def publish(self, files: list[tuple[str, Path]], manifest: bytes) -> None:
        """Copies into a staging directory, manifest last, then renames it: the artifact appears whole or not at all."""
        if self.root.exists():
            raise FileExistsError(f"{self.root} already exists; publish a local artifact to a new path")
        staging = _staging_dir(self.root)
        try:
            for relative, path in files:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / relative)
            (staging / MANIFEST).write_bytes(manifest)
            staging.rename(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def fetch(self, relative: str, destination: Path) -> None:
        shutil.copyfile(self.root / relative, destination)


class _S3Prefix:
    """Objects under `s3://bucket/prefix/`; large files go through boto3's multipart transfers."""

    def __init__(self, client, transfer: TransferConfig, bucket: str, prefix: str):
        self.client, self.transfer, self.bucket = client, transfer, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def has(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        return True

    def read(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except ClientError as error:
            if _is_missing(error):
                return None
            raise

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def publish(self, files: list[tuple[str, Path]], manifest: bytes) -> None:
        """Uploads every file, then the manifest: S3 has no rename, so the manifest is what makes it visible."""
        for relative, path in files:
            logger.debug("uploading %s to %s/%s", path, self.uri, relative)
            self.client.upload_file(str(path), self.bucket, self.prefix + relative, Config=self.transfer)
        self.write(MANIFEST, manifest)

    def fetch(self, relative: str, destination: Path) -> None:
        self.client.download_file(self.bucket, self.prefix + relative, str(destination), Config=self.transfer)


def _is_missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _MISSING_CODES


# --- the store ----------------------------------------------------------------------------------
class ArtifactStore:
    """Publishes and fetches artifacts; holds one S3 client (built on first S3 use) and its transfer settings.

    `multipart_threshold`/`multipart_chunksize`: files at least this large go up and down in parts (S3's
    smallest part is 5 MiB). `max_attempts`/`retry_mode`: botocore's retries with exponential backoff on
    throttling, 5xx and connection errors ('standard' or 'adaptive').
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        profile: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_attempts: int = 8,
        retry_mode: str = "standard",
    ):
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize)
        self.retries = {"mode": retry_mode, "max_attempts": max_attempts}
        self._client = None

    @property
    def s3(self):
        """The boto3 S3 client, built lazily so that local-only use needs no AWS configuration."""
        if self._client is None:
            session = boto3.session.Session(profile_name=self.profile)
            config = Config(retries=self.retries)
            self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _prefix(self, uri: str | os.PathLike) -> _LocalPrefix | _S3Prefix:
        bucket, key = _parse_uri(uri)
        return _LocalPrefix(Path(key)) if bucket is None else _S3Prefix(self.s3, self.transfer, bucket, key)

    def _object(self, uri: str | os.PathLike) -> tuple[_LocalPrefix | _S3Prefix, str]:
        """The prefix holding a single object, and the object's name in it."""
        bucket, key = _parse_uri(uri)
        parent, _, name = key.rstrip("/").rpartition("/")
        if not name:
            raise ValueError(f"bad URI {os.fspath(uri)!r}: names no object")
        if bucket is None:
            return _LocalPrefix(Path(key).parent), Path(key).name
        return _S3Prefix(self.s3, self.transfer, bucket, parent), name

    def put_artifact(self, source: str | os.PathLike, uri: str | os.PathLike, meta: dict | None = None) -> dict:
        """Publishes a local directory (or one file) at `uri`; returns the manifest. Artifacts are immutable."""
        files = _collect(Path(source))
        manifest = _build_manifest(files, meta)
        body = _encode(manifest)
        prefix = self._prefix(uri)
        if prefix.has(MANIFEST):
            raise FileExistsError(f"{prefix.uri} is already published; artifacts are immutable, publish to a new URI")
        prefix.publish(files, body)
        total = sum(entry["size"] for entry in manifest["files"])
        logger.info("published %s: %d files, %d bytes", prefix.uri, len(files), total)
        return manifest

    def get_artifact(self, uri: str | os.PathLike, local_dir: str | os.PathLike) -> dict:
        """Downloads a published artifact into the new directory `local_dir` (with its manifest); returns the manifest.

        Files land in a staging directory beside `local_dir`, are checked against the manifest, and the
        directory is renamed into place only when all match, so `local_dir` is either complete or absent.
        """
        prefix = self._prefix(uri)
        manifest = self._read_manifest(prefix)
        target = Path(local_dir)
        if target.exists():
            raise FileExistsError(f"{target} already exists; get_artifact downloads into a new directory")
        staging = _staging_dir(target)
        try:
            for entry in manifest["files"]:
                destination = staging / entry["path"]
                destination.parent.mkdir(parents=True, exist_ok=True)
                prefix.fetch(entry["path"], destination)
                _verify(destination, entry, prefix.uri)
            (staging / MANIFEST).write_bytes(_encode(manifest))
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("fetched %s into %s: %d files verified", prefix.uri, target, len(manifest["files"]))
        return manifest

    def publish(self, uri: str, write, meta: dict | None = None, log=print) -> bool:
        """Makes an artifact and publishes it at `uri` unless it is already published (then returns False).

        `write(directory)` fills a fresh temporary directory and may return a dict of metadata computed on the
        way (e.g. the seconds the work took), merged over `meta`. The already-published check comes first, so a
        re-run stage skips its work too.
        """
        if self.exists(uri):
            log(f"{uri}: already published, skipped")
            return False
        try:
            with tempfile.TemporaryDirectory() as tmp:
                extra = write(Path(tmp))
                self.put_artifact(tmp, uri, {**(meta or {}), **(extra or {})})
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise OSError(errno.ENOSPC, f"no space left on device while making {uri} (in {tempfile.gettempdir()} "
                                        "or at its destination); nothing was published, what was stands") from error
        log(f"published {uri}")
        return True

    def local(self, uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
        """A local path for whatever `uri` names, fetched at most once: the one way to read from a local path or
        `s3://` (base models, reward and detector weights, artifacts).

        Local paths and file:// URIs are returned as they are (they must exist). On S3, an artifact (a prefix with
        a manifest) is fetched and verified as `local_artifact` does; a single object lands in
        `<cache>/s3/<bucket>/<key>` (`fetch_object`); any other prefix, such as a model snapshot uploaded with
        `aws s3 sync`, is mirrored into `<cache>/s3/<bucket>/<prefix>`. `cache`: the cache root (`cache_root`).
        """
        bucket, key = _parse_uri(uri)
        if bucket is None:
            if not Path(key).exists():
                raise FileNotFoundError(f"nothing at {os.fspath(uri)}")
            return self.local_artifact(uri) if (Path(key) / MANIFEST).is_file() else Path(key)
        if self.exists(uri):
            return self.local_artifact(uri, cache)
        if key and not key.endswith("/") and self._object_size(bucket, key) is not None:
            return self.fetch_object(uri, cache)
        return self.mirror_prefix(uri, cache_root(cache) / "s3" / bucket / key.strip("/"))

    def local_artifact(self, uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
        """A published artifact as a local directory.

        Local artifacts are read in place (their manifest must exist), checked against it once per process: a file
        truncated, altered or missing since it was published fails here, naming it, not deep in a loader. `s3://`
        ones are downloaded and verified once into `<cache>/artifacts/<digest of the manifest>` (`cache`: the
        cache root, `cache_root`) and reused while the published manifest is unchanged; a republished artifact
        gets a new directory.
        """
        manifest = self.read_manifest(uri)  # a clear error when nothing is published there
        bucket, key = _parse_uri(uri)
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
        if bucket is None:
            _verify_in_place(Path(key), manifest, os.fspath(uri), digest)
            return Path(key)
        target = cache_root(cache) / "artifacts" / digest
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.get_artifact(uri, target)
            except FileExistsError:  # another process fetched it meanwhile (artifacts land by a rename)
                if not (target / MANIFEST).is_file():
                    raise
        return target

    def exists(self, uri: str | os.PathLike) -> bool:
        """True only when the artifact's manifest is published (a half-uploaded artifact does not exist)."""
        return self._prefix(uri).has(MANIFEST)

    def read_manifest(self, uri: str | os.PathLike) -> dict:
        return self._read_manifest(self._prefix(uri))

    def _read_manifest(self, prefix: _LocalPrefix | _S3Prefix) -> dict:
        data = prefix.read(MANIFEST)
        if data is None:
            raise ArtifactNotFoundError(f"no published artifact at {prefix.uri} ({MANIFEST} missing)")
        return _parse_manifest(data, prefix.uri)

    def mirror_prefix(self, uri: str, target: str | os.PathLike) -> Path:
        """Copies every object under an `s3://` prefix that was not published as an artifact (e.g. a model
        snapshot uploaded with `aws s3 sync`) into `target`; files already there with the object's size are
        kept, so a second call downloads only what is missing. Returns `target`."""
        bucket, key = _parse_uri(uri)
        if bucket is None:
            raise ValueError(f"not an s3:// URI: {os.fspath(uri)!r}")
        prefix = _S3Prefix(self.s3, self.transfer, bucket, key)
        target = Path(target).resolve()
        objects = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.prefix):
            objects += [(o["Key"], int(o["Size"])) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not objects:
            raise FileNotFoundError(f"no objects under {prefix.uri}")
        fetched = 0
        for object_key, size in objects:
            local = (target / object_key[len(prefix.prefix):]).resolve()
            if not local.is_relative_to(target):
                raise ValueError(f"object key {object_key!r} escapes {target}")
            if local.is_file() and local.stat().st_size == size:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:12]}.partial")
            prefix.fetch(object_key[len(prefix.prefix):], partial)
            partial.replace(local)
            fetched += 1
        logger.info("mirrored %s: %d objects, %d downloaded to %s", prefix.uri, len(objects), fetched, target)
        return target

    def read_json(self, uri: str | os.PathLike):
        """A small JSON object stored at `uri` itself (not an artifact: no manifest)."""
        prefix, name = self._object(uri)
        data = prefix.read(name)
        if data is None:
            raise FileNotFoundError(f"no object at {os.fspath(uri)}")
        return json.loads(data)

    def write_json(self, uri: str | os.PathLike, value) -> None:
        """Stores `value` as JSON at `uri`, replacing what was there (locally by an atomic rename)."""
        prefix, name = self._object(uri)
        prefix.write(name, _encode(value))

    def fetch_object(self, uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
        """A local path holding the single object at `uri` (no manifest: e.g. third-party model weights).

        Local paths and file:// URIs are returned as they are (they must exist). s3:// objects are
        downloaded once to `<cache>/s3/<bucket>/<key>` (`cache`: the cache root, `cache_root`) through a partial
        file and a rename; a cached file of the object's size is reused. The format is not checked here: the
        caller loads the file with a safe loader.
        """
        bucket, key = _parse_uri(uri)
        if bucket is None:
            path = Path(key)
            if not path.is_file():
                raise FileNotFoundError(f"no file at {os.fspath(uri)}")
            return path
        if not key or key.endswith("/"):
            raise ValueError(f"bad URI {os.fspath(uri)!r}: names no object")
        root = cache_root(cache) / "s3"
        target = (root / bucket / key).resolve()
        if not target.is_relative_to(root.resolve()):
            raise ValueError(f"object key {key!r} escapes the cache directory")
        size = self._object_size(bucket, key)
        if size is None:
            raise FileNotFoundError(f"no object at {os.fspath(uri)}")
        if target.is_file() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            self.s3.download_file(bucket, key, str(partial), Config=self.transfer)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        logger.info("fetched s3://%s/%s into %s (%d bytes)", bucket, key, target, size)
        return target

    def _object_size(self, bucket: str, key: str) -> int | None:
        """The size of the object `key`, None when there is none."""
        try:
            return int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as error:
            if _is_missing(error):
                return None
            raise


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The one local cache of what is fetched from S3: `cache` when given, else $ELBORL_CACHE, else
    ~/.cache/elborl. Verified artifacts go under artifacts/, other objects and prefixes under s3/."""
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get("ELBORL_CACHE", Path.home() / ".cache" / "elborl"))


# --- one-off calls with the default settings (endpoint and credentials from the environment) ----------
def put_artifact(source: str | os.PathLike, uri: str | os.PathLike, meta: dict | None = None) -> dict:
    return ArtifactStore().put_artifact(source, uri, meta)


def get_artifact(uri: str | os.PathLike, local_dir: str | os.PathLike) -> dict:
    return ArtifactStore().get_artifact(uri, local_dir)


def exists(uri: str | os.PathLike) -> bool:
    return ArtifactStore().exists(uri)


def read_manifest(uri: str | os.PathLike) -> dict:
    return ArtifactStore().read_manifest(uri)


def read_json(uri: str | os.PathLike):
    return ArtifactStore().read_json(uri)


def write_json(uri: str | os.PathLike, value) -> None:
    ArtifactStore().write_json(uri, value)


def local(uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    return ArtifactStore().local(uri, cache)
