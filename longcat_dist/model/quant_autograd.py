"""Matmuls and autograd of the frozen fp8 / int8 linears: forward and input gradient only.

CUDA runs the tensor-core matmuls (`torch._scaled_mm` for fp8, `torch._int_mm` for int8); the CPU runs the same
arithmetic in plain torch (fp8 products are exact in fp32, int8 accumulation is exact in int32), so CI checks
every formula the GPU runs. The base is frozen: backward returns only grad_input and never allocates a weight
gradient; it saves nothing but the layer's own codes and scales.
"""

import torch
import torch.nn.functional as F

from longcat_dist.model.quant_kernels import dequantize_weight, quantize_rows, rescale_int32, transposed_codes

# cuBLASLt fp8 matmuls need K and N divisible by 16.
FP8_DIM_MULTIPLE = 16
# Hopper's fast fp8 accumulation skips the periodic promotion of partial sums to full fp32: 17-20% faster
# matmuls on H100, with an error far below the e4m3 rounding of the operands (docs/perf_quant.md).
FP8_FAST_ACCUM = True
# torch._int_mm on CUDA needs more than 16 rows and K, N divisible by 8. Below INT8_MATMUL_MIN_ROWS rows the
# activations are not worth quantizing and the weight is dequantized instead; the rule is the same on both
# devices, so CPU tests cover both regimes.
INT8_DIM_MULTIPLE = 8
INT8_MATMUL_MIN_ROWS = 1024


def fp8_matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = FP8_FAST_ACCUM,
) -> torch.Tensor:
    """(a_codes * a_scale) @ (b_codes * b_scale).T + bias.

    a_codes [M, K], b_codes [N, K], both e4m3 and contiguous along K (cuBLASLt's fp8 layout);
    a_scale [M, 1], b_scale [1, N] fp32. On CUDA the output is rounded to bf16 before any cast to out_dtype.
    """
    if a_codes.is_cuda:
        out = torch._scaled_mm(
            a_codes,
            b_codes.t(),
            scale_a=a_scale,
            scale_b=b_scale,
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
        return out.to(out_dtype)
    out = (a_codes.float() @ b_codes.float().t()) * a_scale * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(a_codes * a_scale) @ (b_codes * b_scale).T + bias with an exact int32 accumulator.

    a_codes [M, K], b_codes [N, K] int8, contiguous along K; a_scale [M, 1], b_scale [1, N] fp32.
    """
    acc = torch._int_mm(a_codes, b_codes.t())  # [M, N] int32, identical on both devices
    return rescale_int32(acc, a_scale, b_scale, bias, out_dtype)


def _ones_row(width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(1, width, dtype=torch.float32, device=device)  # [1, N]: no column scale


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = codes * scale[:, None]; x [M, in]; backward gives grad_x only."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias):
        x_codes, x_scale = quantize_rows(x, "fp8")
        ctx.save_for_backward(codes, scale)
        return fp8_matmul(x_codes, x_scale, codes, scale[None, :], bias, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        # grad_x = grad_out @ (scale[:, None] * codes): the weight scale sits on the reduction dim, so it is
        # folded into the output gradient before that is quantized, one scale per row.
        grad_codes, grad_scale = quantize_rows(grad_out, "fp8", col_scale=scale)
        # cuBLASLt wants the reduction dim (out) contiguous: a transient [in, out] copy of one layer's codes,
        # freed at once, instead of a second copy kept for the whole run.
        codes_t = transposed_codes(codes)
        grad_x = fp8_matmul(
            grad_codes, grad_scale, codes_t, _ones_row(codes_t.shape[0], codes.device), None, grad_out.dtype
        )
        return grad_x, None, None, None


def int8_uses_int_mm(rows: int, in_features: int, out_features: int) -> bool:
    """Whether the int8 layer quantizes its activations (int8 tensor cores) or dequantizes the weight."""
    dims_ok = in_features % INT8_DIM_MULTIPLE == 0 and out_features % INT8_DIM_MULTIPLE == 0
    return dims_ok and rows >= INT8_MATMUL_MIN_ROWS


class _Int8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W = codes * scale[:, None]; x [M, in]; backward gives grad_x only."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias):
        ctx.save_for_backward(codes, scale)
        if int8_uses_int_mm(x.shape[0], codes.shape[1], codes.shape[0]):
            x_codes, x_scale = quantize_rows(x, "int8")
            return int8_matmul(x_codes, x_scale, codes, scale[None, :], bias, x.dtype)
        weight = dequantize_weight(codes, scale, x.dtype)  # [out, in], transient
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        if int8_uses_int_mm(grad_out.shape[0], codes.shape[1], codes.shape[0]):
            grad_codes, grad_scale = quantize_rows(grad_out, "int8", col_scale=scale)
            codes_t = transposed_codes(codes)
            ones = _ones_row(codes_t.shape[0], codes.device)
            return int8_matmul(grad_codes, grad_scale, codes_t, ones, None, grad_out.dtype), None, None, None
        # Dequantized again rather than saved: a saved copy would hold 2 bytes/param until the backward.
        weight = dequantize_weight(codes, scale, grad_out.dtype)
        return grad_out @ weight, None, None, None


def quantized_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, precision: str
) -> torch.Tensor:
    """x [..., in] -> [..., out] through the frozen quantized weight codes [out, in] * scale [out]."""
    if x.shape[-1] != codes.shape[1]:
        raise ValueError(
            f"quantized linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}), "
            f"the layer expects {codes.shape[1]}"
        )
    function = _Fp8LinearFunction if precision == "fp8" else _Int8LinearFunction
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    out = function.apply(rows, codes, scale, bias)  # [M, out]
    return out.reshape(*x.shape[:-1], codes.shape[0])
