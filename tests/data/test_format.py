"""Shard contract v1: sample round trip through a real tar, manifest checks, strict readers, no unpickling."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import webdataset as wds

from longcat_dist.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BucketInfo,
    Manifest,
    ShardFormatError,
    ShardInfo,
    bucket_name,
    decode_sample,
    encode_sample,
    latent_shape,
    load_null_text,
    save_null_text,
    sha256_file,
    shard_relpath,
)

TEXT_DIM = 8
BUCKET = BucketInfo(bucket_name(9, 64, 128), 9, 64, 128, latent_shape(9, 64, 128))


def _tensors(text_len: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(BUCKET.latent_shape, generator=g)  # [16, 3, 8, 16]
    cond = torch.randn(16, 1, 8, 16, generator=g)
    text = torch.randn(text_len, TEXT_DIM, generator=g)
    return video, cond, text


def _meta(caption: str = "a red square moves left") -> dict:
    return {"caption": caption, "sources": ["a.mp4", "a.png"], "frames": 9, "fps": 8.0, "size": [64, 128],
            "bucket": BUCKET.name}  # fmt: skip


def _manifest(shards: list[ShardInfo]) -> Manifest:
    bucket = BucketInfo(BUCKET.name, 9, 64, 128, BUCKET.latent_shape, shards)
    return Manifest(
        format_version=FORMAT_VERSION,
        dataset_id="demo",
        vae={
            "class": "AutoencoderKLWan",
            "config_hash": "abc",
            "latents_mean": [0.0] * 16,
            "latents_std": [1.0] * 16,
        },
        text_encoder={"name": "umt5-tiny", "max_length": 16, "dim": TEXT_DIM},
        buckets=[bucket],
        total_samples=bucket.num_samples,
    )


def test_names_and_shapes_follow_the_contract():
    assert latent_shape(93, 480, 832) == (16, 24, 60, 104)
    assert bucket_name(93, 480, 832) == "480x832x93"
    assert shard_relpath("ds", "480x832x93", 7) == "480x832x93/ds-480x832x93-000007.tar"


def test_sample_round_trip_through_a_tar(tmp_path: Path):
    path = tmp_path / "shard.tar"
    originals = {f"clip_{i}": (_tensors(text_len=i + 1, seed=i), _meta(f"caption {i}")) for i in range(3)}
    with wds.TarWriter(str(path)) as sink:
        for key, ((video, cond, text), meta) in originals.items():
            sink.write(encode_sample(key, video, cond, text, meta))
    raws = list(wds.tarfile_samples([{"url": str(path)}]))
    assert [r["__key__"] for r in raws] == list(originals)
    for raw in raws:
        sample = decode_sample(raw, BUCKET, TEXT_DIM)
        (video, cond, text), meta = originals[sample.key]
        assert sample.video.dtype == sample.cond.dtype == sample.text.dtype == torch.bfloat16
        assert torch.equal(sample.video, video.bfloat16())
        assert torch.equal(sample.cond, cond.bfloat16())
        assert torch.equal(sample.text, text.bfloat16())  # unpadded: keeps its own length
        assert sample.meta == meta


def test_unknown_member_is_rejected_with_key_and_url():
    raw = encode_sample("clip_0", *_tensors(), _meta())
    raw["__url__"] = "shards/x.tar"
    raw["mp4"] = b"\x00"
    with pytest.raises(ShardFormatError, match=r"clip_0.*shards/x\.tar.*mp4"):
        decode_sample(raw, BUCKET, TEXT_DIM)


def test_missing_member_is_rejected():
    raw = encode_sample("clip_0", *_tensors(), _meta())
    del raw["json"]
    with pytest.raises(ShardFormatError, match="missing member 'json'"):
        decode_sample(raw, BUCKET, TEXT_DIM)


def test_shape_mismatch_with_the_bucket_is_rejected():
    video, cond, text = _tensors()
    raw = encode_sample("clip_0", video[:, :2], cond, text, _meta())
    with pytest.raises(ShardFormatError, match="do not match bucket 64x128x9"):
        decode_sample(raw, BUCKET, TEXT_DIM)
    raw = encode_sample("clip_0", video, cond, torch.randn(3, TEXT_DIM + 1), _meta())
    with pytest.raises(ShardFormatError, match=r"text \[3, 9\]"):
        decode_sample(raw, BUCKET, TEXT_DIM)


def test_meta_bucket_must_match_the_bucket_read():
    raw = encode_sample("clip_0", *_tensors(), {**_meta(), "bucket": "64x64x9"})
    with pytest.raises(ShardFormatError, match="meta says bucket '64x64x9'"):
        decode_sample(raw, BUCKET, TEXT_DIM)


def test_encode_rejects_bad_keys_and_shapes():
    video, cond, text = _tensors()
    with pytest.raises(ShardFormatError, match="no dots"):
        encode_sample("clip.0", video, cond, text, _meta())
    with pytest.raises(ShardFormatError, match="cond must be"):
        encode_sample("clip_0", video, cond[:, :, :4], text, _meta())
    with pytest.raises(ShardFormatError, match="L_valid >= 1"):
        encode_sample("clip_0", video, cond, text[:0], _meta())


class _Bomb:
    """Unpickling this would create a file: proves a reader never unpickles."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_payload_is_never_unpickled(tmp_path: Path):
    target = tmp_path / "unpickled"
    raw = encode_sample("clip_0", *_tensors(), _meta())
    raw["latents.safetensors"] = pickle.dumps(_Bomb(str(target)))
    with pytest.raises(ShardFormatError, match="not a valid safetensors"):
        decode_sample(raw, BUCKET, TEXT_DIM)
    raw = encode_sample("clip_0", *_tensors(), _meta())
    raw["pickle"] = pickle.dumps(_Bomb(str(target)))
    with pytest.raises(ShardFormatError, match="unexpected members"):
        decode_sample(raw, BUCKET, TEXT_DIM)
    assert not target.exists()


