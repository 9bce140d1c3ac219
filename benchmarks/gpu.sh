#!/usr/bin/env bash
# The GPU benchmarks as one run: step rate, packed rate (K = 1..64) and the grid's cost from both.
#   bash benchmarks/gpu.sh [OUTDIR]        (default: bench-gpu/; python: $PYTHON or python3)
# Each part has its own time limit so that one slow part cannot take the others with it. Writes
# gpu.txt, step.jsonl, packed.jsonl, grid.jsonl and err.log to OUTDIR.
set -u
out=${1:-bench-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/gpu.txt"
timeout 120 "$py" benchmarks/step_rate.py --device cuda 2>>"$out/err.log" | tee "$out/step.jsonl"
timeout 300 "$py" benchmarks/packed_rate.py --device cuda --packs 1 2 4 8 16 32 64 \
    2>>"$out/err.log" | tee "$out/packed.jsonl"
timeout 120 "$py" benchmarks/grid_cost.py --device cuda --packed-rates "$out/packed.jsonl" \
    2>>"$out/err.log" | tee "$out/grid.jsonl"
tail -n 20 "$out/err.log"
