"""End to end on CPU: a LoRA trained on a clip makes validation reproduce that clip better than the base does."""

import torch
from validate_helpers import FRAMES, SIZE, write_clip_shards, write_config

from longcat_dist.config import load_config
from longcat_dist.encoders import build_text_encoder, build_vae, encode_frames
from longcat_dist.flow import flow_target, frame_timesteps, noise_frame_loss, noise_latents, shift_sigmas
from longcat_dist.model import lora
from longcat_dist.validate.queue import ValidationRequest
from longcat_dist.validate.runner import ValidationRunner, build_base_model, settings_from_config
from longcat_dist.validate.sampler import pad_text

CAPTION = "a red square moves right"
TRAIN_STEPS = 40
LEARNING_RATE = 1e-2  # high for LoRA, so that a few dozen steps on one clip show
TEXT_LENGTH = 8  # pad length recorded in the eval manifest; the prompt has 6 tokens with EOS


def _moving_square() -> torch.Tensor:
    """A red square sliding right on a dark background: [1, 3, F, H, W] in [-1, 1]."""
    frames = torch.full((1, 3, FRAMES, SIZE, SIZE), -0.8)
    for f in range(FRAMES):
        frames[0, :, f, 8:20, 2 + 4 * f : 14 + 4 * f] = torch.tensor([0.9, -0.9, -0.9]).view(3, 1, 1)
    return frames


def _encoded_clip():
    """The clip's latents [16, T, h, w] and its prompt embedding, made by the (tiny) encoders."""
    video = encode_frames(build_vae(tiny=True), _moving_square())[0]
    encoder = build_text_encoder("umt5", tiny=True)
    text, null_text = encoder.encode([CAPTION, ""])
    return video, text, null_text


def _train_lora(cfg, video, text, path):
    """Plain-torch Adam on the flow-matching loss of the one clip, as the training step computes it."""
    model = build_base_model(settings_from_config(cfg), torch.device("cpu")).train()
    lora.inject_lora(model, rank=4, alpha=4.0, targets=cfg.lora_targets)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    embeds, mask = pad_text([text], TEXT_LENGTH)  # as validation pads it
    x0 = video[None].float()  # [1, 16, T, h, w]
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(TRAIN_STEPS):
        sigmas = shift_sigmas(torch.rand(1, generator=gen), cfg.flow_schedule_shift)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = noise_latents(x0, x0[:, :, :1], sigmas, noise)
        pred = model(noisy, frame_timesteps(sigmas, x0.shape[2]), embeds, mask, num_cond_latents=1)
        loss = noise_frame_loss(pred, flow_target(x0, noise))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    lora.export_lora(model, path, metadata={"base_model": "tiny-random-dit", "step": TRAIN_STEPS})
    return losses


def test_validation_latent_mse_drops_after_training(tmp_path):
    config = write_config(tmp_path, validation_guidance=1.0, validation_num_inference_steps=10)
    cfg = load_config(config)
    video, text, null_text = _encoded_clip()
    shards = tmp_path / "shards" / "val"
    write_clip_shards(shards, [video], [text], null_text=null_text, max_length=TEXT_LENGTH)
    runner = ValidationRunner(settings_from_config(cfg))
    before = runner.run(ValidationRequest(0, None))["mean"]["latent_mse"]
    lora_path = tmp_path / "lora.safetensors"
    losses = _train_lora(cfg, video, text, lora_path)
    after = runner.run(ValidationRequest(TRAIN_STEPS, str(lora_path)))["mean"]["latent_mse"]
    runner.close()
    assert sum(losses[-10:]) < sum(losses[:10]), f"training did not reduce its loss: {losses}"
    # Seeded throughout: 1.42 -> 1.03 here; the margin leaves room for other float summation orders.
    assert after < 0.85 * before, f"validation latent MSE {before:.4f} -> {after:.4f}: the LoRA did not help"
