"""Data-parallel alignment, run by tests/test_distributed.py under torchrun (and its setup, which the test reuses
for its single-process reference).

    torchrun --nproc_per_node 2 tests/align_worker.py WORLD_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from atu import formats
from atu.align import AlignConfig, alignment_hidden, new_predictor, prepare_alignment, train_predictor
from atu.distributed import SINGLE, from_environment
from atu.loading import load_encoder, load_lm

# 23 texts: 4 held out (one batch), 19 to train on in 5 batches, so the two processes get 3 and 2 of them.
CONFIG = AlignConfig(
    hook_layer=1, window=4, batch_size=4, epochs=2, val_fraction=0.2, d_model=32, n_layers=1, n_heads=2
)
N_TEXTS = 23


def setup(world_dir, dist=SINGLE):
    """(model, alignment data, a new predictor) for the first ``N_TEXTS`` texts of the world's corpus."""
    world_dir = Path(world_dir)
    model, tok = load_lm(world_dir / "model")
    encoder = load_encoder()
    texts = [r.text for r in formats.read_corpus(world_dir / "corpus.jsonl")[:N_TEXTS]]
    data = prepare_alignment(texts, tok, encoder, CONFIG, progress=False, dist=dist)
    predictor = new_predictor(CONFIG, model.config.hidden_size, encoder.get_embedding_dimension())
    return model, data, predictor


def main(world_dir: str, out_dir: str) -> None:
    dist = from_environment("cpu")
    model, data, predictor = setup(world_dir, dist)
    train_h, val_h = alignment_hidden(model, data, CONFIG.hook_layer, dist)
    metrics = train_predictor(
        predictor, data, train_h, CONFIG.epochs, CONFIG, val_hidden=val_h, progress=False, dist=dist
    )
    out = Path(out_dir)
    save_file({**predictor.state_dict(), "targets": data.targets}, str(out / f"rank{dist.rank}.safetensors"))
    (out / f"rank{dist.rank}.json").write_text(json.dumps({**metrics, "cached": len(train_h)}))
    dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
