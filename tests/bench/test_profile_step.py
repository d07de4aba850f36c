"""bench/profile_step.py: kernel names land in the right category, and a CPU smoke run yields a breakdown and plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("kernel", "category"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("aten::_scaled_mm", "matmul"),
        ("_fwd_kernel", "attention"),
        ("_dkdv_kernel", "attention"),
        ("_pack_kernel", "attention"),
        ("_topk_kernel", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128", "attention"),
        ("_modulate_fwd_kernel", "fused elementwise"),
        ("_rope_kernel", "fused elementwise"),
        ("_quantize_rows_kernel", "fp8/int8 quantize"),
        (
            "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
            "copy / cast",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
            "elementwise / reduce",
        ),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "norm"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
        ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
        ("Memcpy DtoH (Device -> Pageable)", "copy / cast"),
        ("ProfilerStep#3", "other"),
    ],
)
def test_kernels_are_categorized_by_name(kernel, category):
    assert _load().categorize(kernel) == category


@pytest.mark.integration
def test_cpu_smoke_run_profiles_two_depths_and_plots(tmp_path, gloo_process_group):
    profile = _load()
    png, out = tmp_path / "breakdown.png", tmp_path / "profile.json"
    profile.main(["--device", "cpu", "--tiny", "--rows", "sdpa-bf16", "--depths", "1,2", "--latent", "3,8,8",
                  "--steps", "1", "--warmup", "1", "--png", str(png), "--json", str(out)])  # fmt: skip
    (result,) = json.loads(out.read_text())
    assert result["row"] == "sdpa-bf16" and result["depths"] == [1, 2]
    for totals in result["by_depth"]:
        # The step's matmuls and attention ran and were seen by the profiler at both depths.
        assert totals["matmul"] > 0 and totals["attention"] > 0, totals
    assert set(result["per_block_ms"]) == set(result["by_depth"][0]) | set(result["by_depth"][1])
    assert result["top_kernels_per_block_ms"] and result["floor_ms"]["matmul"] > 0
    assert png.stat().st_size > 5000
