"""Attention backend choice (spec §2.6): named backends that cannot run are errors, never silent fallbacks."""

from __future__ import annotations

import pytest
import torch

from longcat_dist.kernels import bsa_triton
from longcat_dist.model.attention import AttentionSettings, resolve_backend, self_attention
from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel
from tests.model.test_transformer import TINY, tiny_model


@pytest.fixture
def no_triton_device(monkeypatch):
    """A process where the Triton kernel cannot run: no CUDA and no TRITON_INTERPRET."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bsa_triton, "interpreted", lambda: False)


def test_bsa_requested_without_a_triton_device_is_an_error(no_triton_device):
    model = tiny_model()
    with pytest.raises(ValueError, match="'bsa' needs a CUDA GPU .* use 'sdpa'"):
        model.set_attention_backend("bsa")
    assert model.attention == AttentionSettings()  # unchanged: no half-applied setting
    with pytest.raises(ValueError, match="'bsa' needs a CUDA GPU"):
        resolve_backend("bsa")


def test_bsa_dispatch_on_the_cpu_raises_instead_of_running_dense(no_triton_device):
    """Even past resolve_backend, a "bsa" call on CPU tensors reaches the kernel's own check, not SDPA."""
    q, k, v = (torch.randn(1, 2, 2 * 4 * 4, 32, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(ValueError, match="the Triton kernel needs CUDA"):
        self_attention(q, k, v, num_cond_tokens=0, latent_shape=(2, 4, 4), settings=AttentionSettings("bsa"))


def test_auto_and_sdpa_run_dense_attention_on_the_cpu(no_triton_device):
    q, k, v = (torch.randn(1, 2, 2 * 4 * 4, 128, dtype=torch.bfloat16) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for backend in ("auto", "sdpa"):
        settings = resolve_backend(backend)
        out = self_attention(q, k, v, num_cond_tokens=0, latent_shape=(2, 4, 4), settings=settings)
        assert torch.equal(out, dense), backend


def test_official_backend_flags_load_strictly_and_do_not_pick_the_backend():
    official = {
        **TINY,
        "_class_name": "LongCatVideoTransformer3DModel",
        "_diffusers_version": "0.35.1",
        "enable_flashattn2": True,
        "enable_flashattn3": False,
        "enable_xformers": False,
        "enable_bsa": True,
        "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
        "cp_split_hw": [1, 1],
    }
    config = DiTConfig.from_dict(official)
    assert config.enable_bsa and config.bsa_params["sparsity"] == 0.9375
    # attention_implementation (set_attention_backend) decides; enable_bsa leaves the default in place.
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(config)
    assert model.attention == AttentionSettings()