def test_fp32_tensors_are_rejected():
    from safetensors.torch import save

    raw = encode_sample("clip_0", *_tensors(), _meta())
    video, cond, text = _tensors()
    raw["latents.safetensors"] = save({"video": video, "cond": cond, "text": text})
    with pytest.raises(ShardFormatError, match="torch.float32"):
        decode_sample(raw, BUCKET, TEXT_DIM)


def test_manifest_round_trip_and_load(tmp_path: Path):
    manifest = _manifest([ShardInfo(shard_relpath("demo", BUCKET.name, 0), 3, "0" * 64)])
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert loaded.buckets[0].num_samples == 3 and loaded.text_dim == TEXT_DIM
    assert loaded.bucket(BUCKET.name).latent_shape == BUCKET.latent_shape
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_NAME]  # no temp file left


def test_manifest_version_check_names_both_versions(tmp_path: Path):
    data = json.loads(_manifest([]).to_json())
    data["format_version"] = 2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="format_version 2 found, this reader reads version 1"):
        Manifest.load(tmp_path)


def test_manifest_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ShardFormatError, match="no manifest"):
        Manifest.load(tmp_path)
    data = json.loads(_manifest([ShardInfo("a.tar", 3, "0" * 64)]).to_json())
    data["total_samples"] = 4
    with pytest.raises(ShardFormatError, match="total_samples is 4 but its shards hold 3"):
        Manifest.from_json(json.dumps(data), "m.json")
    data = json.loads(_manifest([]).to_json())
    data["buckets"] = [{**data["buckets"][0], "latent_shape": [16, 2, 8, 16]}]
    with pytest.raises(ShardFormatError, match=r"buckets\[0\]: latent_shape"):
        Manifest.from_json(json.dumps(data), "m.json")
    del data["vae"]
    with pytest.raises(ShardFormatError, match="missing key 'vae'"):
        Manifest.from_json(json.dumps(data), "m.json")


def test_null_text_round_trip(tmp_path: Path):
    text = torch.randn(1, TEXT_DIM)
    save_null_text(tmp_path, text)
    loaded = load_null_text(tmp_path)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, text.bfloat16())
    with pytest.raises(ShardFormatError, match="missing"):
        load_null_text(tmp_path / "elsewhere")


def test_sha256_file(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
