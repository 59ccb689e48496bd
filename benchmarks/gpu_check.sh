#!/usr/bin/env bash
# The GPU check (issue 15.4): run it on a machine with one NVIDIA GPU, from the repository root,
# whenever one is at hand; it takes under 10 minutes. It prints:
#   1. the Franca step MFU in bf16 for ViT-L/14 and ViT-g/14 (benchmarks/train_step.py --mfu-only;
#      target >= 45%, reaching for 50%);
#   2. a Franca pretraining on Fashion-MNIST (preset franca_fmnist_gpu) with the teacher's
#      weighted kNN (k=20, T=0.07) on the full test split after every epoch: the step and time at
#      which it first passes raw pixels (84.6%) and the final kNN (target >= 90%).
# Record the figures, the date and the device in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MFU_LIMIT_S=240       # both architectures, several batch sizes each
PRETRAIN_LIMIT_S=330  # shards, training, evaluation
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
export DS_ACCELERATOR=cuda RAY_TRAIN_V2_ENABLED=1

echo "== 1. Franca step MFU (bf16)"
timeout "$MFU_LIMIT_S" "$PY" benchmarks/train_step.py --device cuda --mfu-only \
  || echo "MFU run stopped (exit $?)"

echo "== 2. Franca on Fashion-MNIST until kNN passes raw pixels"
RUNS=$(realpath "$OUT")/gpu_check_runs
rm -rf "$RUNS"
start=$(date +%s)
timeout "$PRETRAIN_LIMIT_S" "$PY" jobs/franca_g.py --preset franca_fmnist_gpu \
  "train.storage_path=$RUNS" || echo "pretraining stopped (exit $?)"
"$PY" benchmarks/gpu_check_report.py "$RUNS/franca-fmnist-gpu/report.json" \
  "$(( $(date +%s) - start ))"
