"""Batched greedy answers from a causal LM, prompted through the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def chat_prompt(tokenizer, question: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Q: {question}\nA:"  # base models without a template: the plain Q/A form


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    progress: bool = False,
    strip: bool = True,
) -> list[str]:
    """Greedy answers, cut at the end-of-sequence token or the first newline. Prompts are left-padded.

    ``strip=False`` keeps the answer's leading space, as a server returns it (the guard scores those tokens)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, unit="batch"):
        prompts = [chat_prompt(tokenizer, q) for q in questions[start : start + batch_size]]
        # The chat template already holds BOS where the model wants one.
        encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            text = text.split("\n", 1)[0]
            answers.append(text.strip() if strip else text)
    model.train(was_training)
    return answers
