"""LoRA: target selection, trainable fp32 weights, export in both formats, load (layers or merged)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from longcat_dist.model import lora

DEFAULT_TARGETS = ("qkv", "proj", "q_linear", "kv_linear")
DIM = 16


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)


class _CrossAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_linear = nn.Linear(DIM, DIM)
        self.kv_linear = nn.Linear(DIM, 2 * DIM)
        self.proj = nn.Linear(DIM, DIM)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.cross_attn = _Attn(), _CrossAttn()
        self.ffn = nn.ModuleDict({"w1": nn.Linear(DIM, 32, bias=False), "w2": nn.Linear(32, DIM, bias=False)})

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        kv_k, kv_v = self.cross_attn.kv_linear(y).chunk(2, dim=-1)
        attn = torch.softmax(self.cross_attn.q_linear(x) @ kv_k.transpose(-1, -2), -1) @ kv_v
        x = x + self.cross_attn.proj(attn)
        return x + self.ffn["w2"](torch.nn.functional.silu(self.ffn["w1"](x)))


class TinyTree(nn.Module):
    """The DiT's module names (x_embedder.proj is a Conv3d) around a toy forward."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(4, DIM, kernel_size=1)
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = nn.Sequential(nn.Linear(8, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder.proj(video).flatten(2).transpose(1, 2)  # [B, N, DIM]
        y = self.y_embedder.y_proj(text)  # [B, L, DIM]
        for block in self.blocks:
            x = block(x, y)
        return x


def _tree(seed: int = 0) -> TinyTree:
    torch.manual_seed(seed)
    return TinyTree()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 2, 2, 2, generator=gen), torch.randn(2, 3, 8, generator=gen)


def _trained(model: nn.Module) -> nn.Module:
    """Inject LoRA and give lora_B non-zero weights, as after some training steps."""
    lora.inject_lora(model, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    gen = torch.Generator().manual_seed(9)
    for layer in lora.lora_layers(model).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=gen)
    return model


def test_default_targets_are_block_linears_only():
    names = lora.target_module_names(_tree(), DEFAULT_TARGETS)
    expected = {
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")
    }
    assert set(names) == expected  # x_embedder.proj (Conv3d) and y_embedder are not caught by "proj"
    assert set(lora.target_module_names(_tree(), ["ffn.w1", "y_embedder"])) == {
        "blocks.0.ffn.w1",
        "blocks.1.ffn.w1",
        "y_embedder.y_proj.0",
        "y_embedder.y_proj.2",
    }
    with pytest.raises(ValueError, match="'mlp'"):
        lora.target_module_names(_tree(), ["qkv", "mlp"])


def test_inject_freezes_base_and_trains_fp32_lora_on_bf16_base():
    model = _tree().to(torch.bfloat16)
    out_before = model(*(t.bfloat16() for t in _inputs()))
    lora.inject_lora(model, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    assert len(trainable) == 2 * 10  # A and B on 10 Linears
    # lora_B starts at zero: injecting does not change the output.
    assert torch.equal(model(*(t.bfloat16() for t in _inputs())), out_before)
    with pytest.raises(ValueError, match="rank 0"):
        lora.inject_lora(_tree(), rank=0, alpha=1.0, targets=DEFAULT_TARGETS)


def test_peft_export_has_diffusers_keys_and_metadata(tmp_path):
    model = _trained(_tree())
    path = tmp_path / "lora.safetensors"
    lora.export_lora(model, path, metadata={"base_model": "tiny", "step": 7})
    with safe_open(str(path), framework="pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert "transformer.blocks.0.attn.qkv.lora_A.weight" in keys
    assert "transformer.blocks.1.cross_attn.proj.lora_B.weight" in keys
    assert len(keys) == 20
    assert (
        meta["rank"] == "4"
        and meta["alpha"] == "8.0"
        and meta["step"] == "7"
        and meta["base_model"] == "tiny"
    )
    assert meta["targets"] == '["qkv", "proj", "q_linear", "kv_linear"]'
    with pytest.raises(ValueError, match="step"):
        lora.export_lora(model, tmp_path / "x.safetensors", metadata={"base_model": "tiny"})


@pytest.mark.parametrize("fmt", ["peft", "official"])
def test_exported_lora_reproduces_training_output(tmp_path, fmt):
    trained = _trained(_tree())
    inputs = _inputs()
    expected = trained(*inputs)
    assert not torch.allclose(expected, _tree()(*inputs))  # the LoRA changes the output
    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "peft":
        lora.export_lora(trained, path, metadata={"base_model": "tiny", "step": 1})
    else:
        lora.export_official_lora(trained, path)
    # As LoRA layers on a plain model: exactly the training-time output.
    loaded = lora.load_lora(_tree(), path)
    assert torch.equal(loaded(*inputs), expected)
    assert loaded.lora_settings["rank"] == 4
    # Merged into the weights: the same function up to float rounding.
    merged = lora.load_lora(_tree(), path, merge=True)
    assert not lora.lora_layers(merged)
    assert torch.allclose(merged(*inputs), expected, atol=1e-4, rtol=1e-4)


def test_official_format_names_and_split_ups(tmp_path):
    trained = _trained(_tree())
    path = tmp_path / "official.safetensors"
    lora.export_official_lora(trained, path)
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    stem = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert state[f"{stem}.lora_down.weight"].shape == (4, DIM)
    assert state[f"{stem}.lora_up.weight"].shape == (3 * DIM, 4)
    assert state[f"{stem}.alpha_scale"].item() == 2.0  # alpha / r
    # A split-up file (n = 3 parts on qkv): down [3r, in], up blocks [out/3, r] act as a block-diagonal up.
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(6, DIM, generator=gen)
    ups = [torch.randn(DIM, 2, generator=gen) for _ in range(3)]
    split = {f"{stem}.lora_down.weight": down, f"{stem}.alpha_scale": torch.tensor(0.5)}
    split |= {f"{stem}.lora_up.blocks.{i}.weight": up for i, up in enumerate(ups)}
    save_file(split, str(tmp_path / "split.safetensors"))
    model = lora.load_lora(_tree(), tmp_path / "split.safetensors")
    x = torch.randn(5, DIM, generator=gen)
    layer = model.blocks[0].attn.qkv
    official = torch.cat([p @ up.T for p, up in zip((x @ down.T).chunk(3, dim=-1), ups)], dim=-1)
    assert torch.allclose(layer(x), layer.base_layer(x) + 0.5 * official, atol=1e-5)


def test_load_rejects_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lora.load_lora(_tree(), tmp_path / "missing.safetensors")
    save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora.load_lora(_tree(), tmp_path / "plain.safetensors")
    bad = {
        "transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, DIM + 1),
        "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(3 * DIM, 4),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="another model configuration"):
        lora.load_lora(_tree(), tmp_path / "bad.safetensors")
    absent = {k.replace("blocks.0", "blocks.9"): v for k, v in bad.items()}
    save_file(absent, str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="blocks.9.attn.qkv"):
        lora.load_lora(_tree(), tmp_path / "absent.safetensors")


def _tiny_dit():
    from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel

    torch.manual_seed(0)
    config = DiTConfig(
        hidden_size=64,
        depth=2,
        num_heads=2,
        caption_channels=32,
        adaln_tembed_dim=32,
        frequency_embedding_size=64,
    )
    return LongCatVideoTransformer3DModel(config).float()


def test_real_tiny_dit_lora_round_trip(tmp_path):
    model = _trained(_tiny_dit())
    names = set(lora.lora_layers(model))
    assert len(names) == 10 and not any(
        n.startswith(("x_embedder", "y_embedder", "final_layer")) for n in names
    )
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 4, generator=gen)
    timestep, text = torch.tensor([[0.0, 700.0]]), torch.randn(1, 1, 5, 32, generator=gen)
    with torch.no_grad():
        expected = model(latents, timestep, text, num_cond_latents=1)
        assert not torch.allclose(expected, _tiny_dit()(latents, timestep, text, num_cond_latents=1))
        lora.export_lora(model, tmp_path / "a.safetensors", metadata={"base_model": "tiny", "step": 3})
        lora.export_official_lora(model, tmp_path / "b.safetensors")
        for path in ("a.safetensors", "b.safetensors"):
            loaded = lora.load_lora(_tiny_dit(), tmp_path / path)
            assert torch.equal(loaded(latents, timestep, text, num_cond_latents=1), expected)
