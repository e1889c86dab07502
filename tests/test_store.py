"""The artifact store against a real S3 server (tests/s3server.py), local paths and file:// URIs."""

import hashlib
import json
import logging
import re
import secrets
import shutil
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import torch
from botocore.exceptions import ClientError
from PIL import Image
from safetensors.torch import load_file, save_file

from elborl import store
from elborl.store import ArtifactNotFoundError, ArtifactStore, ChecksumError, MiB

UNSAFE_SUFFIXES = [".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ""]


def make_source(root: Path) -> Path:
    """A small artifact directory: JSON, safetensors weights and a PNG in a subdirectory."""
    (root / "images").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"lr": 1e-4, "steps": 3}))
    save_file({"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.ones(4)}, root / "weights.safetensors")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "images" / "grid.png")
    return root


def files_in(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def local_path(uri: str) -> Path:
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


def stored(uri: str) -> set[str]:
    """Names stored under an artifact URI, looked at directly rather than through the store."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        return {item["Key"][len(prefix) + 1:] for item in listing.get("Contents", [])}
    root = local_path(uri)
    return set(files_in(root)) if root.exists() else set()


def overwrite(uri: str, name: str, data: bytes) -> None:
    """Changes one stored file behind the store's back."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    else:
        (local_path(uri) / name).write_bytes(data)


def leftovers(directory: Path) -> list[str]:
    return [path.name for path in directory.rglob("*.partial")] if directory.exists() else []


@pytest.fixture(params=["s3", "path", "file"])
def base(request, tmp_path) -> str:
    """Where to publish: a fresh bucket on the S3 server (found through the AWS environment), a path, a file:// URI."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_env').create_bucket()}"
    root = tmp_path / "store"
    return str(root) if request.param == "path" else root.as_uri()


def fail_second_call(original):
    """Wraps a transfer function so that its second call fails like a dropped connection, and later ones work."""
    calls = []

    def transfer(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise ConnectionError("connection reset during upload")
        return original(*args, **kwargs)

    return transfer


def test_round_trip_verifies_every_file(base, tmp_path):
    source = make_source(tmp_path / "source")
    uri = f"{base}/runs/model"
    manifest = store.put_artifact(source, uri, meta={"step": 3})

    assert store.exists(uri)
    expected = files_in(source)
    assert [entry["path"] for entry in manifest["files"]] == sorted(expected)
    for entry in manifest["files"]:
        assert entry["size"] == len(expected[entry["path"]])
        assert entry["sha256"] == hashlib.sha256(expected[entry["path"]]).hexdigest()
    assert manifest["meta"] == {"step": 3}
    assert store.read_manifest(uri) == manifest
    assert stored(uri) == set(expected) | {"manifest.json"}

    assert store.get_artifact(uri, tmp_path / "out") == manifest
    fetched = files_in(tmp_path / "out")
    assert json.loads(fetched.pop("manifest.json")) == manifest
    assert fetched == expected
    weights = load_file(tmp_path / "out" / "weights.safetensors")
    assert torch.equal(weights["weight"], torch.arange(12.0).reshape(3, 4))
    assert not leftovers(tmp_path)


def test_tampered_file_fails_naming_it(base, tmp_path):
    source = make_source(tmp_path / "source")
    uri = f"{base}/model"
    store.put_artifact(source, uri)
    original = (source / "weights.safetensors").read_bytes()
    overwrite(uri, "weights.safetensors", bytes(255 - b for b in original))  # same size, other bytes

    with pytest.raises(ChecksumError, match=r"model/weights\.safetensors: got sha256"):
        store.get_artifact(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not leftovers(tmp_path)


def test_interrupted_upload_is_not_published(base, tmp_path, monkeypatch):
    source = make_source(tmp_path / "source")
    uri = f"{base}/model"
    artifacts = ArtifactStore()
    if uri.startswith("s3://"):
        monkeypatch.setattr(artifacts.s3, "upload_file", fail_second_call(artifacts.s3.upload_file))
    else:
        monkeypatch.setattr(shutil, "copyfile", fail_second_call(shutil.copyfile))

    with pytest.raises(ConnectionError):
        artifacts.put_artifact(source, uri)
    assert not artifacts.exists(uri)
    assert "manifest.json" not in stored(uri)
    with pytest.raises(ArtifactNotFoundError, match=r"no published artifact at .*model \(manifest\.json missing\)"):
        artifacts.get_artifact(uri, tmp_path / "out")
    assert not leftovers(tmp_path)

    artifacts.put_artifact(source, uri)  # the retry publishes
    assert artifacts.exists(uri)


@pytest.mark.parametrize("suffix", UNSAFE_SUFFIXES)
def test_unsafe_formats_are_refused_before_any_upload(base, tmp_path, suffix):
    source = make_source(tmp_path / "source")
    unsafe = source / "nested" / f"model{suffix}"
    unsafe.parent.mkdir()
    unsafe.write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    uri = f"{base}/model"

    with pytest.raises(ValueError, match=re.escape(str(unsafe))):
        store.put_artifact(source, uri)
    assert stored(uri) == set()
    assert not store.exists(uri)


@pytest.mark.parametrize("path", ["model.pkl", "../escape.json", "/etc/escape.json", "a/../../escape.json"])
def test_hostile_manifest_is_refused_before_any_download(base, tmp_path, path):
    uri = f"{base}/model"
    entry = {"path": path, "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    store.write_json(f"{uri}/manifest.json", {"format": "elborl-artifact/1", "files": [entry], "meta": {}})

    with pytest.raises(ValueError, match=re.escape(path)):
        store.get_artifact(uri, tmp_path / "deep" / "out")
    assert not (tmp_path / "deep").exists()
    assert not (tmp_path / "escape.json").exists()


def test_multipart_transfer(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the explicit endpoint must win over this
    five = 5 * MiB  # S3's smallest part
    artifacts = ArtifactStore(endpoint_url=s3_env.endpoint_url, multipart_threshold=five, multipart_chunksize=five)
    source = tmp_path / "source"
    source.mkdir()
    save_file({"x": torch.randn(6 * MiB // 4)}, source / "big.safetensors")
    bucket = s3_env.create_bucket()

    artifacts.put_artifact(source, f"s3://{bucket}/big")
    etag = s3_env.client().head_object(Bucket=bucket, Key="big/big.safetensors")["ETag"]
    assert etag.endswith('-2"'), f"expected a 2-part upload, got ETag {etag}"
    artifacts.get_artifact(f"s3://{bucket}/big", tmp_path / "out")
    assert (tmp_path / "out" / "big.safetensors").read_bytes() == (source / "big.safetensors").read_bytes()


def test_settings_from_a_profile(s3_env, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile lab]\nendpoint_url = {s3_env.endpoint_url}\n")
    keys = f"aws_access_key_id = {s3_env.access_key}\naws_secret_access_key = {s3_env.secret_key}\n"
    credentials.write_text(f"[lab]\n{keys}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    uri = f"s3://{s3_env.create_bucket()}/model"
    ArtifactStore(profile="lab").put_artifact(make_source(tmp_path / "source"), uri)
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert store.exists(uri)


def test_missing_artifacts_and_inputs(base, tmp_path):
    with pytest.raises(ArtifactNotFoundError, match=r"no published artifact at .*/nothing \(manifest\.json missing\)"):
        store.get_artifact(f"{base}/nothing", tmp_path / "out")
    assert not store.exists(f"{base}/nothing")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        store.put_artifact(tmp_path / "absent", f"{base}/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        store.put_artifact(tmp_path / "empty", f"{base}/model")


def test_missing_bucket_is_not_published(s3_env):
    assert not ArtifactStore().exists("s3://no-such-bucket-elborl/model")


def test_published_artifacts_are_immutable(base, tmp_path):
    source = make_source(tmp_path / "source")
    store.put_artifact(source, f"{base}/model")
    with pytest.raises(FileExistsError, match="already"):
        store.put_artifact(source, f"{base}/model")
    store.get_artifact(f"{base}/model", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        store.get_artifact(f"{base}/model", tmp_path / "out")


def test_single_file_artifact(base, tmp_path):
    source = make_source(tmp_path / "source") / "config.json"
    manifest = store.put_artifact(source, f"{base}/config")
    assert [entry["path"] for entry in manifest["files"]] == ["config.json"]
    store.get_artifact(f"{base}/config", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == source.read_bytes()


def test_json_helpers(base):
    uri = f"{base}/state/latest.json"
    with pytest.raises(FileNotFoundError, match="latest.json"):
        store.read_json(uri)
    store.write_json(uri, {"epoch": 1})
    store.write_json(uri, {"epoch": 2, "tags": ["a"]})
    assert store.read_json(uri) == {"epoch": 2, "tags": ["a"]}


@pytest.mark.parametrize(
    "uri", ["", "s3://", "s3:///key", "s3:/bucket/key", "s3://Bad_Bucket/x", "gs://bucket/x", "file://host/x"]
)
def test_bad_uris(uri):
    with pytest.raises(ValueError, match="bad URI"):
        ArtifactStore().exists(uri)


def test_credentials_never_logged(s3_env, tmp_path, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    source = make_source(tmp_path / "source")
    uri = f"s3://{s3_env.create_bucket()}/model"
    store.put_artifact(source, uri)
    store.get_artifact(uri, tmp_path / "out")
    overwrite(uri, "config.json", b"{}")
    failures = [lambda: store.get_artifact(uri, tmp_path / "again"), lambda: store.read_manifest(uri + "x")]
    wrong_secret = f"wrong-secret-{secrets.token_hex(8)}"
    if s3_env.checks_signatures:  # wrong credentials must fail loudly, not look like "not published"
        failures.append(lambda: monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret) or store.exists(uri))
    errors = []
    for failing in failures:
        with pytest.raises((ChecksumError, ArtifactNotFoundError, ClientError)) as caught:
            failing()
        errors.append(str(caught.value))

    printed = "".join(capfd.readouterr())
    ours = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("elborl"))
    above_debug = "\n".join(record.getMessage() for record in caplog.records if record.levelno > logging.DEBUG)
    assert "published" in ours and "fetched" in ours
    for secret in (s3_env.secret_key, wrong_secret):
        assert secret not in caplog.text + printed + "".join(errors)
    # botocore's own DEBUG lines carry the access key id inside the Authorization header; nothing else may
    assert s3_env.access_key not in ours + above_debug + printed + "".join(errors)


def test_fetch_object_caches_single_s3_objects(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket()
    weights = b"\x80\x02 checkpoint bytes" * 1000
    s3_env.client().put_object(Bucket=bucket, Key="weights/m2f.pth", Body=weights)
    cache = tmp_path / "cache"
    path = ArtifactStore().fetch_object(f"s3://{bucket}/weights/m2f.pth", cache)
    assert path == (cache / "s3" / bucket / "weights" / "m2f.pth").resolve() and path.read_bytes() == weights
    downloads = []
    original = ArtifactStore.fetch_object
    monkeypatch.setattr("boto3.s3.transfer.S3Transfer.download_file", lambda *a, **k: downloads.append(a))
    assert original(ArtifactStore(), f"s3://{bucket}/weights/m2f.pth", cache) == path
    assert downloads == []  # cached with the object's size: not downloaded again
    assert leftovers(cache) == []
    with pytest.raises(FileNotFoundError, match=f"no object at s3://{bucket}/weights/absent.pth"):
        ArtifactStore().fetch_object(f"s3://{bucket}/weights/absent.pth", cache)
    local = tmp_path / "local.pth"
    local.write_bytes(weights)
    assert ArtifactStore().fetch_object(local) == local and ArtifactStore().fetch_object(local.as_uri()) == local
    with pytest.raises(FileNotFoundError, match="no file at"):
        ArtifactStore().fetch_object(tmp_path / "absent.pth")


def test_publish_skips_published_artifacts_and_merges_metadata_from_the_work(base, tmp_path):
    uri, calls, lines = f"{base}/runs/stage", [], []

    def write(directory: Path) -> dict:
        calls.append(directory)
        (directory / "out.json").write_text('{"x": 1}')
        return {"seconds": 2.5}

    artifacts = ArtifactStore()
    assert artifacts.publish(uri, write, {"stage": "demo"}, log=lines.append)
    assert artifacts.read_manifest(uri)["meta"] == {"stage": "demo", "seconds": 2.5}
    assert not artifacts.publish(uri, write, {"stage": "demo"}, log=lines.append)
    assert len(calls) == 1 and not calls[0].exists()  # the work ran once, in a temporary directory
    assert lines == [f"published {uri}", f"{uri}: already published, skipped"]


def test_local_artifact_reads_local_in_place_and_caches_s3_by_manifest(base, tmp_path):
    artifacts = ArtifactStore()
    with pytest.raises(ArtifactNotFoundError):
        artifacts.local_artifact(f"{base}/nothing", tmp_path / "cache")
    uri = f"{base}/runs/model"
    artifacts.put_artifact(make_source(tmp_path / "source"), uri)
    local = artifacts.local_artifact(uri, tmp_path / "cache")
    assert files_in(local).keys() >= files_in(tmp_path / "source").keys()
    if base.startswith("s3://"):
        assert local.parent == tmp_path / "cache" / "artifacts"
        assert artifacts.local_artifact(uri, tmp_path / "cache") == local  # fetched once, then reused
    else:
        assert local.resolve() == Path(urlparse(uri).path if uri.startswith("file:") else uri).resolve()
        assert not (tmp_path / "cache").exists()


def test_one_resolver_reads_every_kind_of_location_into_one_cache(s3_env, tmp_path):
    """`local`: a local file or directory as it is; on S3 a published artifact (verified, under artifacts/), a
    single object (under s3/) and a prefix of plain objects (mirrored under s3/), all in the one cache root."""
    bucket = s3_env.create_bucket()
    client = s3_env.client()
    source = tmp_path / "source"
    source.mkdir()
    (source / "weights.safetensors").write_bytes(b"tensors")
    store.put_artifact(source, f"s3://{bucket}/published")
    client.put_object(Bucket=bucket, Key="objects/model.pth", Body=b"pickled")
    client.put_object(Bucket=bucket, Key="snapshot/unet/config.json", Body=b"{}")
    cache = tmp_path / "cache"
    artifact = store.local(f"s3://{bucket}/published", cache)
    assert artifact.parent == cache / "artifacts" and (artifact / "weights.safetensors").read_bytes() == b"tensors"
    assert store.local(f"s3://{bucket}/objects/model.pth", cache) == (cache / "s3" / bucket / "objects/model.pth").resolve()
    snapshot = store.local(f"s3://{bucket}/snapshot", cache)
    assert snapshot == (cache / "s3" / bucket / "snapshot").resolve() and (snapshot / "unet/config.json").is_file()
    assert store.local(source / "weights.safetensors") == source / "weights.safetensors"
    assert store.local(source.as_uri()) == source
    with pytest.raises(FileNotFoundError, match="nothing at"):
        store.local(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{bucket}/absent"):
        store.local(f"s3://{bucket}/absent", cache)
    with pytest.MonkeyPatch.context() as patch:  # the default root: $ELBORL_CACHE
        patch.setenv("ELBORL_CACHE", str(tmp_path / "env-cache"))
        assert store.local(f"s3://{bucket}/published").parent == tmp_path / "env-cache" / "artifacts"
