"""End to end on the tiny demo data: build, verify, resume, interrupted writes, Ray Data, inspect --sample."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds

from longcat_dist.data.format import Manifest, decode_sample, load_null_text
from longcat_dist.data.pixels import read_image
from sharding.build import BuildOptions, DatasetSpec, build_dataset, build_params
from sharding.cli import main
from sharding.demo_data import DEMO_FRAMES, TRAIN_ID, VAL_ID, make_demo_data
from sharding.encode import Encoders, EncoderSpec
from sharding.media import read_video
from sharding.verify import verify

TINY = BuildOptions(EncoderSpec(tiny=True), samples_per_shard=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo data (6 train + 2 val clips) built once, in-process, 2 samples per shard."""
    root = tmp_path_factory.mktemp("demo")
    config = make_demo_data(root, train=6, val=2)
    assert main(["build", "--config", str(config), "--tiny", "--local", "--samples-per-shard", "2"]) == 0
    return root


def _train_spec(root: Path) -> DatasetSpec:
    return DatasetSpec(TRAIN_ID, root / "train" / "clips", root / "train" / "start_frames",
                       root / "cache" / TRAIN_ID, resolution=64, frames=DEMO_FRAMES)  # fmt: skip


def test_build_writes_verifiable_shards(demo: Path):
    root = demo / "cache" / TRAIN_ID
    assert verify(root) == []
    manifest = Manifest.load(root)
    assert manifest.total_samples == 6 and [b.name for b in manifest.buckets] == ["64x128x9", "64x64x9"]
    assert [b.num_samples for b in manifest.buckets] == [2, 4] and len(manifest.buckets[1].shards) == 2
    assert load_null_text(root).shape == (1, manifest.text_dim)  # "" is EOS only
    bucket = manifest.buckets[0]
    raws = list(wds.tarfile_samples([{"url": str(root / bucket.shards[0].path)}]))
    sample = decode_sample(raws[0], bucket, manifest.text_dim)
    assert sample.video.shape == (16, 3, 8, 16) and sample.cond.shape == (16, 1, 8, 16)
    caption_file = Path(sample.meta["sources"][0]).with_suffix(".txt")
    assert sample.meta["caption"] == caption_file.read_text().strip()
    assert (
        sample.meta["frames"] == DEMO_FRAMES
        and sample.meta["fps"] == 8.0
        and sample.meta["size"] == [64, 128]
    )
    assert sample.text.shape[0] == len(sample.meta["caption"].split()) + 1  # unpadded: words + EOS
    assert Manifest.load(demo / "cache" / VAL_ID).total_samples == 2
    assert manifest.build == {"resolution": 64, "frames": DEMO_FRAMES, "min_frames": DEMO_FRAMES, "alignment": 64,
                              "caption_strategy": "textfile", "instance_prompt": None}  # fmt: skip


def test_latents_match_a_direct_encode(demo: Path):
    root = demo / "cache" / TRAIN_ID
    manifest = Manifest.load(root)
    bucket = manifest.buckets[0]
    raw = next(iter(wds.tarfile_samples([{"url": str(root / bucket.shards[0].path)}])))
    sample = decode_sample(raw, bucket, manifest.text_dim)
    clip = {"clip": sample.meta["sources"][0], "start_frame": sample.meta["sources"][1], "frames": DEMO_FRAMES,
            "bucket_size": [bucket.height, bucket.width]}  # fmt: skip
    video, cond = Encoders(EncoderSpec(tiny=True)).encode_clip(clip)
    assert (video.bfloat16() == sample.video).all() and (cond.bfloat16() == sample.cond).all()


def test_rerun_reuses_finished_shards_and_rebuilds_a_missing_one(demo: Path):
    root = demo / "cache" / TRAIN_ID
    before = json.loads((root / "manifest.json").read_text())
    summary = build_dataset(_train_spec(demo), TINY)
    assert summary.reused_shards == summary.shards == 3
    lost = root / before["buckets"][1]["shards"][1]["path"]
    lost.unlink()
    summary = build_dataset(_train_spec(demo), TINY)
    assert summary.reused_shards == 2 and lost.is_file()
    assert json.loads((root / "manifest.json").read_text()) == before  # deterministic: same sha256 again
    assert verify(root) == []


