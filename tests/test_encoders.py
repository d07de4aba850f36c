"""Encoders: tiny Wan VAE round trip and normalization, tiny umT5 / Qwen text features, loading from local dirs."""

import logging
from pathlib import Path

import pytest
import torch

from longcat_dist.encoders import (
    TINY_TEXT_DIM,
    build_text_encoder,
    build_vae,
    clean_prompt,
    decode_latents,
    encode_frames,
    latent_stats,
    vae_fingerprint,
)

SPEC_MEAN_0, SPEC_STD_15 = -0.7571, 1.9160  # spec §4.2, first mean and last std


@pytest.fixture(scope="module")
def vae():
    return build_vae(tiny=True)


@pytest.fixture(scope="module")
def umt5():
    return build_text_encoder("umt5", tiny=True)


def _frames(num_frames: int = 9, height: int = 64, width: int = 128, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, num_frames, height, width, generator=g) * 2 - 1  # [B, 3, F, H, W]


def test_tiny_vae_is_deterministic(vae):
    again = build_vae(tiny=True)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))


def test_encode_decode_round_trip_shapes_and_range(vae):
    frames = _frames()
    latents = encode_frames(vae, frames)
    assert latents.shape == (1, 16, 3, 8, 16) and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    decoded = decode_latents(vae, latents)
    assert decoded.shape == frames.shape
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0
    # The causal VAE encodes frame 0 alone, so a start frame encoded as a one-frame video matches latent 0.
    start = encode_frames(vae, frames[:, :, :1])
    assert start.shape == (1, 16, 1, 8, 16)
    torch.testing.assert_close(start, latents[:, :, :1], atol=1e-4, rtol=1e-4)


def test_frame_rule_is_checked(vae):
    with pytest.raises(ValueError, match=r"8 frames.*\(frames - 1\) % 4 == 0"):
        encode_frames(vae, _frames(num_frames=8))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        encode_frames(vae, _frames()[0])


def test_normalization_uses_the_config_mean_and_std():
    vae = build_vae(tiny=True)
    mean, std = latent_stats(vae)
    assert mean[0].item() == pytest.approx(SPEC_MEAN_0) and std[15].item() == pytest.approx(SPEC_STD_15)
    vae.register_to_config(latents_mean=[float(c) for c in range(16)], latents_std=[2.0] * 16)
    frames = _frames(num_frames=5, width=64)
    raw = vae.encode(frames).latent_dist.mode()  # [1, 16, 2, 8, 8]
    expected = (raw - torch.arange(16.0).view(1, 16, 1, 1, 1)) / 2.0
    torch.testing.assert_close(encode_frames(vae, frames), expected)
    # decode undoes exactly that normalization
    torch.testing.assert_close(decode_latents(vae, expected), vae.decode(raw).sample.clamp(-1, 1))
    assert vae_fingerprint(vae)["latents_mean"] == [float(c) for c in range(16)]


def test_posterior_sampling_follows_the_generator(vae):
    frames = _frames(num_frames=1, width=64)
    a = encode_frames(vae, frames, sample=True, generator=torch.Generator().manual_seed(3))
    b = encode_frames(vae, frames, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, encode_frames(vae, frames))


def test_vae_loads_from_a_checkpoint_root(vae, tmp_path: Path):
    vae.save_pretrained(str(tmp_path / "vae"))
    loaded = build_vae(tmp_path)  # the checkpoint root: vae/ below it
    assert vae_fingerprint(loaded) == vae_fingerprint(vae)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_vae(tmp_path / "missing")
    with pytest.raises(ValueError, match="tiny=True"):
        build_vae()


def test_clean_prompt_follows_the_official_rules():
    assert clean_prompt("  a &amp;amp; b\n\n\t c  ") == "a & b c"


def test_umt5_embeddings_are_unpadded(umt5):
    empty, caption, other = umt5.encode(["", "a red square moves left", "a blue circle moves up slowly"])
    assert umt5.dim == TINY_TEXT_DIM and umt5.info()["dim"] == TINY_TEXT_DIM
    assert empty.shape == (1, TINY_TEXT_DIM)  # EOS only: 1 valid token, not a zero tensor
    assert empty.abs().sum() > 0
    assert caption.shape == (6, TINY_TEXT_DIM) and other.shape == (7, TINY_TEXT_DIM)  # 5 words + EOS, 6 + EOS
    assert caption.dtype == torch.bfloat16
    # Padding is masked out, so a prompt's embedding does not depend on the batch it was encoded with.
    (alone,) = umt5.encode(["a red square moves left"])
    assert torch.equal(alone, caption)


def test_unknown_words_fall_back_to_letters_and_truncate(umt5):
    (emb,) = umt5.encode(["zyx"])
    assert emb.shape[0] == 4  # z ##y ##x </s>
    (long,) = umt5.encode(["red " * 500])
    assert long.shape[0] == umt5.max_length


def test_umt5_loads_from_a_checkpoint_root(umt5, tmp_path: Path):
    umt5.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    umt5.model.save_pretrained(str(tmp_path / "text_encoder"))
    loaded = build_text_encoder("umt5", tmp_path)
    assert loaded.name == "umt5" and loaded.max_length == 512 and loaded.dim == TINY_TEXT_DIM
    (ours,), (theirs,) = umt5.encode(["a red square"]), loaded.encode(["a red square"])
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs.float(), ours.float(), atol=0.1, rtol=0.05)  # bf16 weights when loaded


def test_qwen_option_warns_and_gives_unpadded_features(caplog):
    with caplog.at_level(logging.WARNING, logger="longcat_dist.encoders"):
        qwen = build_text_encoder("qwen2.5-vl", tiny=True)
    assert "trained on umT5 features" in caplog.text
    empty, caption = qwen.encode(["", "a red square moves left"])
    assert empty.shape == (1, TINY_TEXT_DIM) and caption.shape == (6, TINY_TEXT_DIM)


def test_unknown_kind_and_missing_path_are_errors():
    with pytest.raises(ValueError, match="'t5-xl'"):
        build_text_encoder("t5-xl", tiny=True)
    with pytest.raises(ValueError, match="--text-encoder-path"):
        build_text_encoder("umt5")
