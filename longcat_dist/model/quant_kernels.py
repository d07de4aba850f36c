"""Quantization kernels of the frozen fp8 / int8 linears, each with its plain-torch reference.

Each dispatching function means the same on both devices: CUDA runs the Triton kernel, the CPU runs the
reference, and both produce the same bits (tests/model/test_quant.py checks this on GPU and, through the Triton
interpreter, on CPU). The matmuls and the autograd around them are in quant_autograd.py.
"""

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
# e4m3 for activations and output gradients alike: with one scale per row the range of e5m2 buys nothing, and its
# 2-bit mantissa doubles the error (docs/perf_quant.md: 3.7e-2 vs 7.4e-2 relative).
QMAX = {"fp8": 448.0, "int8": 127.0}
CODE_DTYPE = {"fp8": FP8_DTYPE, "int8": torch.int8}
# Spec §8 floors the weight scale; rows of activations or gradients that are all zero (padded tokens) get a
# floored amax so that they quantize to zeros instead of NaN.
WEIGHT_SCALE_FLOOR = 1e-8
ROW_AMAX_FLOOR = 1e-30
# Round half to even without libdevice (the Triton interpreter has none): for |v| < 2**22, adding and then
# subtracting 1.5 * 2**23 leaves the rounding to the fp32 adder, exactly like torch.round.
ROUND_MAGIC = 12582912.0
# One program quantizes one row. Rows up to QUANT_MAX_ROW_BLOCK wide (every LongCat row: 4096, 11008, 12288) sit
# in registers whole and are read once; wider ones go in QUANT_BLOCK chunks, read twice (amax, then codes).
QUANT_MAX_ROW_BLOCK = 16384
QUANT_BLOCK = 4096
# 16 fp32 values a thread at most 16 warps: 8 warps for a 4096 row, 16 (32 values a thread) for 16384.
QUANT_VALUES_PER_THREAD = 16
QUANT_MAX_WARPS = 16
# Elementwise 2-D kernels (int32 rescale, int8 dequantization) are memory-bound; 64 x 128 tiles give
# 16-byte loads along the contiguous dim.
TILE_M = 64
TILE_N = 128
# Square byte tiles for the transpose: 128 x 128 bytes = 16 KB, 128-byte rows on both the load and the store.
TRANSPOSE_BLOCK = 128

_ROW_AMAX_FLOOR = tl.constexpr(ROW_AMAX_FLOOR)
_ROUND_MAGIC = tl.constexpr(ROUND_MAGIC)