def test_interrupted_build_leaves_no_partial_shard(demo: Path, tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(demo / "train", data)
    spec = DatasetSpec(
        "cut", data / "clips", data / "start_frames", tmp_path / "out", resolution=64, frames=9
    )
    calls = {"n": 0}
    real = Encoders.encode_clip

    def dies_on_the_third_clip(self, clip):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like mid-shard
        return real(self, clip)

    monkeypatch.setattr(Encoders, "encode_clip", dies_on_the_third_clip)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(spec, TINY)
    tars = sorted(p.name for p in (tmp_path / "out").rglob("*.tar"))
    assert tars == ["cut-64x128x9-000000.tar"]  # the shard that finished; the cut one is not visible
    assert not list((tmp_path / "out").rglob("*.tmp")) and not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(Encoders, "encode_clip", real)
    summary = build_dataset(spec, TINY)
    assert summary.reused_shards == 1 and summary.samples == 6 and verify(tmp_path / "out") == []


def test_next_build_removes_the_temp_files_a_hard_kill_left(demo: Path, tmp_path: Path):
    shutil.copytree(demo, tmp_path / "demo")
    root = tmp_path / "demo" / "cache" / TRAIN_ID
    tar = root / Manifest.load(root).buckets[0].shards[0].path
    # What a SIGKILL mid-write leaves: the `.<name>.<pid>.tmp` of a shard, its sidecar, the manifest, the null text.
    leftovers = [tar.with_name(f".{tar.name}.4242.tmp"), tar.with_name(f".{tar.name}.json.4242.tmp"),
                 root / ".manifest.json.4242.tmp", root / ".null_text.safetensors.4242.tmp"]  # fmt: skip
    for leftover in leftovers:
        leftover.write_bytes(tar.read_bytes()[:1000])  # half a shard
    summary = build_dataset(_train_spec(tmp_path / "demo"), TINY)
    assert summary.reused_shards == summary.shards == 3
    assert [p for p in leftovers if p.exists()] == [] and not list(root.rglob("*.tmp"))
    assert verify(root) == []


def test_config_build_refuses_a_wrong_root_before_building_any_dataset(demo: Path, tmp_path: Path, capsys):
    data = tmp_path / "demo"
    shutil.copytree(demo, data)
    shutil.rmtree(data / "cache" / TRAIN_ID)  # the config builds train first, then val
    val_root = data / "cache" / VAL_ID
    val_manifest = val_root / "manifest.json"
    recorded = json.loads(val_manifest.read_text())
    recorded["build"]["frames"] = 5
    val_manifest.write_text(json.dumps(recorded))
    assert main(["build", "--config", str(data / "multidatabackend.json"), "--tiny", "--local"]) == 2
    err = capsys.readouterr().err
    assert f"{val_root} already holds a different manifest: build.frames is 5 there, 9 in this build" in err
    assert not (data / "cache" / TRAIN_ID).exists()


def test_a_manifest_without_build_params_still_resumes(demo: Path, tmp_path: Path, caplog):
    root = tmp_path / "root"
    shutil.copytree(demo / "cache" / TRAIN_ID, root)
    recorded = json.loads((root / "manifest.json").read_text())
    del recorded["build"]
    (root / "manifest.json").write_text(json.dumps(recorded))
    assert Manifest.load(root).build == {}
    spec = replace(_train_spec(demo), out_root=root)
    summary = build_dataset(spec, TINY)
    assert summary.reused_shards == summary.shards == 3
    assert "does not record ['build.alignment', 'build.caption_strategy'" in caplog.text
    assert Manifest.load(root).build == build_params(spec)  # recorded from now on


def test_verify_reports_a_corrupted_shard(demo: Path, tmp_path: Path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(demo / "cache" / VAL_ID, root)
    tar = next(root.rglob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:-2048])  # cut the tail off
    (root / "stray").mkdir()
    (root / "stray" / "x.tar").write_bytes(b"")
    assert main(["verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert "sha256 differs" in err and "stray/x.tar: shard not listed" in err


def test_inspect_and_render_a_sample(demo: Path, tmp_path: Path, capsys):
    root = demo / "cache" / TRAIN_ID
    key = "train_000"
    assert main(["inspect", str(root), "--sample", key, "--tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "caption words min 5" in out
    # [16, T, h, w] of 9 frames at 64x128 and at 64x64
    shapes = {"64x128x9": [16, 3, 8, 16], "64x64x9": [16, 3, 8, 8]}
    for bucket in Manifest.load(root).buckets:
        mib = sum((root / shard.path).stat().st_size for shard in bucket.shards) / 2**20
        assert mib >= 0.01  # so that the printed size is not a rounded-away 0.00
        line = f"  {bucket.name}: {bucket.num_samples} samples in {len(bucket.shards)} shards, latents "
        assert f"{line}{shapes[bucket.name]}, {mib:.2f} MiB; caption words" in out
    frames, fps = read_video(tmp_path / f"{key}.mp4")
    assert frames.shape == (DEMO_FRAMES, 64, 128, 3) and fps == 8.0
    sheet = read_image(tmp_path / f"{key}.png")  # cond frame + 9 frames, 8 per row
    assert sheet.shape == (2 * 64, 8 * 128, 3)


@pytest.mark.integration
def test_ray_data_build_matches_the_local_build(demo: Path, tmp_path: Path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        spec = DatasetSpec(TRAIN_ID, demo / "train" / "clips", demo / "train" / "start_frames", tmp_path / "ray",
                           resolution=64, frames=DEMO_FRAMES)  # fmt: skip
        options = BuildOptions(
            EncoderSpec(tiny=True), samples_per_shard=2, num_encode_workers=2, use_ray=True
        )
        summary = build_dataset(spec, options)
    finally:
        ray.shutdown()
    assert summary.samples == 6 and summary.reused_shards == 0
    assert verify(tmp_path / "ray") == []
    local = Manifest.load(demo / "cache" / TRAIN_ID)
    assert Manifest.load(tmp_path / "ray").buckets == local.buckets  # same shards, byte for byte
