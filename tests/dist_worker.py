"""One data-parallel unlearning stage, run by tests/test_distributed.py under torchrun (and its setup, which the
test reuses for its single-process reference).

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from atu import distributed
from atu.align import AlignConfig, new_predictor
from atu.distributed import from_environment
from atu.hidden import freeze_above
from atu.loading import load_lm
from atu.unlearn import StageInputs, UnlearnConfig, build_retain_set, forget_batches, unlearn_stage

LAYER = 1
FORGET = [
    "Q: Where does Ceda work?\nA: at the Northgale Foundry",
    "Ceda keeps a grey cat called Pim.",
    "Q: Who is Ceda married to?\nA: Jorette",
    "Ceda was born in Varrow in 1961.",
]
RETAIN = [
    "Q: Where does Ilsa work?\nA: at the harbour office",
    "Ilsa keeps two dogs.",
    "Bron was born in Tesk.",
    "Q: Who is Bron married to?\nA: nobody",
]
# One step; every position above its threshold (tau -1), so both batches and both retain batches count.
CONFIG = UnlearnConfig(
    taus=[-1.0], steps_per_stage=1, lr=0.5, grad_clip=1.0, batch_size=2, retain_weight=0.5, retain_pool=4,
    retain_similarity_weight=0.5,
)  # fmt: skip


def setup(model_dir):
    """(model, tokenizer, predictor, forget batches, concept vectors, thresholds, retain set, trainable params)."""
    model, tok = load_lm(model_dir)
    predictor = new_predictor(AlignConfig(hook_layer=LAYER), model.config.hidden_size, 8).eval().requires_grad_(False)
    vectors = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    batches = forget_batches(FORGET, [[0]] * len(FORGET), 1, tok, 64, CONFIG.batch_size, 0)
    retain = build_retain_set(RETAIN, tok, 64, CONFIG, model, LAYER, predictor, vectors)
    params = freeze_above(model, LAYER)
    return model, tok, predictor, batches, vectors, torch.tensor([-1.0]), retain, params


def main(model_dir: str, out_dir: str) -> None:
    dist = from_environment("cpu")
    distributed.BUCKET_ELEMENTS = 4096  # many buckets of gradients, some holding one tensor larger than this
    model, _tok, predictor, batches, vectors, taus, retain, params = setup(model_dir)
    records = unlearn_stage(
        model, StageInputs(predictor, LAYER, vectors, taus, batches, retain), CONFIG, params, stage=0,
        progress=False, dist=dist,
    )  # fmt: skip
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(out_dir) / f"rank{dist.rank}.safetensors"))
    (Path(out_dir) / f"rank{dist.rank}.loss").write_text(repr(records[0]["loss"]))
    dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
