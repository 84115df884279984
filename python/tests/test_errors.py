"""Failures are Python exceptions (tensorbake.StoreError subclasses) naming the store,
part and array: a missing feature, an uncommitted part, a corrupted shard, a missing
store, S3 endpoints that are closed or go away."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

import tensorbake
from conftest import STORE_PY, require


def test_a_missing_feature_names_the_store_and_the_array(demo_store):
    s = tensorbake.open(demo_store)
    with pytest.raises(tensorbake.UnknownArrayError) as e:
        s.get_batch([0, 1], ["siglip_hidden", "flux_vae_mean"])
    msg = str(e.value)
    assert str(demo_store) in msg and "flux_vae_mean" in msg and "siglip_hidden" in msg  # lists the arrays it has
    assert e.value.store == str(demo_store) and e.value.array == "flux_vae_mean"
    assert isinstance(e.value, KeyError) and isinstance(e.value, tensorbake.StoreError)
    with pytest.raises(tensorbake.UnknownArrayError, match="flux_vae_mean"):
        s.sample(0, ["flux_vae_mean"])


def test_an_uncommitted_part_is_invisible_and_named(store_copy):
    first = tensorbake.open(store_copy)
    victim = first.parts[1].name
    marker = store_copy / "parts" / victim / "zarr.json"
    doc = json.loads(marker.read_text())
    doc["attributes"]["tensorbake_part"]["committed"] = False
    marker.write_text(json.dumps(doc))
    s = tensorbake.open(store_copy)
    assert len(s) == 12 and victim not in [p.name for p in s.parts]
    assert s.uncommitted_parts == [victim]
    # the index skips it: sample 6 is now the first sample of the third part
    assert s[6]["key"] == first[12]["key"]
    with pytest.raises(tensorbake.UncommittedPartError) as e:
        s.part(victim)
    msg = str(e.value)
    assert str(store_copy) in msg and victim in msg and "not committed" in msg
    assert (e.value.store, e.value.part) == (str(store_copy), victim)
    with pytest.raises(tensorbake.UncommittedPartError, match=victim):
        s.part_rows(victim)
    with pytest.raises(tensorbake.UnknownPartError, match="nope"):
        s.part("nope")


def _corrupt_first_shard(store, part, array):
    shard_dir = store / "parts" / part / array / "c"
    shard = sorted(p for p in shard_dir.rglob("*") if p.is_file())[0]
    data = bytearray(shard.read_bytes())
    for i in range(8, 24):  # inside the first inner chunk's zstd frame
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))


def test_a_corrupted_shard_names_store_part_and_array(store_copy):
    s0 = tensorbake.open(store_copy)
    part = s0.parts[2].name
    _corrupt_first_shard(store_copy, part, "siglip_hidden")
    s = tensorbake.open(store_copy)
    # other arrays and parts still read
    s.get_batch(range(18), ["t5_hidden", "sd_vae_mean"])
    s.get_batch(range(12), ["siglip_hidden"])
    for read in (lambda: s[12], lambda: s.get_batch(range(18), ["siglip_hidden"], threads=3)):
        with pytest.raises(tensorbake.CorruptDataError) as e:
            read()
        msg = str(e.value)
        assert str(store_copy) in msg and part in msg and "siglip_hidden" in msg, msg
        assert (e.value.store, e.value.part, e.value.array) == (str(store_copy), part, "siglip_hidden")


def test_a_missing_store_and_a_bad_location(tmp_path):
    with pytest.raises(tensorbake.NotAStoreError, match="nowhere"):
        tensorbake.open(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(tensorbake.NotAStoreError, match="not written by tensorbake"):
        tensorbake.open(tmp_path / "plain")
    with pytest.raises(tensorbake.InvalidLocationError, match="gs://"):
        tensorbake.open("gs://bucket/x")


def test_out_of_range_is_an_index_error(demo_store):
    s = tensorbake.open(demo_store)
    with pytest.raises(IndexError, match="18 committed samples"):
        s[18]
    with pytest.raises(tensorbake.SampleIndexError, match=str(demo_store)):
        s.get_batch([0, 99])
    with pytest.raises(IndexError):
        s[-19]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _s3_env(monkeypatch, port):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")


def test_a_closed_s3_endpoint_names_the_store(monkeypatch):
    port = _free_port()  # nothing listens there
    _s3_env(monkeypatch, port)
    with pytest.raises(tensorbake.StoreIOError) as e:
        tensorbake.open("s3://tensorbake-test/stores/closed.zarr")
    msg = str(e.value)
    assert "s3://tensorbake-test/stores/closed.zarr" in msg and "zarr.json" in msg, msg
    print(msg)
    assert isinstance(e.value, OSError)


class Moto:
    """moto's S3 server on loopback (store/python/moto_s3.py); stop() closes it."""

    def __init__(self, bucket):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(STORE_PY / "moto_s3.py"), str(self.port), bucket],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert "ready" in line, "moto did not start"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_s3_reads_equal_local_and_a_vanished_endpoint_names_store_part_and_array(demo_store, monkeypatch):
    boto3 = require("boto3")
    require("moto")
    moto = Moto("tensorbake-test")
    try:
        _s3_env(monkeypatch, moto.port)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto.port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        for path in demo_store.rglob("*"):
            if path.is_file():
                rel = path.relative_to(demo_store).as_posix()
                client.upload_file(str(path), "tensorbake-test", f"stores/demo.zarr/{rel}")
        url = "s3://tensorbake-test/stores/demo.zarr"
        s3 = tensorbake.open(url)
        local = tensorbake.open(demo_store)
        assert len(s3) == len(local) and s3.spec == local.spec
        assert [p.name for p in s3.parts] == [p.name for p in local.parts]
        names = ["siglip_hidden", "t5_hidden", "t5_len", "caption"]
        a, b = s3.get_batch(range(12), names), local.get_batch(range(12), names)
        for name in names:
            assert (a[name] == b[name]) if name == "caption" else a[name].tobytes() == b[name].tobytes()
        assert s3.null_embeddings()["t5_hidden"].tobytes() == local.null_embeddings()["t5_hidden"].tobytes()
        s3.sample(13, ["t5_len"])  # opens the third part's arrays
        moto.stop()
        started = time.monotonic()
        with pytest.raises(tensorbake.StoreIOError) as e:
            s3.sample(15, ["sd_vae_std"])  # GETs of sample 15's key and sd_vae_std
        msg = str(e.value)
        part = local.parts[2].name
        assert (e.value.store, e.value.part) == (url, part)
        assert e.value.array in ("key", "sd_vae_std")
        assert url in msg and part in msg and f"array {e.value.array}" in msg, msg
        print(f"vanished endpoint reported after {time.monotonic() - started:.1f} s: {msg}")
    finally:
        moto.stop()
