"""The DiT against spec §2: checkpoint layout, forward pass, I2V conditioning, KV cache, checkpointing."""

from __future__ import annotations

import time

import pytest
import torch

from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel, _gated_add
from tests.model.reference_dit import reference_forward, reference_forward_bf16

TINY = dict(
    hidden_size=64,
    depth=2,
    num_heads=2,
    caption_channels=32,
    adaln_tembed_dim=32,
    frequency_embedding_size=64,
)


def tiny_model(seed: int = 0, **overrides) -> LongCatVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = LongCatVideoTransformer3DModel(DiTConfig(**{**TINY, **overrides}))
    # Random (not default-initialised) norms and biases, so every parameter influences the output.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def inputs(batch=1, frames=3, height=4, width=6, text_len=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, height, width, generator=gen)
    timesteps = torch.rand(batch, frames, generator=gen) * 1000
    text = torch.randn(batch, 1, text_len, 32, generator=gen)
    return latents, timesteps, text


def production_layout() -> dict[str, tuple[int, ...]]:
    """Spec §2.2, table by table."""
    layout = {
        "x_embedder.proj.weight": (4096, 16, 1, 2, 2),
        "x_embedder.proj.bias": (4096,),
        "t_embedder.mlp.0.weight": (512, 256),
        "t_embedder.mlp.0.bias": (512,),
        "t_embedder.mlp.2.weight": (512, 512),
        "t_embedder.mlp.2.bias": (512,),
        "y_embedder.y_proj.0.weight": (4096, 4096),
        "y_embedder.y_proj.0.bias": (4096,),
        "y_embedder.y_proj.2.weight": (4096, 4096),
        "y_embedder.y_proj.2.bias": (4096,),
        "final_layer.adaLN_modulation.1.weight": (8192, 512),
        "final_layer.adaLN_modulation.1.bias": (8192,),
        "final_layer.linear.weight": (64, 4096),
        "final_layer.linear.bias": (64,),
    }
    block = {
        "adaLN_modulation.1.weight": (24576, 512),
        "adaLN_modulation.1.bias": (24576,),
        "pre_crs_attn_norm.weight": (4096,),
        "pre_crs_attn_norm.bias": (4096,),
        "attn.qkv.weight": (12288, 4096),
        "attn.qkv.bias": (12288,),
        "attn.q_norm.weight": (128,),
        "attn.k_norm.weight": (128,),
        "attn.proj.weight": (4096, 4096),
        "attn.proj.bias": (4096,),
        "cross_attn.q_linear.weight": (4096, 4096),
        "cross_attn.q_linear.bias": (4096,),
        "cross_attn.kv_linear.weight": (8192, 4096),
        "cross_attn.kv_linear.bias": (8192,),
        "cross_attn.proj.weight": (4096, 4096),
        "cross_attn.proj.bias": (4096,),
        "cross_attn.q_norm.weight": (128,),
        "cross_attn.k_norm.weight": (128,),
        "ffn.w1.weight": (11008, 4096),
        "ffn.w2.weight": (4096, 11008),
        "ffn.w3.weight": (11008, 4096),
    }
    for i in range(48):
        layout.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return layout


def test_production_state_dict_matches_the_official_checkpoint_on_meta():
    start = time.perf_counter()
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(DiTConfig())
    elapsed = time.perf_counter() - start
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert state == production_layout()
    assert len(state) == 1022
    assert sum(p.numel() for p in model.parameters()) == 13_581_071_424
    assert not list(model.buffers())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert elapsed < 10.0, f"meta construction took {elapsed:.1f}s"


@pytest.mark.parametrize(
    "hidden, heads, depth, params",
    [
        (64, 2, 2, 212_672),
        (64, 8, 1, 117_216),
        (48, 2, 2, 147_248),
        (32, 2, 2, 90_528),
        (40, 5, 1, 65_832),
        (128, 1, 1, 403_712),
        (256, 2, 2, 2_463_104),
    ],
)
def test_tiny_configs_have_the_spec_parameter_counts(hidden, heads, depth, params):
    config = DiTConfig(**{**TINY, "hidden_size": hidden, "num_heads": heads, "depth": depth})
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(config)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("num_cond", [0, 1, 2])
def test_forward_matches_an_independent_reference(num_cond):
    model = tiny_model()
    latents, timesteps, text = inputs(batch=2)
    timesteps[:, :num_cond] = 0
    with torch.no_grad():
        ours = model(latents, timesteps, text, num_cond_latents=num_cond)
        theirs = reference_forward(model, latents, timesteps, text[:, 0], num_cond)
    assert ours.dtype == torch.float32 and ours.shape == latents.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_cond_outputs_ignore_noise_frames_and_text():
    model = tiny_model()
    latents, timesteps, text = inputs()
    timesteps[:, 0] = 0
    changed = latents.clone()
    changed[:, :, 1:] = torch.randn_like(changed[:, :, 1:])
    other_text = torch.randn_like(text)
    with torch.no_grad():
        base = model(latents, timesteps, text, num_cond_latents=1)
        moved = model(changed, timesteps, other_text, num_cond_latents=1)
    assert torch.equal(base[:, :, :1], moved[:, :, :1])
    assert not torch.allclose(base[:, :, 1:], moved[:, :, 1:], atol=1e-3)


