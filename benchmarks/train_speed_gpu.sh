#!/usr/bin/env bash
# benchmarks/train_speed.py on one CUDA GPU in bf16, on three locally built models:
# the embedded world's model (ATU_CACHE must hold its build), and two randomly initialised Llama-style
# models, 16 x 1024 and 32 x 2048 (1.6B parameters), with the hook layer at the middle layer.
#   benchmarks/train_speed_gpu.sh OUT_DIR [ENCODER]
# ENCODER: a sentence-transformers path (default: the packaged all-MiniLM-L6-v2).
# Writes OUT_DIR/train_speed_{world,16x1024,32x2048}.json and prints each table; then benchmarks/length_groups.py
# (batches run by length against whole, on the world's model) to OUT_DIR/length_groups_cuda.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [ENCODER]}
enc=()
[[ $# -ge 2 ]] && enc=(--encoder "$2")
mkdir -p "$out"
py=${PYTHON:-python}
run() {  # name, then train_speed.py arguments
  local name=$1; shift
  echo "== $name"
  "$py" benchmarks/train_speed.py --device cuda --dtype bf16 "${enc[@]}" --out "$out/train_speed_$name.json" "$@"
}
run world --model world
run 16x1024 --model random --layers 16 --hidden 1024
run 32x2048 --model random --layers 32 --hidden 2048
echo "== length groups"
"$py" benchmarks/length_groups.py --device cuda --out "$out/length_groups_cuda.json"
