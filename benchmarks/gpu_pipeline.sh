#!/usr/bin/env bash
# The whole job (align, unlearn, evaluate) of configs/world.yaml on one CUDA GPU, twice: full fine-tuning under bf16
# autocast, and LoRA with gradient checkpointing. Prints each run's table and criteria line and its wall time.
#   benchmarks/gpu_pipeline.sh OUT_DIR [ENCODER]
# ENCODER: a sentence-transformers path (default: the config's packaged all-MiniLM-L6-v2). ATU=... picks the command
# (default: atu). Runs without export, so the machine needs no FAISS; OUT_DIR/<run>/eval.json holds the figures.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [ENCODER]}
mkdir -p "$out"
edit=(-e 's#^device:.*#device: cuda#')
[[ $# -ge 2 ]] && edit+=(-e "s#^encoder:.*#encoder: $2#")
sed "${edit[@]}" -e "s#^out:.*#out: $out/full#" configs/world.yaml > "$out/full.yaml"
sed "${edit[@]}" -e "s#^out:.*#out: $out/lora_checkpointing#" \
    -e 's#^  method: full#  method: lora\n  gradient_checkpointing: true#' configs/world.yaml > "$out/lora_checkpointing.yaml"
for name in full lora_checkpointing; do
  echo "== $name"
  start=$(date +%s)
  ${ATU:-atu} run "$out/$name.yaml" --no-export
  echo "== $name: $(( $(date +%s) - start )) s"
  rm -rf "$out/$name/checkpoint"
done
