"""Frozen fp8 / int8 base linears: arithmetic, autograd, conversion, save/load, PEFT LoRA, DeepSpeed ZeRO-2."""

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from longcat_dist.model import quant_autograd as qa
from longcat_dist.model import quant_kernels as qk
from longcat_dist.model.quant import (
    PRECISIONS,
    Fp8Linear,
    Int8Linear,
    check_zero_stage,
    checkpoint_precision,
    load_quantized,
    quantize_linear,
    quantize_model,
    quantized_layers,
    resolve_precision,
    save_quantized,
    should_quantize,
)

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"fp8": Fp8Linear, "int8": Int8Linear}
# Measured on random data (seed 0, this file): fp8 out/grad 0.036-0.037, int8 0.008-0.009 (e4m3 keeps 3 mantissa
# bits, so 3.6e-2 is its floor with both operands quantized; int8 weight-only and W8A8 are both below 1e-2).
MAX_REL_ERROR = {"fp8": 4.5e-2, "int8": 1.2e-2}
# The two int8 regimes: dequantized weight below qa.INT8_MATMUL_MIN_ROWS rows, int8 x int8 matmul above.
ROW_COUNTS = (48, qa.INT8_MATMUL_MIN_ROWS + 64)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@dataclass
class StackConfig:
    """A plain stack with the DiT's module names, for tests that must not wait for the DiT."""

    hidden: int = 64
    ffn: int = 128
    depth: int = 2

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, path: Path) -> "StackConfig":
        return cls(**json.loads(Path(path).read_text()))


class StackBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn.proj = nn.Linear(hidden, hidden)
        self.ffn = nn.Module()
        self.ffn.w1 = nn.Linear(hidden, ffn, bias=False)
        self.ffn.w2 = nn.Linear(ffn, hidden, bias=False)
        self.ffn.w3 = nn.Linear(hidden, ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(x.mean(dim=1, keepdim=True)).chunk(2, dim=-1)
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        q, k, v = self.attn.qkv(h).chunk(3, dim=-1)
        x = x + self.attn.proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)
        h = F.layer_norm(x, x.shape[-1:])
        return x + self.ffn.w2(F.silu(self.ffn.w1(h)) * self.ffn.w3(h))


class Stack(nn.Module):
    def __init__(self, config: StackConfig):
        super().__init__()
        self.config = config
        self.x_embedder = nn.Linear(config.hidden, config.hidden)
        self.blocks = nn.ModuleList(StackBlock(config.hidden, config.ffn) for _ in range(config.depth))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x)
        for block in self.blocks:
            x = block(x)
        return self.final_layer.linear(x)


def make_stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack(StackConfig())


def make_linear(in_features=256, out_features=192, bias=True, dtype=torch.bfloat16) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)  # trained-model scale; the relative errors do not depend on it
        if bias:
            linear.bias.normal_(0, 0.02)
    return linear.to(dtype).requires_grad_(False)


# ---------------------------------------------------------------- names and options


def test_resolve_precision_maps_aliases_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="longcat_dist.model.quant"):
        assert resolve_precision("no_change") == "bf16"
        assert resolve_precision("fp8-torchao") == "fp8"
        assert resolve_precision("int8-quanto") == "int8"
    assert "'fp8-torchao' runs as 'fp8'" in caplog.text
    assert [resolve_precision(p) for p in PRECISIONS] == list(PRECISIONS)
    with pytest.raises(ValueError, match="'fp4'"):
        resolve_precision("fp4")


@pytest.mark.parametrize(
    "name",
    ["blocks.0.attn.qkv", "blocks.47.attn.proj", "blocks.3.cross_attn.q_linear", "blocks.3.cross_attn.kv_linear",
     "blocks.3.cross_attn.proj", "blocks.1.ffn.w1", "blocks.1.ffn.w2", "blocks.1.ffn.w3", "module.blocks.2.ffn.w1"],
)  # fmt: skip
def test_should_quantize_block_linears(name):
    assert should_quantize(name)


