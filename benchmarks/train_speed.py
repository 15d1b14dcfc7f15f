"""Training speed: our alignment epoch and unlearning step against a reference-style step, in one run.

Reference style (as the paper's code does it): every step runs the full model with all hidden states, and the
alignment step runs the text encoder on every window of the batch. Ours: a truncated forward up to the hook
layer, window targets and (during alignment) hidden states computed once and cached.

    python benchmarks/train_speed.py                       # CPU, the embedded world's model, hook layer = middle
    python benchmarks/train_speed.py --model random --layers 16 --hidden 1024 --device cuda --dtype bf16

Writes results/train_speed.json (or --out) and prints a table. Figures are measured on this run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from atu.align import AlignConfig, compute_hidden, new_predictor, prepare_alignment
from atu.hidden import freeze_above, hidden_at
from atu.loading import load_encoder
from atu.losses import alignment_loss, unlearning_loss
from atu.unlearn import forget_batches
from atu.windows import build_windows
from atu.world.generate import generate_world


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _model(args, texts):
    if args.model == "world":
        from atu.loading import load_lm
        from atu.world.build import build_world
        from atu.world.config import WorldConfig

        return load_lm(build_world(WorldConfig()).model_dir, device=args.device)
    from atu.world.config import LMConfig
    from atu.world.lm import build_model
    from atu.world.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, 2048)
    torch.manual_seed(0)
    cfg = LMConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=args.hidden * 4 * 2 // 3 // 64 * 64,
    )
    return build_model(cfg, tok).to(args.device).eval(), tok


def _timeit(fn, repeats: int, device: str) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["world", "random"], default="world")
    ap.add_argument("--layers", type=int, default=8, help="random model: decoder layers")
    ap.add_argument("--hidden", type=int, default=512, help="random model: width")
    ap.add_argument("--hook-layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--texts", type=int, default=128, help="texts in the alignment epoch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--unlearn-steps", type=int, default=30, help="unlearning steps timed per method, alternating")
    ap.add_argument("--repeats", type=int, default=2, help="alignment epochs timed per method")
    ap.add_argument("--encoder", default=None, help="sentence-transformers id or path (default: packaged MiniLM)")
    ap.add_argument("--out", type=Path, default=Path("results/train_speed.json"))
    args = ap.parse_args(argv)

    world = generate_world(0, 40, 0)
    texts = [r.text for r in world.corpus][: args.texts]
    model, tok = _model(args, [r.text for r in world.corpus])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(dtype)
    encoder = load_encoder(args.encoder, device=args.device)
    n_layers = model.config.num_hidden_layers
    layer = args.hook_layer or max(1, n_layers // 2)
    cfg = AlignConfig(hook_layer=layer, batch_size=args.batch_size, epochs=1, val_fraction=0.0)
    dim = encoder.get_embedding_dimension()
    predictor = new_predictor(cfg, model.config.hidden_size, dim).to(args.device)
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-3)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    batch_texts = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]

    # --- alignment: ours (one-time cache, then epochs on cached tensors) --------------------------------------
    _sync(args.device)
    t0 = time.perf_counter()
    data = prepare_alignment(texts, tok, encoder, cfg, progress=False)
    hidden = compute_hidden(model, data.train, layer)
    _sync(args.device)
    cache_seconds = time.perf_counter() - t0
    targets = data.targets.to(args.device)

    def ours_epoch():
        for b, h in zip(data.train, hidden):
            with autocast:
                pred = predictor(h.to(args.device), b.attention_mask.to(args.device))
                loss = alignment_loss(
                    pred, targets[b.target_index.clamp(min=0).to(args.device)], (b.target_index >= 0).to(args.device)
                )
            opt.zero_grad()
            loss.backward()
            opt.step()

    def reference_epoch():
        for chunk in batch_texts:
            wb = build_windows(chunk, tok, encoder.tokenizer, cfg.window, cfg.max_length)
            with torch.no_grad(), autocast:
                out = model(
                    input_ids=wb.input_ids.to(args.device),
                    attention_mask=wb.attention_mask.to(args.device),
                    output_hidden_states=True,
                )
                h = out.hidden_states[layer]
                emb = encoder.encode(wb.window_texts, convert_to_tensor=True, normalize_embeddings=True)
            tgt = emb.float()[wb.window_index.clamp(min=0).to(args.device)]
            with autocast:
                pred = predictor(h, wb.attention_mask.to(args.device))
                loss = alignment_loss(pred, tgt, wb.mask.to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()

    ours_epoch()  # warm-up
    align_ours = _timeit(ours_epoch, args.repeats, args.device)
    reference_epoch()
    align_ref = _timeit(reference_epoch, args.repeats, args.device)

    # --- unlearning step: truncated forward, layers <= L trainable vs full forward, whole model trainable -------
    vectors = F.normalize(torch.randn(1, dim), dim=-1).to(args.device)
    taus = torch.tensor([-1.0], device=args.device)  # every position active: the step does full work
    predictor.eval().requires_grad_(False)
    batch = forget_batches(texts[: args.batch_size], [[0]] * args.batch_size, 1, tok, 256, args.batch_size, 0)[0]
    ids, attn, pos = (
        batch.input_ids.to(args.device),
        batch.attention_mask.to(args.device),
        batch.position_mask.to(args.device),
    )
    params_ours = freeze_above(model, layer)
    opt_ours = torch.optim.SGD(params_ours, lr=1e-6)

    def ours_step():
        with autocast:
            loss = unlearning_loss(predictor(hidden_at(model, ids, attn, layer), attn), vectors, taus, pos)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    for p in model.parameters():
        p.requires_grad_(True)
    opt_ref = torch.optim.SGD(model.parameters(), lr=1e-6)

    def reference_step():
        with autocast:
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
            loss = unlearning_loss(predictor(out.hidden_states[layer], attn), vectors, taus, pos)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()

    def as_ours():
        freeze_above(model, layer)

    def as_reference():
        for p in model.parameters():
            p.requires_grad_(True)

    # Warm up both, then alternate them step by step, so that both see the same load on a shared machine.
    for setup, step in ((as_ours, ours_step), (as_reference, reference_step)):
        setup()
        step()
    unlearn_ours, unlearn_ref = [], []
    peaks: dict[str, float | None] = {"ours": None, "reference": None}  # GiB, the largest over the steps
    for _ in range(args.unlearn_steps):
        for name, setup, step, times in (
            ("ours", as_ours, ours_step, unlearn_ours),
            ("reference", as_reference, reference_step, unlearn_ref),
        ):
            setup()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times.extend(_timeit(step, 1, args.device))
            if args.device == "cuda":
                peaks[name] = max(peaks[name] or 0.0, torch.cuda.max_memory_allocated() / 2**30)

    med = statistics.median
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "model": {
            "kind": args.model,
            "layers": n_layers,
            "hidden": model.config.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "hook_layer": layer,
        "texts": len(texts),
        "batch_size": args.batch_size,
        "align_cache_seconds": cache_seconds,
        "align_epoch_seconds": {"ours": med(align_ours), "reference": med(align_ref)},
        "align_epoch_speedup": med(align_ref) / med(align_ours),
        "align_speedup_including_cache_over_1_epoch": med(align_ref) / (med(align_ours) + cache_seconds),
        "unlearn_step_seconds": {"ours": med(unlearn_ours), "reference": med(unlearn_ref)},
        "unlearn_step_speedup": med(unlearn_ref) / med(unlearn_ours),
        "peak_gpu_memory_gib": peaks,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"model {result['model']}  hook layer {layer}  device {result['device']} {args.dtype}")
    print(
        f"alignment epoch   ours {med(align_ours):8.3f}s  reference {med(align_ref):8.3f}s  "
        f"speedup {result['align_epoch_speedup']:.2f}x  (one-time cache {cache_seconds:.2f}s)"
    )
    print(
        f"unlearning step   ours {med(unlearn_ours):8.4f}s  reference {med(unlearn_ref):8.4f}s  "
        f"speedup {result['unlearn_step_speedup']:.2f}x"
    )
    if peaks["ours"] is not None:
        print(f"peak GPU memory   ours {peaks['ours']:.2f} GiB  reference {peaks['reference']:.2f} GiB")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
