#!/usr/bin/env bash
# The whole job (align, unlearn, evaluate) of configs/world.yaml on one CUDA GPU, twice: full fine-tuning under bf16
# autocast, and LoRA with gradient checkpointing. Prints each run's table and criteria line and its wall time.
#   benchmarks/gpu_pipeline.sh OUT_DIR [ENCODER]
# ENCODER: a sentence-transformers path (default: the config's packaged all-MiniLM-L6-v2). ATU=... picks the command
# (default: atu). Runs without export, so the machine needs no FAISS; OUT_DIR/<run>/eval.json holds the figures.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [ENCODER]}
mkdir -p "$out"
common=(--set device=cuda)
[[ $# -ge 2 ]] && common+=(--set "encoder=$2")
declare -A variant=(
  [full]=""
  [lora_checkpointing]="--set unlearn.method=lora --set unlearn.gradient_checkpointing=true"
)
for name in full lora_checkpointing; do
  echo "== $name"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the variant's options are meant to split into words
  ${ATU:-atu} run configs/world.yaml --out "$out/$name" "${common[@]}" ${variant[$name]} --no-export
  echo "== $name: $(( $(date +%s) - start )) s"
  rm -rf "$out/$name/checkpoint"
done