@pytest.mark.parametrize(
    "name",
    ["blocks.0.adaLN_modulation.1", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.y_proj.0", "x_embedder.proj",
     "final_layer.linear", "final_layer.adaLN_modulation.1", "blocks.0.attn.qkv.base_layer", "blocks.0.attn.q_norm"],
)  # fmt: skip
def test_should_not_quantize_higher_precision_layers(name):
    assert not should_quantize(name)


def test_check_zero_stage():
    check_zero_stage("fp8", 2)
    check_zero_stage("int8-quanto", 1)
    check_zero_stage("bf16", 3)
    with pytest.raises(ValueError, match="zero_stage 3 cannot run with base_model_precision 'fp8'"):
        check_zero_stage("fp8-torchao", 3)
    with pytest.raises(ValueError, match="zero_stage 4"):
        check_zero_stage("bf16", 4)


# ---------------------------------------------------------------- arithmetic


def test_int8_weight_quantization_is_the_official_scheme():
    weight = torch.randn(8, 32)
    weight[3] = 0.0
    codes, scale = qk.quantize_weight(weight, "int8")
    expected_scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-8)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(
        codes, torch.clamp(torch.round(weight / expected_scale[:, None]), -128, 127).to(torch.int8)
    )
    assert codes[3].abs().sum() == 0 and codes.abs().max() == 127
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    official = x @ (codes.to(torch.bfloat16) * scale.to(torch.bfloat16)[:, None]).t()
    assert torch.equal(x @ qk.dequantize_weight(codes, scale, torch.bfloat16).t(), official)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantize_rows_reconstructs_and_handles_zero_rows(precision):
    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    col_scale = torch.rand(40) + 0.5
    codes, scale = qk.quantize_rows(x, precision, col_scale)
    assert codes.dtype == qk.CODE_DTYPE[precision] and scale.shape == (6, 1)
    recon = codes.float() * scale
    assert torch.isfinite(recon).all() and recon[2].abs().sum() == 0
    target = x * col_scale
    kept = [0, 1, 3, 4, 5]
    # Each row keeps its own relative precision, whatever its magnitude.
    assert rel_error(recon[kept], target[kept]) < (0.04 if precision == "fp8" else 0.01)
    assert codes.float().abs().amax(dim=1)[kept].eq(qk.QMAX[precision]).all()


