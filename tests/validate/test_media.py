"""MP4 files, contact sheets, TensorBoard summaries and the HTML gallery, read back independently."""

import io
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from longcat_dist.encoders import encode_frames
from longcat_dist.validate.gallery import METRICS_FILE, step_dir, write_gallery
from longcat_dist.validate.media import (
    contact_row,
    contact_sheet,
    frames_to_uint8,
    gif_bytes,
    load_start_frame,
    pick_frames,
    write_mp4,
)
from longcat_dist.validate.summaries import ValidationSummaries
from sharding import encode
from sharding.media import write_video


def _moving_square(frames=9, height=32, width=48):
    video = torch.full((3, frames, height, width), -1.0)
    for f in range(frames):
        video[:, f, 8:16, 4 * f : 4 * f + 8] = 1.0
    return video


def test_frames_to_uint8_maps_the_pixel_range():
    pixels = frames_to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4))
    assert pixels.shape == (1, 1, 4, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_mp4_opens_with_pyav_with_the_right_frame_count_and_size(tmp_path):
    frames = frames_to_uint8(_moving_square())
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=15)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(decoded) == 9
    assert decoded[0].shape == (32, 48, 3)
    # Lossy, but the square must be where we drew it.
    assert decoded[4][12, 20].mean() > 200 and decoded[4][12, 40].mean() < 60


def test_mp4_rejects_odd_sizes_with_the_path(tmp_path):
    with pytest.raises(ValueError, match="odd.mp4.*even"):
        write_mp4(np.zeros((2, 31, 48, 3), np.uint8), tmp_path / "odd.mp4")


def test_pick_frames_spans_first_to_last():
    assert pick_frames(93, 4) == [0, 31, 61, 92]
    assert pick_frames(3, 4) == [0, 1, 2]


def test_contact_sheet_holds_start_generated_and_truth(tmp_path):
    frames = frames_to_uint8(_moving_square())
    row = contact_row(frames[0], frames, frames, count=4)
    rows = contact_sheet([row, contact_row(frames[0], frames, None, count=4)])
    # 1 start + 4 generated + 4 truth tiles of 48 px plus gaps; two rows.
    assert row.width == 9 * (48 + 4) and rows.height > 2 * 32
    rows.save(tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size == rows.size


def test_tensorboard_summaries_read_back(tmp_path):
    summaries = ValidationSummaries(tmp_path / "tb")
    frames = frames_to_uint8(_moving_square())
    summaries.scalars(7, {"validation/latent_mse": 0.25})
    summaries.video(7, "validation/video/a", frames)
    summaries.image(7, "validation/contact_sheet", Image.fromarray(frames[0]))
    summaries.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Scalars("validation/latent_mse")[0].value == pytest.approx(0.25)
    video = events.Images("validation/video/a")[0]
    assert video.step == 7 and video.encoded_image_string[:6] == b"GIF89a"
    assert events.Images("validation/contact_sheet")[0].encoded_image_string[:4] == b"\x89PNG"


def _fake_step(output_dir, step, keys):
    folder = step_dir(output_dir, step)
    folder.mkdir(parents=True)
    samples = []
    for key in keys:
        (folder / f"{key}.mp4").write_bytes(b"")
        samples.append({"key": key, "caption": f"a <b>{key}</b>", "video": f"{key}.mp4", "latent_mse": 0.5})
    (folder / METRICS_FILE).write_text(json.dumps({"step": step, "samples": samples}))


def test_gallery_shows_every_step_side_by_side_with_relative_links(tmp_path):
    _fake_step(tmp_path, 10, ["s0", "s1"])
    _fake_step(tmp_path, 20, ["s0", "s1"])
    failed = step_dir(tmp_path, 30)
    failed.mkdir(parents=True)
    (failed / "error.txt").write_text("Traceback ...")
    page = write_gallery(tmp_path).read_text()
    assert page.count("<video") == 4
    assert 'src="validation/step_0000010/s0.mp4"' in page and 'src="validation/step_0000020/s1.mp4"' in page
    assert str(tmp_path) not in page, "links must be relative"
    assert "a &lt;b&gt;s0&lt;/b&gt;" in page, "captions must be escaped"
    assert "Failed validation steps (see error.txt): 30" in page
    assert page.index("step 10") < page.index("step 20")


def test_start_frame_is_resized_to_cover_and_centre_cropped(tmp_path):
    # A 200x100 image: left half black, right half white, with a red middle column band.
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 100:] = 255
    pixels[:, 90:110] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "start.png")
    frame = load_start_frame(tmp_path / "start.png", 32, 32)
    assert frame.shape == (3, 32, 32) and frame.min() >= -1.0 and frame.max() <= 1.0
    # Scaled to 64x32 then the middle 32 columns kept: the red band spans the centre, black/white at the edges.
    assert frame[:, 16, 16].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.1)
    assert frame[:, 16, 1].mean() < -0.8 and frame[:, 16, 30].mean() > 0.8


def test_start_frame_rejects_a_non_image_with_the_path(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        load_start_frame(tmp_path / "notes.png", 32, 32)


def test_tensorboard_gifs_are_shrunk_to_a_preview_width():
    frames = np.zeros((3, 60, 400, 3), np.uint8)
    frames[1], frames[2] = 120, 255  # distinct frames (the GIF writer merges identical ones)
    with Image.open(io.BytesIO(gif_bytes(frames, max_width=100))) as gif:
        assert gif.size == (100, 15) and gif.n_frames == 3


def test_start_frame_is_the_tensor_the_shard_builder_encodes(tmp_path, monkeypatch):
    # A start image of neither the bucket's size nor its aspect, so the cover resize and the crop both act.
    start = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    Image.fromarray(start).save(tmp_path / "start.png")
    write_video(tmp_path / "clip.mp4", torch.zeros(5, 32, 64, 3, dtype=torch.uint8), 8.0)
    encoded = []

    def spy(vae, pixels, **kwargs):
        encoded.append(pixels)  # [1, 3, F, H, W]
        return encode_frames(vae, pixels, **kwargs)

    monkeypatch.setattr(encode, "encode_frames", spy)
    clip = {"bucket_size": [32, 64], "clip": str(tmp_path / "clip.mp4"), "frames": 5,
            "start_frame": str(tmp_path / "start.png")}  # fmt: skip
    encode.Encoders(encode.EncoderSpec(tiny=True)).encode_clip(clip)
    builder_start = encoded[1][0, :, 0]  # the clip first, then the start frame
    assert torch.equal(load_start_frame(tmp_path / "start.png", 32, 64), builder_start)
