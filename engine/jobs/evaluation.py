"""How well a model predicts held-out rows: the mean negative log-likelihood of their answer tokens (the
tokens a fine-tune learns: labels that are not -100), weighted by token rather than by batch, and its
perplexity. For a fine-tune's adapter and its base on the same rows, so "did it help?" has a number.

In job processes only (torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    loss: float  # nats per answer token
    tokens: int

    @property
    def perplexity(self) -> float | None:
        """exp(loss); None where it is too large to write down (a loss over ~700 nats)."""
        return math.exp(self.loss) if self.loss < 700 else None

    def as_dict(self) -> dict:
        return {"loss": round(self.loss, 6), "perplexity": None if self.perplexity is None else
                round(self.perplexity, 4)}


def evaluate(model, rows: list[dict], collate, batch_size: int = 8, stopping=None, progress=None) -> Evaluation:
    """`rows`: encoded rows (input_ids, labels); `collate` pads a list of them into a batch. `stopping`: a
    cancel between batches; `progress(rows done, rows)`: told after each batch."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                if stopping is not None:
                    stopping.check()
                batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]  # each position predicts the next token
                for row in range(logits.shape[0]):  # a row at a time in fp32: not a whole batch's vocabulary
                    total += float(F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100,
                                                   reduction="sum"))
                tokens += int((targets != -100).sum())
                if progress is not None:
                    progress(min(start + batch_size, len(rows)), len(rows))
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError("the rows have no answer tokens to evaluate")
    return Evaluation(total / tokens, tokens)
