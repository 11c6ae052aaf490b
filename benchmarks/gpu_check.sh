#!/usr/bin/env bash
# The GPU figures of the Scale section in one go, on a machine with a CUDA GPU (about 10 minutes on one H100).
# Writes results/train_throughput_cuda_*.{csv,md}, results/demo_run_cuda.md and the logs under $OUT (default gpu_check/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

# CUDA tests (marked 'cuda'; skipped on machines without a GPU)
python -m pytest -q -m cuda tests/test_scale.py tests/test_latency_backends.py 2>&1 | tee "$OUT/cuda_tests.log"

# training throughput at bf16, 224 px: updp's loops vs a plain timm-style loop
for model in convnext_tiny deit_tiny_patch16_224; do
    (cd benchmarks && python train_throughput.py --device cuda --amp bf16 --model "$model" --img-size 224 \
        --batch 128 --steps 30 --workers 0 --name "train_throughput_cuda_$model") 2>&1 | grep -v "%|" \
        | tee "$OUT/throughput_$model.log"
done

# the demo config on the GPU (per-stage seconds in timings.json; compare with results/demo_run.md, CPU)
rm -rf "$OUT/demo_cuda"
updp run --config configs/demo.yaml --run "$OUT/demo_cuda" --device cuda 2>&1 | grep -v "%|" | tee "$OUT/demo_cuda.log"
cp "$OUT/demo_cuda/timings.json" "$OUT/demo_cuda_timings.json"

# torchrun on CUDA with NCCL: one process per GPU of this machine
rm -rf "$OUT/tiny_torchrun"
torchrun --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" -m updp run --config configs/tiny.yaml \
    --run-dir "$OUT/tiny_torchrun" --device cuda 2>&1 | grep -v "%|" | tee "$OUT/tiny_torchrun.log"

# Latency fidelity on the GPU: TensorRT engine checks (when tensorrt + pycuda are installed), the torch CUDA
# backend's table vs fitted model, and the merge planner's forms on CUDA (torch eager)
python -m pytest -q -m tensorrt tests/test_tensorrt_checks.py tests/test_latency_backends.py 2>&1 \
    | tee "$OUT/tensorrt_tests.log" || true
(cd benchmarks && python latency_predictor.py --models convnext_tiny mobilenetv2_100 --backend torch --device cuda \
    --name latency_predictor_cuda) 2>&1 | grep -v "%|" | tee "$OUT/latency_predictor_cuda.log" || true
(cd benchmarks && python merge_forms.py --targets torch --device cuda --name merge_forms_cuda) 2>&1 \
    | grep -v "%|" | tee "$OUT/merge_forms_cuda.log" || true
