#!/usr/bin/env bash
# Ranking fidelity with a ground truth trained on a CUDA GPU (about 6 minutes on one H100): convnext_atto on the
# CIFAR-10 subset, the baseline trained 60 epochs and each of the 12 plans 12 epochs (the CPU run: 12 and 6).
# Writes results/ranking_fidelity_cifar10_gpu.{csv,md} and its _plans.csv; the run directory caches every stage.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-../../shared/data/cifar10}
python ranking_fidelity.py --data "$DATA" --run runs/bench_rank_cifar10_gpu --plans 12 --epochs 12 --pool 512 \
    --model convnext_atto --img-size 32 --baseline-epochs 60 --supernet-epochs 10 --calib-images 128 \
    --eval-images 250 --supernets uniform --noise-seeds 2 --name ranking_fidelity_cifar10_gpu