def test_triton_kernels_match_reference_in_interpreter():
    """The Triton kernels, interpreted on CPU, against their torch references."""
    script = textwrap.dedent(
        """
        import torch
        from longcat_dist.model import quant_kernels as qk
        torch.manual_seed(0)
        qk.QUANT_MAX_ROW_BLOCK = 256  # the 300-wide rows take the chunked path, the 200-wide ones stay whole
        for width in (200, 300):
            x = torch.randn(3, width, dtype=torch.bfloat16) * torch.tensor([[1e-3], [1.0], [1e3]])
            for col in (None, torch.rand(width) + 0.5):
                codes, scale = qk.quantize_rows_triton(x, "int8", col)
                ref_codes, ref_scale = qk.quantize_rows_reference(x, "int8", col)
                assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale), width
                # The interpreter's own fp8 cast rounds wrongly (-127 -> -64): fp8 codes are checked on GPU only.
                fp8_scale = qk.quantize_rows_triton(x, "fp8", col)[1]
                assert torch.equal(fp8_scale, qk.quantize_rows_reference(x, "fp8", col)[1]), width
        acc = torch.randint(-2**20, 2**20, (70, 130), dtype=torch.int32)
        args = (acc, torch.rand(70, 1), torch.rand(130), torch.randn(130, dtype=torch.bfloat16), torch.bfloat16)
        out, ref = qk.rescale_int32_triton(*args), qk.rescale_int32_reference(*args)
        assert torch.allclose(out.float(), ref.float(), rtol=8e-3, atol=0), (out - ref).abs().max()
        codes = torch.randint(-128, 128, (70, 200), dtype=torch.int8)
        scale = torch.rand(70) / 127
        # fp32 out: the interpreter's casts to bf16 truncate, so bf16 outputs are compared on GPU.
        dequantized = qk.dequantize_weight_triton(codes, scale, torch.float32)
        assert torch.equal(dequantized, qk.dequantize_weight_reference(codes, scale, torch.float32))
        fp8_codes = torch.randn(200, 136).to(qk.FP8_DTYPE)
        transposed = qk.transposed_codes_triton(fp8_codes)
        assert transposed.is_contiguous() and torch.equal(transposed.view(torch.uint8), fp8_codes.view(torch.uint8).t())
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_layer_output_and_input_gradient_match_reference(precision, rows):
    linear = make_linear()
    layer = quantize_linear("blocks.0.attn.qkv", linear, precision)
    assert isinstance(layer, LAYERS[precision])
    torch.manual_seed(1)
    x = torch.randn(2, rows // 2, 256, dtype=torch.bfloat16, requires_grad=True)  # [B, N, C]: 3-D input
    grad_out = torch.randn(2, rows // 2, 192, dtype=torch.bfloat16)
    out = layer(x)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows // 2, 192) and grad.shape == x.shape
    ref_out = x.detach().double() @ linear.weight.double().t() + linear.bias.double()
    ref_grad = grad_out.double() @ linear.weight.double()
    out_error, grad_error = rel_error(out, ref_out), rel_error(grad, ref_grad)
    assert out_error < MAX_REL_ERROR[precision] and grad_error < MAX_REL_ERROR[precision], (
        out_error,
        grad_error,
    )
    # The bf16 base itself, for scale: quantization costs more than bf16 rounding, but not much more.
    assert rel_error(linear(x.detach()), ref_out) < out_error


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_backward_is_the_quantized_arithmetic(precision):
    """grad_x = quantize_rows(grad_out * scale) @ codes: the weight scale folded into the output gradient."""
    layer = LAYERS[precision].from_linear(make_linear(dtype=torch.float32))
    x = torch.randn(qa.INT8_MATMUL_MIN_ROWS, 256, requires_grad=True)
    grad_out = torch.randn(qa.INT8_MATMUL_MIN_ROWS, 192)
    (grad,) = torch.autograd.grad(layer(x), x, grad_out)
    codes, scale = qk.quantize_rows(grad_out, precision, layer.qscale)
    expected = (codes.double() * scale.double()) @ layer.qweight.double()
    assert rel_error(grad, expected) < 1e-6
    x_codes, x_scale = qk.quantize_rows(x.detach(), precision)
    expected_out = (x_codes.double() * x_scale) @ (
        layer.qweight.double() * layer.qscale.double()[:, None]
    ).t()
    assert rel_error(layer(x.detach()), expected_out + layer.bias.double()) < 1e-6


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_no_weight_gradient_and_nothing_weight_sized_saved(precision):
    layer = quantize_linear("blocks.0.ffn.w1", make_linear(bias=False), precision)
    assert list(layer.parameters()) == []
    saved = []
    x = torch.randn(qa.INT8_MATMUL_MIN_ROWS, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert x.grad is not None and all(buffer.grad is None for buffer in layer.buffers())
    codes_storage = layer._buffers[layer.codes_key].untyped_storage().data_ptr()
    for tensor in saved:
        if tensor.numel() == layer.in_features * layer.out_features:
            # The layer's own 1-byte codes, not a copy, and never a dequantized weight.
            assert tensor.element_size() == 1 and tensor.untyped_storage().data_ptr() == codes_storage
    assert sum(t.numel() * t.element_size() for t in saved) <= 192 * 256 + 4 * 192 + x.numel() * 2


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_weights_take_one_byte_per_parameter(precision):
    with torch.device("meta"):
        shapes = {"qkv": (4096, 12288), "proj": (4096, 4096), "w1": (4096, 11008), "w2": (11008, 4096)}
        for in_f, out_f in shapes.values():
            layer = LAYERS[precision](in_f, out_f, bias=True, bias_dtype=torch.bfloat16)
            nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
            assert layer.qweight.element_size() == 1
            assert nbytes == in_f * out_f + out_f * (4 + 2)  # codes + fp32 scale + bf16 bias
            assert nbytes / (in_f * out_f) < 1.002
    model = quantize_model(make_stack(), precision)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 5
    params = sum(layer.in_features * layer.out_features for layer in layers.values())
    codes = sum(layer.qweight.numel() * layer.qweight.element_size() for layer in layers.values())
    assert codes == params


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_module_to_dtype_keeps_codes_and_scales(precision):
    layer = LAYERS[precision].from_linear(make_linear(dtype=torch.float32))
    codes, scale = layer.qweight.clone(), layer.qscale.clone()
    for cast in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.double(),
        lambda m: m.float(),
    ):
        cast(layer)
        assert torch.equal(layer.qweight.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(layer.qscale, scale) and layer.qscale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    layer.to(device="meta")
    assert layer.qweight.is_meta and layer.qweight.dtype == codes.dtype


def test_fp8_rejects_widths_not_divisible_by_16():
    with pytest.raises(ValueError, match=r"blocks.0.ffn.w1: fp8 needs .* 40 -> 256"):
        quantize_linear("blocks.0.ffn.w1", nn.Linear(40, 256), "fp8")
    assert isinstance(quantize_linear("blocks.0.ffn.w1", nn.Linear(40, 256), "int8"), Int8Linear)


# ---------------------------------------------------------------- models


def test_quantize_model_converts_only_block_linears():
    model = quantize_model(make_stack(), "fp8")
    assert set(quantized_layers(model)) == {
        f"blocks.{i}.{name}"
        for i in range(2)
        for name in ("attn.qkv", "attn.proj", "ffn.w1", "ffn.w2", "ffn.w3")
    }
    assert (
        type(model.blocks[0].adaLN_modulation[1]) is nn.Linear and type(model.final_layer.linear) is nn.Linear
    )
    assert quantize_model(make_stack(), "no_change").blocks[0].attn.qkv.__class__ is nn.Linear
    with pytest.raises(ValueError, match="no block Linears"):
        quantize_model(nn.Sequential(nn.Linear(16, 16)), "int8")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_gradient_checkpointing_gives_the_same_gradients(precision):
    model = quantize_model(make_stack(), precision).requires_grad_(False)
    x = torch.randn(2, 8, 64)
    grads = []
    for use_checkpoint in (False, True):
        inputs = x.clone().requires_grad_(True)
        h = model.x_embedder(inputs)
        for block in model.blocks:
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
        h.square().mean().backward()
        grads.append(inputs.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_save_load_round_trip(tmp_path, precision):
    model = quantize_model(make_stack(), precision)
    save_quantized(model, tmp_path, max_shard_bytes=20_000)  # several shards
    shards = sorted(tmp_path.glob("quantized_model-*.safetensors"))
    assert len(shards) > 1
    quant_config = json.loads((tmp_path / "quantization_config.json").read_text())
    assert quant_config["precision"] == precision == checkpoint_precision(tmp_path)
    assert quant_config["quantized_modules"] == sorted(quantized_layers(model))
    keys = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            keys.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    assert "blocks.0.attn.qkv.weight" not in keys  # no bf16 copy of a quantized weight
    assert (
        keys[f"blocks.0.attn.qkv.{LAYERS[precision].codes_key}"]
        == {"fp8": "F8_E4M3", "int8": "I8"}[precision]
    )
    assert keys["blocks.0.attn.qkv.weight_scale"] == "F32"
    loaded = load_quantized(tmp_path, "cpu")
    x = torch.randn(2, 8, 64)
    assert torch.equal(loaded(x), model(x))
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantization_config.json not found"):
        load_quantized(tmp_path, "cpu")
    save_quantized(quantize_model(make_stack(), "int8"), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(asdict(StackConfig(depth=3))))  # a block more than saved
    with pytest.raises(ValueError, match=r"keys missing from the checkpoint: \['blocks.2"):
        load_quantized(tmp_path, "cpu")
    quant_config = json.loads((tmp_path / "quantization_config.json").read_text())
    (tmp_path / "quantization_config.json").write_text(json.dumps({**quant_config, "precision": "fp4"}))
    with pytest.raises(ValueError, match="precision 'fp4'"):
        load_quantized(tmp_path, "cpu")


def test_save_refuses_models_it_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match="no Fp8Linear/Int8Linear"):
        save_quantized(make_stack(), tmp_path)
    bare = nn.Module()
    bare.blocks = nn.ModuleList([StackBlock(64, 128)])
    with pytest.raises(ValueError, match="config needs to_json/from_json"):
        save_quantized(quantize_model(bare, "fp8"), tmp_path)


# ---------------------------------------------------------------- GPU (skipped without CUDA)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("with_col_scale", [False, True])
def test_gpu_row_quantization_matches_reference(precision, with_col_scale):
    x = torch.randn(300, 11008, device="cuda", dtype=torch.bfloat16) * torch.rand(300, 1, device="cuda") * 10
    col = torch.rand(11008, device="cuda") + 0.5 if with_col_scale else None
    codes, scale = qk.quantize_rows_triton(x, precision, col)
    ref_codes, ref_scale = qk.quantize_rows_reference(x, precision, col)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


@pytest.mark.gpu
@requires_cuda
def test_gpu_elementwise_kernels_match_reference():
    codes = torch.randint(-128, 128, (1000, 4096), dtype=torch.int8, device="cuda")
    scale = torch.rand(1000, device="cuda") / 127
    dequantized = qk.dequantize_weight(codes, scale, torch.bfloat16)
    assert torch.equal(dequantized, qk.dequantize_weight_reference(codes, scale, torch.bfloat16))
    fp8_codes = torch.randn(1000, 4096, device="cuda").to(qk.FP8_DTYPE)
    transposed = qk.transposed_codes(fp8_codes)
    assert transposed.is_contiguous() and torch.equal(
        transposed.view(torch.uint8), fp8_codes.view(torch.uint8).t()
    )
    acc = torch.randint(-(2**20), 2**20, (1000, 1030), dtype=torch.int32, device="cuda")
    args = (acc, torch.rand(1000, 1, device="cuda"), torch.rand(1030, device="cuda"), None, torch.bfloat16)
    out, ref = qk.rescale_int32(*args), qk.rescale_int32_reference(*args)
    # Triton may fuse the two multiplies' roundings differently: at most one bf16 step apart, rarely.
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
    assert (out != ref).float().mean() < 1e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_gpu_layer_matches_cpu_emulation(precision):
    linear = make_linear(4096, 1024)
    layer = LAYERS[precision].from_linear(linear)
    x = torch.randn(2048, 4096, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2048, 1024, dtype=torch.bfloat16)
    results = []
    for device in ("cpu", "cuda"):
        moved, inputs = copy.deepcopy(layer).to(device), x.detach().to(device).requires_grad_(True)
        out = moved(inputs)
        (grad,) = torch.autograd.grad(out, inputs, grad_out.to(device))
        results.append((out.float().cpu(), grad.float().cpu()))
    (cpu_out, cpu_grad), (gpu_out, gpu_grad) = results
    # Same codes on both devices; only the accumulation order and bf16 rounding differ.
    assert rel_error(gpu_out, cpu_out) < 5e-3 and rel_error(gpu_grad, cpu_grad) < 5e-3
    assert (
        rel_error(gpu_out, x.detach().double() @ linear.weight.double().t() + linear.bias.double())
        < (MAX_REL_ERROR[precision])
    )
