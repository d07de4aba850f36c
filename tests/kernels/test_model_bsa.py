"""The DiT's attention dispatch runs the block-sparse kernel (Triton interpreter on CPU, CUDA on GPU)."""

from __future__ import annotations

import pytest
import torch

from longcat_dist.model.attention import BSAParams
from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model_and_inputs():
    torch.manual_seed(0)
    config = DiTConfig(
        hidden_size=64,
        depth=1,
        num_heads=2,
        caption_channels=32,
        adaln_tembed_dim=32,
        frequency_embedding_size=64,
    )
    model = LongCatVideoTransformer3DModel(config).to(DEVICE, torch.bfloat16).eval()
    latents = torch.randn(1, 16, 4, 8, 16, device=DEVICE)  # token grid (4, 4, 8): 8 blocks of (1, 4, 4)
    timesteps = torch.tensor([[0.0, 400.0, 400.0, 400.0]], device=DEVICE)
    text = torch.randn(1, 1, 5, 32, device=DEVICE)
    return model, (latents, timesteps, text)


def test_bsa_keeping_every_block_equals_dense_attention():
    model, args = _model_and_inputs()
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        dense = model(*args, num_cond_latents=1)
        model.set_attention_backend("bsa", BSAParams(sparsity=0.0, chunk_shape=(1, 4, 4)))
        sparse = model(*args, num_cond_latents=1)
    torch.testing.assert_close(sparse, dense, rtol=3e-2, atol=3e-2)


def test_bsa_at_high_sparsity_changes_the_output_and_keeps_cond_frames_exact_in_structure():
    model, args = _model_and_inputs()
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        dense = model(*args, num_cond_latents=1)
        model.set_attention_backend("bsa", BSAParams(sparsity=0.75, chunk_shape=(1, 4, 4)))
        sparse = model(*args, num_cond_latents=1)
    assert torch.isfinite(sparse).all()
    assert (sparse[:, :, 1:] - dense[:, :, 1:]).abs().max() > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_auto_stays_dense_on_cpu():
    model, args = _model_and_inputs()
    with torch.no_grad():
        model.set_attention_backend("auto")
        auto = model(*args, num_cond_latents=1)
        model.set_attention_backend("sdpa")
        dense = model(*args, num_cond_latents=1)
    assert torch.equal(auto, dense)


def test_bsa_gradients_through_the_model_match_dense_attention():
    # v reaches the kernel as a strided view of the fused qkv projection: its gradient must land in place.
    model, args = _model_and_inputs()
    model.train()
    grads = {}
    for backend, bsa in (("sdpa", None), ("bsa", BSAParams(sparsity=0.0, chunk_shape=(1, 4, 4)))):
        model.zero_grad(set_to_none=True)
        model.set_attention_backend(backend, bsa)
        model(*args, num_cond_latents=1).float().square().mean().backward()
        grads[backend] = model.blocks[0].attn.qkv.weight.grad.float().clone()
    err = (grads["bsa"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
    assert err < 5e-2, f"relative gradient error {err:.3e}"


def test_checkpoint_keeps_the_bsa_selection_and_with_save_attention_its_output(monkeypatch):
    """Under activation checkpointing the recompute takes the block selection from the first forward (and with
    save_attention the attention op's output too), and a recompute's backward reuses its K/V copies: the ops
    and the K/V packing run fewer times, the gradients stay the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longcat_dist.kernels import bsa_triton
    from longcat_dist.model.attention import BSA_ATTENTION_OP, BSA_SELECT_OP

    packs = []
    real_pack = bsa_triton.pack_kv
    monkeypatch.setattr(bsa_triton, "pack_kv", lambda *a: packs.append(1) or real_pack(*a))

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = {BSA_SELECT_OP: 0, BSA_ATTENTION_OP: 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() in self.calls:
                self.calls[func.name()] += 1
            return func(*args, **(kwargs or {}))

    model, (latents, timesteps, text) = _model_and_inputs()
    model.train().set_attention_backend("bsa", BSAParams(sparsity=0.5, chunk_shape=(1, 4, 4)))

    def run(interval: int, save: bool, keep_kv_copies: bool = True):
        model.enable_gradient_checkpointing(interval, save_attention=save, keep_kv_copies=keep_kv_copies)
        model.zero_grad()
        packs.clear()
        with CountOps() as counter:
            model(latents, timesteps, text, num_cond_latents=1).float().square().mean().backward()
        counter.calls["pack_kv"] = len(packs)
        return counter.calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_calls, plain = run(0, False)
    kept_calls, kept = run(1, False)
    saved_calls, saved = run(1, True)
    repacked_calls, repacked = run(1, False, keep_kv_copies=False)
    depth = model.config.depth
    # pack_kv: once in each attention forward, and in the backward unless a recompute kept its copies.
    assert plain_calls == {BSA_SELECT_OP: depth, BSA_ATTENTION_OP: depth, "pack_kv": 2 * depth}
    # The counter sits outside the checkpoint's own dispatch mode, so it sees the recompute's calls only where
    # they run: the selection is served from the first forward, the attention runs again unless saved.
    assert kept_calls == {BSA_SELECT_OP: depth, BSA_ATTENTION_OP: 2 * depth, "pack_kv": 2 * depth}
    assert saved_calls == {BSA_SELECT_OP: depth, BSA_ATTENTION_OP: depth, "pack_kv": 2 * depth}
    assert repacked_calls == {BSA_SELECT_OP: depth, BSA_ATTENTION_OP: 2 * depth, "pack_kv": 3 * depth}
    assert plain.keys() == kept.keys() == saved.keys() == repacked.keys() and plain
    for name, grad in plain.items():
        for other in (kept, saved, repacked):
            assert torch.equal(other[name], grad), name
