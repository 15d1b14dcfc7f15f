"""Truncated forward: the hidden states after the first ``L`` decoder layers, without running the rest.

Both losses of the method read only layer ``L``, so the layers above it, the final norm and the LM head are
never run. A forward hook on decoder layer ``L - 1`` captures its output and stops the forward pass by raising;
the autograd graph up to that point is intact, so gradients flow into layers ``0..L-1``. This works for any
architecture whose decoder layers form one ``nn.ModuleList`` (Llama, Mistral, Qwen, Phi-3, GPT-2, GPT-NeoX, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from atu.errors import ConfigError

# Where common Hugging Face causal LMs keep their decoder layers (peft wrappers are unwrapped first).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


class _ReachedHookLayer(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (PeftModel -> LoraModel -> model), else ``model`` itself."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency, but unwrapping does not need it
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a causal LM (possibly wrapped by peft)."""
    inner = _unwrap(model)
    for path in _LAYER_PATHS:
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(
        f"cannot find the decoder layers of {type(inner).__name__} (looked for {', '.join(_LAYER_PATHS)}); "
        "this architecture is not supported yet"
    )


def check_hook_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n:
        raise ConfigError(f"hook layer must be an integer in [1, {n}] for this {n}-layer model, got {layer!r}")
    return layer


def hidden_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int, past_key_values=None
) -> torch.Tensor:
    """Output of decoder layer ``layer`` (1-based: ``layer`` decoder layers applied), shape (B, T, hidden).

    For ``layer < num_layers`` this equals transformers' ``hidden_states[layer]``. Gradients flow when the
    caller has grad enabled. With ``past_key_values`` (a transformers cache of the sequence's first tokens)
    ``input_ids`` are the tokens that follow them, ``attention_mask`` covers the whole sequence, and the cache is
    extended with the new tokens' keys and values in the layers below the hook layer.
    """
    layers = decoder_layers(model)
    check_hook_layer(model, layer)

    def stop(_module, _args, output):
        raise _ReachedHookLayer(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer - 1].register_forward_hook(stop)
    try:
        if past_key_values is None:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, use_cache=True)
    except _ReachedHookLayer as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError("the forward pass finished without reaching the hook layer")  # pragma: no cover


def freeze_above(model: nn.Module, layer: int, *, train_embeddings: bool = False) -> list[nn.Parameter]:
    """Freeze everything but decoder layers ``0..layer-1`` (and the input embeddings if asked).

    Returns the parameters left trainable. Layers above the hook layer cannot change either loss.
    """
    layers = decoder_layers(model)
    check_hook_layer(model, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for block in layers[:layer] for p in block.parameters()]
    if train_embeddings:
        trainable += list(_unwrap(model).get_input_embeddings().parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing (recompute each decoder layer's activations in the backward pass).

    Non-reentrant, always: ``hidden_at`` stops the forward by raising inside the hook layer, and a reentrant
    checkpoint runs the layer under no_grad, so the state it hands back has no graph and nothing would train
    (transformers 4.x defaults to reentrant)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model: nn.Module, layer: int, rank: int, alpha: int) -> nn.Module:
    """Freeze ``model`` and wrap it with LoRA adapters on every linear module of decoder layers ``0..layer-1``.

    Modules are named in full: peft rejects ``target_modules="all-linear"`` together with ``layers_to_transform``.
    """
    from peft import LoraConfig, get_peft_model

    check_hook_layer(model, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    lower = {id(m) for block in decoder_layers(model)[:layer] for m in block.modules()}
    targets = [n for n, m in model.named_modules() if id(m) in lower and isinstance(m, nn.Linear)]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
