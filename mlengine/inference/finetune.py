"""Fine-tuning the sentence encoder together with a classifier head.

The encoder (all-MiniLM-L6-v2, fp32 on the training device) and a linear head on its
mean-pooled, L2-normalised sentence vector are trained end to end with class-weighted
cross-entropy (weights inversely proportional to class frequency, for macro-averaged
metrics), AdamW (encoder learning rate ``lr``, head 1e-3, weight decay 0.01) and a
linear warm-up over the first 10% of steps followed by linear decay, as in Devlin et
al., "BERT" (NAACL 2019), section 5. The normalised vector is scaled by ``SCALE``
before the head (a temperature: unit vectors give logits too flat to learn from).

On TweetEval sentiment (2,000 ``val`` tweets, 3 epochs, 2 CPU cores: about 150 s) it
measured 0.671 macro-recall on ``test_public`` against 0.627 for logistic regression on
the frozen vectors (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mlengine.inference import encoder, heads

SCALE = 10.0
HEAD_LR = 1e-3
MAX_TOKENS = 128
"""Tweets are short: training truncates at 128 tokens to bound a batch's memory."""


def finetune(
    the_task: heads.Task,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, heads.Head]:
    """Fine-tune a copy of the encoder with a head on ``texts``/``labels`` (label ids).

    Returns ``(model, head)``: the transformers model (eval mode, fp32, CPU) and the
    ``heads.Head`` to apply to its normalised vectors. ``progress(texts)`` is called
    after each step. Deterministic for a given ``seed`` on one machine.

    Raises:
        ValueError: no texts, or ``epochs``/``batch_size`` below 1.
    """
    import torch

    if not texts or epochs < 1 or batch_size < 1:
        raise ValueError("fine-tuning needs texts, epochs ≥ 1 and batch_size ≥ 1")
    torch.manual_seed(seed)
    device = "cuda" if encoder.pick_device() == "cuda" else "cpu"
    tokenizer = encoder.load_tokenizer()
    model = encoder.load_model(device, torch.float32)
    model.train()
    head = torch.nn.Linear(encoder.DIMENSIONS, len(the_task.labels)).to(device)
    counts = np.bincount(np.asarray(labels), minlength=len(the_task.labels)).astype(np.float64)
    weight = torch.tensor(
        [len(labels) / (len(counts) * c) if c else 0.0 for c in counts],
        dtype=torch.float32,
        device=device,
    )
    optimizer = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": lr},
            {"params": head.parameters(), "lr": HEAD_LR},
        ],
        weight_decay=0.01,
    )
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    warmup = max(1.0, 0.1 * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (steps - step) / steps)
    )
    label_tensor = torch.tensor(list(labels), device=device)
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(texts))
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            ).to(device)
            vectors = encoder.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(
                head(vectors * SCALE),
                label_tensor[torch.as_tensor(index, device=device)],
                weight=weight,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if progress is not None:
                progress(len(index))
    model.eval()
    model.to("cpu")
    return model, heads.Head(
        labels=the_task.labels,
        weights=head.weight.detach().cpu().numpy() * SCALE,
        bias=head.bias.detach().cpu().numpy(),
    )
