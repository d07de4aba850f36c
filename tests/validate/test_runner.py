"""One validation run on the tiny model: step folder contents, metrics, summaries, LoRA switching, failures."""

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from validate_helpers import FRAMES, SIZE, TEXT_DIM, write_clip_shards, write_config, write_lora

from longcat_dist.config import load_config
from longcat_dist.data.format import load_null_text
from longcat_dist.encoders import build_text_encoder, build_vae, decode_latents, encode_frames
from longcat_dist.validate.gallery import step_dir, write_gallery
from longcat_dist.validate.media import load_start_frame
from longcat_dist.validate.metrics import first_frame_drift
from longcat_dist.validate.queue import ValidationRequest
from longcat_dist.validate.runner import COND_DECODE, START_IMAGE, ValidationRunner, settings_from_config


def test_a_run_writes_videos_sheet_metrics_and_summaries(eval_config):
    runner = ValidationRunner(settings_from_config(eval_config))
    lora_path = write_lora(eval_config, eval_config.output_dir / "lora-4.safetensors", step=4)
    began = time.time()
    report = runner.run(ValidationRequest(4, str(lora_path)))
    runner.close()
    folder = step_dir(eval_config.output_dir, 4)
    assert [s["key"] for s in report["samples"]] == ["clip0", "clip1"]
    for sample in report["samples"]:
        with av.open(str(folder / sample["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
        assert sample["latent_mse"] > 0 and np.isfinite(sample["latent_psnr"])
        # The Wan VAE is causal: decoded frame 0 depends on latent frame 0 alone, which the sampler pins, so
        # against the decoded start latent the drift is zero (it is not when the start frame leaves the latent).
        assert sample["first_frame_mae"] == pytest.approx(0.0, abs=1e-6)
    written = json.loads((folder / "metrics.json").read_text())
    assert written["lora_path"] == str(lora_path) and written["step"] == 4
    assert began <= written["started_at"] <= written["started_at"] + written["seconds"] <= time.time()
    expected_mean = sum(s["latent_mse"] for s in report["samples"]) / 2
    assert written["mean"]["latent_mse"] == pytest.approx(expected_mean)
    # Two rows of 1 start + 4 generated + 4 ground-truth tiles.
    assert Image.open(folder / "contact_sheet.png").width == 9 * (SIZE + 4)
    events = EventAccumulator(str(eval_config.logging_dir / "validation"))
    events.Reload()
    assert events.Scalars("validation/latent_mse")[0].value == pytest.approx(expected_mean, rel=1e-6)
    assert events.Images("validation/video/clip0")[0].step == 4


def test_the_lora_changes_the_samples_and_none_returns_to_the_base(eval_config):
    runner = ValidationRunner(settings_from_config(eval_config))
    item = runner.items[0]
    base = runner.generate(item, 0)
    assert torch.equal(base[:, :1], item.cond_latents.float()), "frame 0 is the eval clip's start frame"
    runner.apply_lora(str(write_lora(eval_config, eval_config.output_dir / "a.safetensors", step=2)))
    tuned = runner.generate(item, 0)
    runner.apply_lora(str(write_lora(eval_config, eval_config.output_dir / "b.safetensors", step=4, seed=1)))
    other = runner.generate(item, 0)
    runner.apply_lora(None)
    assert not torch.allclose(base, tuned, atol=1e-4) and not torch.allclose(tuned, other, atol=1e-4)
    torch.testing.assert_close(runner.generate(item, 0), base)


def test_a_missing_lora_raises_and_the_failure_is_written_for_the_gallery(eval_config):
    runner = ValidationRunner(settings_from_config(eval_config))
    request = ValidationRequest(6, str(eval_config.output_dir / "missing.safetensors"))
    with pytest.raises(FileNotFoundError):
        runner.run(request)
    runner.record_failure(request, "Traceback: FileNotFoundError")
    error = (step_dir(eval_config.output_dir, 6) / "error.txt").read_text()
    assert "missing.safetensors" in error and "FileNotFoundError" in error


def test_the_negative_is_the_shards_null_text_unless_a_negative_prompt_is_set(eval_config, tmp_path):
    default = ValidationRunner(settings_from_config(eval_config))
    null_text = load_null_text(eval_config.dataset(eval_config.eval_dataset_id).cache_dir_vae)  # [1, D]
    assert torch.equal(default.negative_text, null_text)
    # 7 tokens with EOS: within the eval manifest's text length of 8, to which every prompt is padded.
    chosen = ValidationRunner(settings_from_config(
        load_config(write_config(tmp_path, validation_negative_prompt="blurry"))
    ))  # fmt: skip
    prompt_text = build_text_encoder("umt5", tiny=True).encode(["blurry"])[0]  # [7, D]
    assert prompt_text.shape[0] > 1 and torch.equal(chosen.negative_text, prompt_text)
    # The negative reaches the sampler: with CFG (guidance 4) the same clip and noise give other latents.
    item = default.items[0]
    assert not torch.allclose(default.generate(item, 0), chosen.generate(item, 0), atol=1e-4)


def test_prompt_mode_encodes_the_prompt_and_the_start_frame(eval_config, tmp_path):
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(tmp_path / "start.png")
    settings = dataclasses.replace(settings_from_config(eval_config), eval_root=None, prompt="a red ball moves left",
                                   start_frame=tmp_path / "start.png", guidance=1.0)  # fmt: skip
    runner = ValidationRunner(settings)
    (item,) = runner.items
    assert item.cond_latents.shape == (16, 1, SIZE // 8, SIZE // 8) and item.truth is None
    # No shards, so no stored null text: the empty negative prompt is encoded like the prompt.
    assert torch.equal(runner.negative_text, build_text_encoder("umt5", tiny=True).encode([""])[0])
    report = runner.run(ValidationRequest(0, None))
    (sample,) = report["samples"]
    # Against the real start image the drift is the VAE's round-trip error (random tiny VAE: large).
    assert "latent_mse" not in sample and sample["first_frame_mae"] > 0.01
    assert (step_dir(eval_config.output_dir, 0) / "prompt.mp4").is_file()


def _start_image_shards(directory, starts):
    """Eval shards whose cond latents are the tiny VAE's encoding of real start images (None: a missing file)."""
    vae, gen = build_vae(tiny=True), torch.Generator().manual_seed(3)
    videos, sources = [], []
    for index, start in enumerate(starts):
        path = directory / f"start{index}.png"
        if start is None:
            cond = torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=gen)
        else:
            Image.fromarray(start).save(path)
            cond = encode_frames(vae, load_start_frame(path, SIZE, SIZE)[None, :, None])[0]  # [16, 1, h, w]
        videos.append(torch.cat([cond, torch.randn(16, 1, SIZE // 8, SIZE // 8, generator=gen)], dim=1))
        sources.append([str(directory / f"clip{index}.mp4"), str(path)])
    texts = [torch.randn(2, TEXT_DIM, generator=gen) for _ in starts]
    write_clip_shards(directory / "shards" / "val", videos, texts, sources=sources)
    return [Path(s[1]) for s in sources]


def test_dataset_mode_drift_is_against_the_start_image_the_meta_names(tmp_path):
    rng = np.random.default_rng(0)
    # Not the bucket's size or aspect: the image is preprocessed (cover + centre crop) as the builder does.
    starts = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    paths = _start_image_shards(tmp_path, starts)
    runner = ValidationRunner(settings_from_config(load_config(write_config(tmp_path))))
    report = runner.run(ValidationRequest(0, None))
    for index, (item, sample, path) in enumerate(zip(runner.items, report["samples"], paths, strict=True)):
        start = load_start_frame(path, SIZE, SIZE)
        assert torch.equal(item.start_pixels, start)
        assert sample["first_frame_reference"] == START_IMAGE
        frames = decode_latents(runner.vae, runner.generate(item, index)[None])[0]  # [3, F, H, W]
        expected = first_frame_drift(frames, start)
        # The VAE round trip of the image: far from 0 with the tiny random VAE.
        assert sample["first_frame_mae"] == expected["first_frame_mae"] and sample["first_frame_mae"] > 0.01
        assert sample["first_frame_psnr"] == expected["first_frame_psnr"]
        assert math.isfinite(sample["first_frame_psnr"])


def test_without_a_readable_start_image_the_drift_says_it_is_against_the_cond_decode(tmp_path, caplog):
    paths = _start_image_shards(tmp_path, [None, np.full((32, 32, 3), 7, np.uint8)])
    paths[1].write_text("not an image")
    caplog.set_level(logging.INFO, logger="longcat_dist.validate.eval_set")
    cfg = load_config(write_config(tmp_path))
    runner = ValidationRunner(settings_from_config(cfg))
    report = runner.run(ValidationRequest(0, None))
    assert [s["first_frame_reference"] for s in report["samples"]] == [COND_DECODE, COND_DECODE]
    assert all(item.start_pixels is None for item in runner.items)
    (message,) = [r.getMessage() for r in caplog.records if "VAE decode of the cond latent" in r.getMessage()]
    assert all(f"start frame {path}: not a readable image" in message for path in paths)
    written = json.loads((step_dir(cfg.output_dir, 0) / "metrics.json").read_text())
    # Frame 0 is the cond latent decoded: the drift is 0, its PSNR infinite, which strict JSON writes as null.
    assert written["mean"]["first_frame_mae"] == 0.0 and written["mean"]["first_frame_psnr"] is None
    for sample in written["samples"]:
        assert sample["first_frame_reference"] == COND_DECODE
        assert sample["first_frame_mae"] == 0.0 and sample["first_frame_psnr"] is None
    assert "first_frame_mae=" in write_gallery(cfg.output_dir).read_text()