def quantize_weight(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a [out, in] weight: codes [out, in] and fp32 scales [out]."""
    w = weight.detach().float()
    qmax = QMAX[precision]
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(WEIGHT_SCALE_FLOOR)  # [out]
    scaled = (w / scale[:, None]).clamp(-qmax, qmax)
    if precision == "int8":
        # Spec §8: clamp(round(W / scale), -128, 127); |W / scale| <= 127 already.
        return torch.round(scaled).to(torch.int8), scale
    return scaled.to(FP8_DTYPE), scale


# ---------------------------------------------------------------- row quantization


def quantize_rows_reference(
    x: torch.Tensor, precision: str, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch row quantization: codes [M, K] and dequantization scales [M, 1] fp32 (see quantize_rows)."""
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.float()
    qmax = QMAX[precision]
    amax = v.abs().amax(dim=1, keepdim=True).clamp_min(ROW_AMAX_FLOOR)  # [M, 1]
    # Tensor-by-tensor divisions: torch turns a division by a Python scalar into a multiplication by its
    # rounded reciprocal, which the kernel's IEEE division would not match bit for bit.
    qmax_t = torch.full_like(amax, qmax)
    scaled = (v * (qmax_t / amax)).clamp(-qmax, qmax)
    codes = torch.round(scaled).to(torch.int8) if precision == "int8" else scaled.to(FP8_DTYPE)
    return codes, amax / qmax_t


@triton.jit
def _load_row_chunk(x_row, col_scale_ptr, cols, mask, HAS_COL_SCALE: tl.constexpr):
    v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        v = v * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
    return v


@triton.jit
def _store_codes(codes_row, cols, mask, v, inv_scale, QMAX_VALUE: tl.constexpr, TO_INT8: tl.constexpr):
    scaled = tl.minimum(tl.maximum(v * inv_scale, -QMAX_VALUE), QMAX_VALUE)
    if TO_INT8:
        codes = ((scaled + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)
    else:
        codes = scaled.to(codes_row.dtype.element_ty)
    tl.store(codes_row + cols, codes, mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    col_scale_ptr,
    codes_ptr,
    row_scale_ptr,
    n_cols,
    x_row_stride,
    QMAX_VALUE: tl.constexpr,
    TO_INT8: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    codes_row = codes_ptr + row * n_cols
    qmax = tl.full([], QMAX_VALUE, tl.float32)
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = _load_row_chunk(x_row, col_scale_ptr, cols, mask, HAS_COL_SCALE)
        amax = tl.maximum(tl.max(tl.abs(v), axis=0), _ROW_AMAX_FLOOR)
        # div_rn: IEEE division, as torch does; Triton's plain `/` may be approximate.
        _store_codes(codes_row, cols, mask, v, tl.math.div_rn(qmax, amax), QMAX_VALUE, TO_INT8)
    else:
        chunk_amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = _load_row_chunk(x_row, col_scale_ptr, cols, cols < n_cols, HAS_COL_SCALE)
            chunk_amax = tl.maximum(chunk_amax, tl.abs(v))
        amax = tl.maximum(tl.max(chunk_amax, axis=0), _ROW_AMAX_FLOOR)
        inv_scale = tl.math.div_rn(qmax, amax)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            v = _load_row_chunk(x_row, col_scale_ptr, cols, mask, HAS_COL_SCALE)
            _store_codes(codes_row, cols, mask, v, inv_scale, QMAX_VALUE, TO_INT8)
    tl.store(row_scale_ptr + row, tl.math.div_rn(amax, qmax))


def quantize_rows_triton(
    x: torch.Tensor, precision: str, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton row quantization (CUDA, or CPU under TRITON_INTERPRET=1); the same bits as the reference."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=CODE_DTYPE[precision], device=x.device)  # [M, K]
    row_scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)  # [M, 1]
    whole_row = cols <= QUANT_MAX_ROW_BLOCK
    block = triton.next_power_of_2(cols) if whole_row else QUANT_BLOCK
    _quantize_rows_kernel[(rows,)](
        x,
        x if col_scale is None else col_scale.float().contiguous(),
        codes,
        row_scale,
        cols,
        x.stride(0),
        QMAX_VALUE=QMAX[precision],
        TO_INT8=precision == "int8",
        HAS_COL_SCALE=col_scale is not None,
        BLOCK=block,
        WHOLE_ROW=whole_row,
        num_warps=max(1, min(QUANT_MAX_WARPS, block // (32 * QUANT_VALUES_PER_THREAD))),
    )
    return codes, row_scale


def quantize_rows(
    x: torch.Tensor, precision: str, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x [M, K] (times col_scale [K], if given) with its own absmax scale.

    Returns codes [M, K] (e4m3 or int8) and dequantization scales [M, 1] fp32, so x ~ codes * scales.
    """
    if x.is_cuda:
        return quantize_rows_triton(x, precision, col_scale)
    return quantize_rows_reference(x, precision, col_scale)


# ---------------------------------------------------------------- int32 rescale (int8 matmul epilogue)


def rescale_int32_reference(
    acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype
) -> torch.Tensor:
    """(acc [M, N] * row_scale [M, 1]) * col_scale [N] + bias [N], cast to out_dtype."""
    out = acc.float() * row_scale * col_scale.reshape(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@triton.jit
def _rescale_int32_kernel(
    acc_ptr,
    row_scale_ptr,
    col_scale_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    acc = tl.load(acc_ptr + offsets, mask=mask, other=0).to(tl.float32)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    col_scale = tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)
    out = acc * row_scale[:, None] * col_scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def rescale_int32_triton(
    acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype
) -> torch.Tensor:
    """Triton version of rescale_int32_reference, one pass over the int32 accumulator."""
    rows, cols = acc.shape
    out = torch.empty(rows, cols, dtype=out_dtype, device=acc.device)  # [M, N]
    _rescale_int32_kernel[(triton.cdiv(rows, TILE_M), triton.cdiv(cols, TILE_N))](
        acc,
        row_scale.contiguous(),
        col_scale.float().contiguous(),
        acc if bias is None else bias,
        out,
        rows,
        cols,
        HAS_BIAS=bias is not None,
        BLOCK_M=TILE_M,
        BLOCK_N=TILE_N,
    )
    return out


def rescale_int32(
    acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype
) -> torch.Tensor:
    """(acc [M, N] * row_scale [M, 1]) * col_scale [N] + bias [N], cast to out_dtype (the int8 matmul epilogue)."""
    if acc.is_cuda:
        return rescale_int32_triton(acc, row_scale, col_scale, bias, out_dtype)
    return rescale_int32_reference(acc, row_scale, col_scale, bias, out_dtype)


# ---------------------------------------------------------------- int8 weight dequantization


def dequantize_weight_reference(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The official int8 dequantization (spec §8): codes and scale both cast to the compute dtype, multiplied."""
    return codes.to(dtype) * scale.to(dtype)[:, None]


@triton.jit
def _dequantize_kernel(
    codes_ptr, scale_ptr, out_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.float32)
    # The scale is rounded to the compute dtype first, as the official code does; the product of two values
    # that fit in 8 mantissa bits is exact in fp32, so one rounding remains, as in torch.
    scale = (
        tl.load(scale_ptr + rows, mask=rows < n_rows, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    )
    tl.store(out_ptr + offsets, (codes * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_weight_triton(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton version of dequantize_weight_reference, one pass over the codes."""
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)  # [out, in]
    grid = (triton.cdiv(rows, TILE_M), triton.cdiv(cols, TILE_N))
    _dequantize_kernel[grid](codes, scale.contiguous(), out, rows, cols, BLOCK_M=TILE_M, BLOCK_N=TILE_N)
    return out


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [out, in] int8 * scale [out] -> [out, in] in dtype, the official arithmetic."""
    if codes.is_cuda:
        return dequantize_weight_triton(codes, scale, dtype)
    return dequantize_weight_reference(codes, scale, dtype)


# ---------------------------------------------------------------- transpose of 1-byte codes


@triton.jit
def _transpose_bytes_kernel(src_ptr, dst_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(
        src_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :],
        mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :],
    )
    tl.store(
        dst_ptr + cols[:, None].to(tl.int64) * n_rows + rows[None, :],
        tl.trans(tile),
        mask=(cols < n_cols)[:, None] & (rows < n_rows)[None, :],
    )


def transposed_codes_triton(codes: torch.Tensor) -> torch.Tensor:
    """Triton version of transposed_codes: tiles through shared memory, so loads and stores stay coalesced."""
    src = codes.view(torch.uint8)
    rows, cols = src.shape
    dst = torch.empty(cols, rows, dtype=torch.uint8, device=codes.device)  # [in, out]
    grid = (triton.cdiv(rows, TRANSPOSE_BLOCK), triton.cdiv(cols, TRANSPOSE_BLOCK))
    _transpose_bytes_kernel[grid](src, dst, rows, cols, BLOCK=TRANSPOSE_BLOCK)
    return dst.view(codes.dtype)


def transposed_codes(codes: torch.Tensor) -> torch.Tensor:
    """The codes [out, in] as a contiguous [in, out] copy, for the backward's reduction over out."""
    if codes.is_cuda:
        # torch's byte transpose ran at ~290 GB/s on H100 (0.35 ms for the qkv codes, 1/10 of its matmul).
        return transposed_codes_triton(codes)
    return codes.view(torch.uint8).t().contiguous().view(codes.dtype)
