"""Training steps with each batch run in groups of similar length against the whole padded batch, in one run.

Every training loss of the package (ATU's hinge and retain term, the baselines GD and NPO, relearning's next-token
loss) runs its batch's rows in groups of similar length (`atu.unpad.by_length`). This script times one forward and
backward of each loss both ways on the same batches, alternating them step by step so that both see the same load,
and checks that they agree: the loss and every gradient, whole against grouped.

    python benchmarks/length_groups.py                 # the embedded world, its first three people forgotten
    python benchmarks/length_groups.py --people 1 --steps 10
    python benchmarks/length_groups.py --device cuda --out OUT_DIR/length_groups_cuda.json   # on a GPU

Writes results/length_groups.json (or --out) and prints a table. Figures are measured on this run only.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from atu.align import AlignConfig, new_predictor
from atu.baselines import BaselineConfig, objective, reference_logprobs
from atu.hidden import freeze_above, hidden_at
from atu.loading import load_lm
from atu.losses import state_drift_loss, unlearning_loss
from atu.texts import content_mask, lm_loss, text_batches
from atu.unpad import by_length, whole_batches
from atu.world.build import build_world
from atu.world.config import WorldConfig


def batches(texts: list[str], tokenizer, size: int, seed: int, device: str = "cpu") -> list[tuple]:
    """Shuffled right-padded (input_ids, attention_mask) batches, as the training loops draw them."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    return [(ids.to(device), attn.to(device)) for ids, attn in text_batches(texts, tokenizer, 256, size)]


def losses(model, predictor, layer: int, bos: int, retain: list, forget: list) -> dict:
    """name -> loss(forget batch, retain batch): each training loss of the package, at the model's weights.
    What a run takes once is taken now: the ``retain`` batches' layer-``layer`` states, and NPO's reference
    log-likelihoods of the ``forget`` batches."""
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        states = {ids.data_ptr(): hidden_at(ref, ids, attn, layer) for ids, attn in retain}
    refs = {b[0].data_ptr(): logp for b, logp in zip(forget, reference_logprobs(ref, forget))}
    dim = predictor.config.output_dim
    device = next(model.parameters()).device
    vectors = F.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(0)), dim=-1).to(device)
    taus = torch.tensor([-1.0], device=device)  # every position above it: the hinge does its full work

    def atu(fb, rb):
        (ids, attn), (r_ids, r_attn) = fb, rb
        pred = by_length(lambda i, a: predictor(hidden_at(model, i, a, layer), a), ids, attn)
        hinge = unlearning_loss(pred, vectors, taus, content_mask(ids, attn, bos))
        reference = states[r_ids.data_ptr()]
        hidden = by_length(lambda i, a: hidden_at(model, i, a, layer), r_ids, r_attn)
        # + 0.01: the model is still the reference, and a drift of zero has no gradient to time
        return hinge + state_drift_loss(hidden + 0.01, reference, content_mask(r_ids, r_attn, bos))

    def baseline(method):
        cfg = BaselineConfig(method=method, hook_layer=layer)
        return lambda fb, rb: objective(model, refs[fb[0].data_ptr()], fb, rb, cfg)[0]

    return {"atu": atu, "gd": baseline("gd"), "npo": baseline("npo"), "relearn": lambda fb, rb: lm_loss(model, *fb)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(fn, fb, rb, params) -> tuple[float, float, list[torch.Tensor]]:
    """(seconds, loss, gradients) of one forward and backward."""
    for p in params:
        p.grad = None
    device = params[0].device
    _sync(device)
    clock = time.perf_counter()
    loss = fn(fb, rb)
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - clock
    return seconds, float(loss.detach()), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def measure(fn, pairs, params) -> dict:
    """Both ways on every (forget, retain) batch pair, alternating; their times and how far they differ."""
    one_step(fn, *pairs[0], params)  # warm-up
    times = {"whole": [], "grouped": []}
    loss_diff = grad_diff = 0.0
    for fb, rb in pairs:
        with whole_batches():
            t_whole, l_whole, g_whole = one_step(fn, fb, rb, params)
        t_grouped, l_grouped, g_grouped = one_step(fn, fb, rb, params)
        times["whole"].append(t_whole)
        times["grouped"].append(t_grouped)
        loss_diff = max(loss_diff, abs(l_whole - l_grouped) / max(abs(l_whole), 1e-12))
        scale = max(float(g.abs().max()) for g in g_whole) or 1.0
        grad_diff = max(grad_diff, max(float((a - b).abs().max()) for a, b in zip(g_whole, g_grouped)) / scale)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "seconds_whole": med["whole"], "seconds_grouped": med["grouped"], "speedup": med["whole"] / med["grouped"],
        "loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff,
    }  # fmt: skip


def efficiency(batch_list) -> float:
    """Real tokens over padded positions."""
    return sum(int(a.sum()) for _, a in batch_list) / sum(a.numel() for _, a in batch_list)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=3, help="the world's first N people are the forget texts")
    ap.add_argument("--steps", type=int, default=20, help="batch pairs timed per loss, each both ways")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the benchmarks' processes use one each)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--out", type=Path, default=Path("results/length_groups.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = build_world(WorldConfig())
    model, tok = load_lm(world.model_dir, device=args.device)
    corpus = world.corpus()
    names = world.concepts().names()[: args.people]
    forget = batches([r.text for r in corpus if r.concept in names], tok, args.batch_size, 0, args.device)
    retain = batches([r.text for r in corpus if r.concept not in names], tok, args.batch_size, 1, args.device)
    pairs = [(forget[i % len(forget)], retain[i % len(retain)]) for i in range(args.steps)]
    layer = max(1, model.config.num_hidden_layers // 2)
    predictor = new_predictor(AlignConfig(), model.config.hidden_size, 384).to(args.device).eval()
    predictor.requires_grad_(False)
    model.train()
    rows = {}
    for name, fn in losses(model, predictor, layer, tok.bos_token_id, retain, forget).items():
        if name == "relearn":  # the attacker trains every weight; the unlearning methods the hook layer's and below
            params = list(model.requires_grad_(True).parameters())
        else:
            params = freeze_above(model, layer)
        rows[name] = measure(fn, pairs, params)
        print(f"{name:8s} whole {rows[name]['seconds_whole']:.3f} s  grouped {rows[name]['seconds_grouped']:.3f} s  "
              f"speedup {rows[name]['speedup']:.2f}x  loss diff {rows[name]['loss_rel_diff']:.1e}  "
              f"grad diff {rows[name]['grad_rel_diff']:.1e}", flush=True)  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "people": args.people, "batch_size": args.batch_size,
        "steps": args.steps, "threads": args.threads, "hook_layer": layer,
        "real_token_share": {"forget": efficiency(forget), "retain": efficiency(retain)},
        "losses": rows, "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }  # fmt: skip
    print(f"real tokens per padded position: forget {efficiency(forget):.2f}, retain {efficiency(retain):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
