#!/usr/bin/env bash
# Deployment on one CUDA GPU, end to end: a 0.5B-parameter Llama (random weights in a real architecture, the embedded
# world's tokenizer and corpus) through `atu run` (bf16, hook layer 29 of 32, the placed schedule), then its export
# served by vLLM with the CUDA defaults behind the guard, with guarded/bare throughput from vLLM's own serving
# benchmark (benchmarks/serving.py: bare and guarded passes alternate against one server).
#   benchmarks/gpu_deploy.sh OUT_DIR
# Needs the package installed with the gpu extra (vLLM 0.32.x, faiss). Prints the run's table and the throughput
# table; OUT_DIR/run/eval.json and OUT_DIR/serving.json hold the figures. Not yet run: no GPU machine with vLLM was
# available when it was written.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
world=$(python -c 'from atu.world.build import build_world; from atu.world.config import WorldConfig; print(build_world(WorldConfig(), progress=False).root)')
python - "$world" "$out/model" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

world, dest = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(world / "model")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=32,
                  num_attention_heads=16, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
model.save_pretrained(dest)
tok.save_pretrained(dest)
EOF
start=$(date +%s)
atu run configs/default.yaml --out "$out/run" --set device=cuda --set "model=$out/model" \
  --set "data.corpus=$world/corpus.jsonl" --set "data.concepts=$world/concepts.yaml" \
  --set "data.validation=$world/heldout.jsonl" --set "data.probes=$world/probes.jsonl" \
  --set align.hook_layer=29
echo "== atu run: $(( $(date +%s) - start )) s"
python benchmarks/serving.py --export "$out/run/export" --concurrency 1 8 32 --out "$out"
