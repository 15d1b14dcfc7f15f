"""Quantization-aware unlearning: the unlearning steps and the schedule's signals see the model through the
round-to-nearest quantizer it will be served with.

An unlearning update smaller than one quantization step leaves a weight in the bucket it was in, so the quantized
unlearned model can equal the quantized original. Seen through the quantizer (`quantized_view`), the hinge stays
active until enough weights change bucket for the quantized model's states to fall under their thresholds; the
straight-through estimator passes its gradient to the full-precision weights, which are what is saved and exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import nn

from atu.attack.quantize import fake_quantize_ste, quantizable_linears


@contextmanager
def quantized_view(model: nn.Module, bits: int | None, group_size: int | None = None) -> Iterator[nn.Module]:
    """Within the block, every decoder-layer Linear of ``model`` computes with its RTN-quantized weight (forward) and
    passes gradients straight to its full-precision weight (backward). ``bits`` None: the model as it is."""
    if bits is None:
        yield model
        return
    patched = []
    for _, lin in quantizable_linears(model):

        def forward(x, lin=lin):
            return F.linear(x, fake_quantize_ste(lin.weight, bits, group_size), lin.bias)

        lin.forward = forward  # an instance attribute: shadows the class's forward until it is deleted
        patched.append(lin)
    try:
        yield model
    finally:
        for lin in patched:
            del lin.forward
