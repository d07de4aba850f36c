"""The I2V flow step on the tiny DiT: what the model is given (noisy latents, timesteps, texts), what the loss covers,
and that a step trains LoRA on the FFN and caption-projection Linears too."""

import pytest
import torch
from torch import nn
from train_helpers import TINY_TEXT_DIM

from longcat_dist import flow
from longcat_dist.data.stream import Batch
from longcat_dist.model import lora
from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel
from longcat_dist.train import engine as ds
from longcat_dist.train.step import FlowSettings, flow_loss

LATENT = (16, 2, 2, 2)  # [C, T, h, w]: the tiny shards' bucket (5 frames of 16 x 16 pixels)
TEXT_LENGTH = 8
# Seed 5 at caption dropout 0.5 drops the captions of the middle two of these four keys and keeps the others.
KEYS = ["tiny/s00000", "tiny/s00001", "tiny/s00002", "tiny/s00003"]
SETTINGS = FlowSettings(seed=5, shift=12.0, caption_dropout_probability=0.5, text_length=TEXT_LENGTH)


class RecordingDiT(nn.Module):
    """The tiny DiT, recording its inputs and its prediction; `offsets` {latent frame: value} are added to it."""

    def __init__(self, dit: nn.Module, offsets: dict[int, float] | None = None) -> None:
        super().__init__()
        self.dit, self.offsets, self.calls = dit, offsets or {}, []

    def forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents
    ):
        pred = self.dit(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                        num_cond_latents=num_cond_latents).clone()  # fmt: skip
        for frame, value in self.offsets.items():
            pred[:, :, frame] += value
        self.calls.append(dict(noisy=hidden_states, timesteps=timestep, text=encoder_hidden_states,
                               mask=encoder_attention_mask, num_cond=num_cond_latents, pred=pred.detach()))  # fmt: skip
        return pred


def _tiny_dit() -> nn.Module:
    torch.manual_seed(0)
    return LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).eval()


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(len(KEYS), *LATENT, generator=gen).bfloat16()  # [B, 16, T, h, w]
    # A start-frame latent unlike the clip's frame 0, so that the test sees which of the two is the model's input.
    cond = torch.randn(len(KEYS), LATENT[0], 1, *LATENT[2:], generator=gen).bfloat16()  # [B, 16, 1, h, w]
    texts = [torch.randn(1 + i, TINY_TEXT_DIM, generator=gen).bfloat16() for i in range(len(KEYS))]
    return Batch(keys=KEYS, group="tiny/b", video=video, cond=cond, texts=texts)


NULL_TEXT = torch.full((1, TINY_TEXT_DIM), 0.5).bfloat16()


def _loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    return flow_loss(model, batch, epoch=0, settings=SETTINGS, null_texts={"tiny": NULL_TEXT},
                     device=torch.device("cpu"))  # fmt: skip


def test_flow_loss_feeds_the_dit_the_i2v_inputs():
    batch, model = _batch(), RecordingDiT(_tiny_dit())
    with torch.no_grad():
        _, tokens = _loss(model, batch)
    (call,) = model.calls
    draws = flow.draw_batch(
        SETTINGS.seed, KEYS, 0, LATENT, shift=SETTINGS.shift, caption_dropout_probability=0.5
    )
    assert draws.drop_caption.tolist() == [False, True, True, False]  # the premise of KEYS: both cases occur
    sig = draws.sigmas.view(-1, 1, 1, 1, 1)
    # Frame 0 is the clean start-frame latent, the other frames (1 - sigma) x0 + sigma eps.
    assert torch.equal(call["noisy"][:, :, :1], batch.cond.float())
    noised = (1 - sig) * batch.video.float() + sig * draws.noise
    torch.testing.assert_close(call["noisy"][:, :, 1:], noised[:, :, 1:])
    # Timesteps per latent frame: 0 for the cond frame, 1000 sigma for the noise frames.
    assert call["timesteps"].shape == (len(KEYS), LATENT[1]) and call["num_cond"] == 1
    assert torch.equal(call["timesteps"][:, 0], torch.zeros(len(KEYS)))
    torch.testing.assert_close(
        call["timesteps"][:, 1:], 1000 * draws.sigmas.view(-1, 1).expand(-1, LATENT[1] - 1)
    )
    # Texts padded to the encoder's max_length; the dropped captions are the dataset's empty-prompt embedding.
    assert call["text"].shape == (len(KEYS), 1, TEXT_LENGTH, TINY_TEXT_DIM)
    for i, dropped in enumerate(draws.drop_caption.tolist()):
        expected = NULL_TEXT if dropped else batch.texts[i]
        assert torch.equal(call["text"][i, 0, : len(expected)], expected), i
        assert not call["text"][i, 0, len(expected) :].any() and call["mask"][i].sum() == len(expected)
    assert tokens == len(KEYS) * LATENT[1] * LATENT[2] * LATENT[3] // 4


def test_flow_loss_covers_the_noise_frames_only():
    batch, dit = _batch(), _tiny_dit()
    plain, cond_moved, noise_moved = (
        RecordingDiT(dit),
        RecordingDiT(dit, {0: 5.0}),
        RecordingDiT(dit, {1: 5.0}),
    )
    with torch.no_grad():
        loss = _loss(plain, batch)[0]
        assert torch.equal(_loss(cond_moved, batch)[0], loss)  # the cond frame's prediction is not trained
        assert _loss(noise_moved, batch)[0] > loss + 1.0
    draws = flow.draw_batch(
        SETTINGS.seed, KEYS, 0, LATENT, shift=SETTINGS.shift, caption_dropout_probability=0.5
    )
    target = batch.video.float() - draws.noise  # x0 - eps
    expected = (plain.calls[0]["pred"][:, :, 1:] - target[:, :, 1:]).pow(2).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.integration
def test_lora_on_ffn_and_caption_projection_trains(gloo_process_group):
    targets = ("ffn.w1", "ffn.w2", "ffn.w3", "y_embedder")
    dit = _tiny_dit().train()
    torch.manual_seed(1)
    lora.inject_lora(dit, rank=4, alpha=4, targets=targets, dropout=0.0)
    wrapped = {name.rsplit(".lora_", 1)[0] for name, _ in dit.named_parameters() if ".lora_" in name}
    for block in range(TINY_DIT["depth"]):
        assert {f"blocks.{block}.ffn.w{i}" for i in (1, 2, 3)} <= wrapped, sorted(wrapped)
    assert any(name.startswith("y_embedder.") for name in wrapped)
    assert all(
        any(name.startswith(w) for w in wrapped) for name, p in dit.named_parameters() if p.requires_grad
    )
    before = {name: p.detach().clone() for name, p in dit.named_parameters() if p.requires_grad}
    config = ds.deepspeed_config(ds.CONFIG_DIR / "zero2.json", zero_stage=2, micro_batch_size=len(KEYS),
                                 gradient_accumulation_steps=1, world_size=1, max_grad_norm=1.0, learning_rate=1e-2,
                                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # fmt: skip
    engine = ds.build_engine(dit, config)
    stepper = ds.GuardedStepper(engine, max_nonfinite_in_row=1)
    for _ in range(2):  # lora_B starts at zero: lora_A gets a gradient from the second step on
        assert stepper(_loss(engine, _batch())[0], lr=1e-2).stepped
    moved = {
        name for name, p in dit.named_parameters() if p.requires_grad and not torch.equal(p, before[name])
    }
    assert moved == set(before), sorted(set(before) - moved)