def test_cond_tokens_get_zero_cross_attention():
    model = tiny_model()
    block = model.blocks[0]
    x = torch.randn(1, 3 * 6, 64)
    text = model.y_embedder(torch.randn(5, 32))
    out = block._cross_attention(x, text, [5], num_cond_tokens=6, backend="sdpa")
    assert torch.equal(out[:, :6], torch.zeros_like(out[:, :6]))
    assert out[:, 6:].abs().min() > 0


def test_kv_cache_equals_the_full_conditioned_forward():
    model = tiny_model()
    latents, timesteps, text = inputs(frames=4)
    timesteps[:, :2] = 0
    with torch.no_grad():
        full = model(latents, timesteps, text, num_cond_latents=2)
        dummy_text = torch.zeros_like(text)
        _, cache = model(latents[:, :, :2], timesteps[:, :2], dummy_text, return_kv=True, skip_crs_attn=True)
        noise = model(latents[:, :, 2:], timesteps[:, 2:], text, num_cond_latents=2, kv_cache=cache)
    assert len(cache) == 2 and cache[0][0].shape == (1, 2, 2 * 2 * 3, 32)
    torch.testing.assert_close(noise, full[:, :, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_cond", [1, 3])
def test_kv_cache_with_another_num_cond_latents_is_an_error_naming_both(num_cond):
    model = tiny_model()
    latents, timesteps, text = inputs(frames=4)
    with torch.no_grad():
        _, cache = model(latents[:, :, :2], timesteps[:, :2], text, return_kv=True, skip_crs_attn=True)
        with pytest.raises(ValueError, match=rf"kv_cache holds 2 cond frames .* num_cond_latents={num_cond}"):
            model(latents[:, :, 2:], timesteps[:, 2:], text, num_cond_latents=num_cond, kv_cache=cache)


def test_kv_cache_from_another_resolution_is_an_error():
    model = tiny_model()
    latents, timesteps, text = inputs(frames=3, height=4, width=6)
    with torch.no_grad():
        _, cache = model(latents[:, :, :1], timesteps[:, :1], text, return_kv=True, skip_crs_attn=True)
        wider = torch.randn(1, 16, 2, 4, 8)
        with pytest.raises(ValueError, match=r"kv_cache holds 0.75 cond frames \(6 tokens of 8 per frame\)"):
            model(wider, timesteps[:, 1:], text, num_cond_latents=1, kv_cache=cache)


def test_a_batch_one_cache_serves_a_larger_batch():
    model = tiny_model()
    latents, timesteps, text = inputs(batch=2, frames=3)
    with torch.no_grad():
        _, cache = model(latents[:1, :, :1], torch.zeros(1, 1), text[:1], return_kv=True, skip_crs_attn=True)
        batched = model(latents[:, :, 1:], timesteps[:, 1:], text, num_cond_latents=1, kv_cache=cache)
        single = model(latents[1:, :, 1:], timesteps[1:, 1:], text[1:], num_cond_latents=1, kv_cache=cache)
    torch.testing.assert_close(batched[1:], single, rtol=1e-5, atol=1e-5)


def test_per_frame_timesteps_change_only_their_own_frames_modulation():
    model = tiny_model()
    timesteps = torch.tensor([[0.0, 300.0, 700.0]])
    changed = timesteps.clone()
    changed[0, 1] = 900.0
    t_a, t_b = model._embed_timesteps(timesteps, 1, 3), model._embed_timesteps(changed, 1, 3)
    mod_a = model.blocks[0].adaLN_modulation(t_a)
    mod_b = model.blocks[0].adaLN_modulation(t_b)
    assert torch.equal(mod_a[:, [0, 2]], mod_b[:, [0, 2]])
    assert not torch.allclose(mod_a[:, 1], mod_b[:, 1])


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_a_frames_timestep_modulates_only_that_frames_tokens(frame):
    """Block 0's modulated attention input: the changed frame's S tokens move, the others stay bit-identical."""
    model = tiny_model()
    latents, timesteps, text = inputs(frames=3, height=4, width=6)  # S = 2·3 = 6 tokens per frame
    changed = timesteps.clone()
    changed[0, frame] += 250.0
    seen = []
    hook = model.blocks[0].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(latents, timesteps, text)
        model(latents, changed, text)
    hook.remove()
    before, after = (x.view(1, 3, 6, 64) for x in seen)  # [B, T, S, C]
    others = [f for f in range(3) if f != frame]
    assert torch.equal(before[:, others], after[:, others])
    assert (before[:, frame] != after[:, frame]).all(dim=-1).all()  # every token of that frame moved


def test_timesteps_are_rounded_to_the_model_dtype_before_embedding():
    model = tiny_model().to(torch.bfloat16)
    near = model._embed_timesteps(torch.tensor([998.27]), 1, 1)
    exact = model._embed_timesteps(torch.tensor([1000.0]), 1, 1)
    assert torch.equal(near, exact)  # 998.27 rounds to 1000 in bf16 (spec §2.12 rule 1)


def count_block_runs(model: LongCatVideoTransformer3DModel) -> list[int]:
    """A list that counts the forward executions of each block (recomputations included) from now on."""
    runs = [0] * len(model.blocks)

    def counter(index: int):
        return lambda module, args: runs.__setitem__(index, runs[index] + 1)

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(counter(index))
    return runs


@pytest.mark.parametrize("interval, runs", [(1, [2, 2, 2, 2]), (2, [2, 1, 2, 1]), (3, [2, 1, 1, 2])])
def test_gradient_checkpointing_recomputes_its_blocks_and_gives_the_same_gradients(interval, runs):
    """Checkpointed blocks run twice (forward + recompute in the backward), the others once."""
    latents, timesteps, text = inputs()
    grads, counts = [], []
    for checkpointing in (0, interval):
        model = tiny_model(depth=4).train()
        model.enable_gradient_checkpointing(checkpointing)
        counts.append(count_block_runs(model))
        model(latents, timesteps, text, num_cond_latents=1).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert counts == [[1, 1, 1, 1], runs]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_off_in_eval_mode():
    model = tiny_model(depth=2)
    model.enable_gradient_checkpointing(1)
    runs = count_block_runs(model)
    latents, timesteps, text = inputs()
    model(latents.requires_grad_(), timesteps, text).sum().backward()
    assert runs == [1, 1]


def test_text_padding_with_zero_pad_ignores_pad_content_but_not_pad_count():
    model = tiny_model()
    latents, timesteps, text = inputs(text_len=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    scrambled = text.clone()
    scrambled[:, :, 3:] = torch.randn_like(scrambled[:, :, 3:])
    with torch.no_grad():
        padded = model(latents, timesteps, text, mask)
        same = model(latents, timesteps, scrambled, mask)
        unpadded = model(latents, timesteps, text[:, :, :3])
    assert torch.equal(padded, same)
    # Zero-vector pads still take part in cross-attention (official quirk), so they are not neutral.
    assert not torch.allclose(padded, unpadded, atol=1e-4)


def test_varlen_text_without_zero_pad_equals_each_sample_alone():
    model = tiny_model(text_tokens_zero_pad=False)
    latents, timesteps, text = inputs(batch=2, text_len=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        batched = model(latents, timesteps, text, mask)
        first = model(latents[:1], timesteps[:1], text[:1])
        second = model(latents[1:], timesteps[1:], text[1:, :, :2])
    torch.testing.assert_close(batched[:1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1:], second, rtol=1e-5, atol=1e-5)


def test_gated_add_is_fp32_maths_rounded_to_bf16_once():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3 * 8, 64, generator=gen) * 4).to(torch.bfloat16)
    update = torch.randn(2, 3 * 8, 64, generator=gen).to(torch.bfloat16)
    gate = torch.randn(2, 3, 1, 64, generator=gen)  # fp32, per latent frame
    out = _gated_add(x, gate, update, frames=3)
    per_frame = (2, 3, 8, 64)
    expected = (
        (x.float().view(per_frame) + gate * update.float().view(per_frame)).view_as(x).to(torch.bfloat16)
    )
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    product_in_bf16 = x.view(per_frame) + (gate * update.view(per_frame)).to(torch.bfloat16)  # two roundings
    gate_in_bf16 = x.view(per_frame) + gate.to(torch.bfloat16) * update.view(per_frame)
    assert not torch.equal(out, product_in_bf16.view_as(x))
    assert not torch.equal(out, gate_in_bf16.view_as(x))


@pytest.mark.parametrize(
    "num_cond, mask",
    [(0, None), (1, None), (1, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), (2, [[1, 1, 0, 0, 0, 0], [1] * 6])],
)
@pytest.mark.parametrize("width", [64, 256])  # head dim 32 and 128 (the production RoPE split)
def test_bf16_forward_equals_the_dtype_faithful_reference_bitwise(num_cond, mask, width):
    model = tiny_model(hidden_size=width).to(torch.bfloat16)
    model.set_attention_backend("sdpa")
    latents, timesteps, text = inputs(batch=2, text_len=6)
    timesteps[:, :num_cond] = 0
    mask = None if mask is None else torch.tensor(mask)
    with torch.no_grad():
        ours = model(latents, timesteps, text, mask, num_cond_latents=num_cond)
        theirs = reference_forward_bf16(model, latents, timesteps, text, num_cond, mask)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs), f"max |diff| {(ours - theirs).abs().max().item():.3g}"


def test_bf16_forward_runs_with_fp32_islands_and_stays_close_to_fp32():
    model = tiny_model()
    latents, timesteps, text = inputs()
    with torch.no_grad():
        fp32 = model(latents, timesteps, text, num_cond_latents=1)
        bf16 = model.to(torch.bfloat16)(latents, timesteps, text, num_cond_latents=1)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()


@pytest.mark.parametrize(
    "shape, match",
    [((1, 16, 2, 5, 4), "must be even"), ((1, 16, 2, 4, 3), "must be even"), ((1, 8, 2, 4, 4), r"\[B, 16")],
)
def test_bad_latent_shapes_are_named(shape, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape), torch.zeros(1), torch.randn(1, 1, 5, 32))


