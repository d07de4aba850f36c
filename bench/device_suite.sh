#!/usr/bin/env bash
# The GPU checks and benchmarks of the device machine in one call (see docs/PERFORMANCE.md for how to run it):
#   source .whl/activate.sh && bash bench/device_suite.sh "$OUT" [parts...]
# parts: tests attention linear step vae sampler fused profile sizes (default: all), scaling (multi-GPU only). Each part has its own time limit so one slow part
# cannot starve the others; every log lands in the output folder.
set -u
out=${1:?output folder}; shift
parts=${*:-tests attention linear step vae sampler fused profile sizes}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests) { timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/model
             timeout 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_model_bsa.py; } > "$out/tests.txt" 2>&1 ;;
    attention) timeout 240 python3 bench/attention.py --shapes train,704x24 --out "$out" > "$out/attention.txt" 2>&1 ;;
    linear) timeout 120 python3 bench/linear.py --parts --json "$out/linear.json" > "$out/linear.txt" 2>&1 ;;
    step) { timeout 300 python3 bench/step.py --json "$out/step.json" \
              --rows sdpa-bf16,sdpa-fp8,bsa-bf16,bsa-fp8,bsa-fp8-ckpt2,bsa-bf16-zero3
            timeout 200 python3 bench/step.py --json "$out/step48.json" --rows bsa-fp8,bsa-fp8-saveattn --depths 48 \
              --steps 3 --warmup 1; } > "$out/step.txt" 2>&1 ;;
    vae) timeout 120 python3 bench/vae.py --frames 93 --height 480 --width 832 --repeats 3 > "$out/vae.txt" 2>&1 ;;
    sampler) timeout 180 python3 bench/sampler.py > "$out/sampler.txt" 2>&1 ;;
    fused) { timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_block.py
             timeout 90 python3 bench/fused_block.py --out "$out"; } > "$out/fused.txt" 2>&1 ;;
    profile) { timeout 240 python3 bench/profile_step.py --rows bsa-fp8,sdpa-bf16 --png "$out/step_breakdown.png" \
                 --json "$out/profile.json"
               timeout 150 python3 bench/profile_step.py --rows bsa-fp8 --fused --png "$out/step_breakdown_fused.png" \
                 --json "$out/profile_fused.json"; } > "$out/profile.txt" 2>&1 ;;
    # The largest clips, measured at full depth under a 79 GiB allocator cap (what an 80 GB H100 leaves): 720x1280x93
    # (latent 24x90x160), then 480x832 at 253, 261 and 269 frames (latent T 64, 66, 68; 269 runs out of memory);
    # 261 frames again without the kept K/V copies of the recompute (gradient_checkpointing_keep_kv_copies).
    sizes) { for latent in 24,90,160 64,60,104 66,60,104 68,60,104; do
               timeout 150 python3 bench/step.py --rows bsa-fp8 --latent $latent --depths 48 --steps 1 --warmup 1 \
                 --memory-cap-gib 79 --json "$out/size_${latent//,/x}.json"
             done
             timeout 150 python3 bench/step.py --rows bsa-fp8 --latent 66,60,104 --depths 48 --steps 1 --warmup 1 \
               --memory-cap-gib 79 --no-keep-kv-copies --json "$out/size_66x60x104_repack.json"; } > "$out/sizes.txt" 2>&1 ;;
    # Several GPUs of one host (nvidia-h200-x2/x4/x8): Ray Train + DeepSpeed over NCCL, 1..N workers. Not in the
    # default parts: pass `scaling` explicitly on a multi-GPU kind.
    scaling) gpus=$(nvidia-smi -L | wc -l); counts=$(python3 -c "print(','.join(str(n) for n in (1, 2, 4, 8) if n <= $gpus))")
             { timeout 420 python3 bench/scaling.py --workers "$counts" --zero 2,3 --depth 48 --precision fp8 \
                 --attention bsa --steps 4 --warmup 2 --json "$out/scaling.json"
               timeout 150 python3 bench/scaling.py --workers "$gpus" --depth 2 --equivalence --kill-at 3 \
                 --steps 3 --warmup 1 --json "$out/scaling_checks.json"; } > "$out/scaling.txt" 2>&1 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
  tail -25 "$out/$part.txt"
done