def test_bad_timestep_and_cond_arguments_are_named():
    model = tiny_model()
    latents, _, text = inputs(frames=2)
    with pytest.raises(ValueError, match=r"timestep must be \[B\] or \[B, T\]"):
        model(latents, torch.zeros(1, 3), text)
    with pytest.raises(ValueError, match="num_cond_latents=3"):
        model(latents, torch.zeros(1), text, num_cond_latents=3)
    with pytest.raises(ValueError, match="caption_channels|1, L, 32"):
        model(latents, torch.zeros(1), torch.randn(1, 1, 5, 48))


def test_config_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        DiTConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match="divisible by 8"):
        DiTConfig(hidden_size=48, num_heads=4)
    assert DiTConfig.from_dict({"_class_name": "X", "depth": 2}).depth == 2


def test_backend_requested_by_name_must_be_available():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown"):
        model.set_attention_backend("flash9")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="xformers package is not installed"):
            model.set_attention_backend("xformers")
    model.set_attention_backend("auto")
    assert model.attention.backend == "auto"


def test_checkpoint_that_saves_attention_skips_its_recompute_and_keeps_gradients():
    """gradient_checkpointing_save_attention: same gradients, one self-attention SDPA call per block less."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longcat_dist.model.attention import _SDPA_OPS, in_self_attention

    class CountSdpa(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.self_attention = self.cross_attention = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _SDPA_OPS:
                if in_self_attention():
                    self.self_attention += 1
                else:
                    self.cross_attention += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).train()
    model.set_attention_backend("sdpa")
    latents = torch.randn(1, 16, 3, 4, 4)
    timestep, text = torch.full((1, 3), 500.0), torch.randn(1, 1, 5, TINY_DIT["caption_channels"])

    def run(save: bool):
        model.enable_gradient_checkpointing(1, save_attention=save)
        model.zero_grad()
        with CountSdpa() as counts:
            model(latents, timestep, text, num_cond_latents=1).square().mean().backward()
        return counts, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = run(False)
    saved, saved_grads = run(True)
    depth = TINY_DIT["depth"]
    # Two self-attention calls per block (cond and noise queries), each run again by the plain recompute.
    assert plain.self_attention == 4 * depth and saved.self_attention == 2 * depth
    assert plain.cross_attention == saved.cross_attention > 0  # cross-attention is still recomputed
    for name, grad in plain_grads.items():
        torch.testing.assert_close(saved_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
