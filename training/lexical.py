"""A lexical branch next to the encoder: a bag of word pieces -> a linear layer (fastText style).

Why: the transformer's mean-pooled sentence vector spreads a note's findings over 384 numbers. A
class that is told apart by one specific term ("ectopia lentis", "MRCP") needs many epochs before
the encoder has carved out room for it. A bag-of-word-pieces classifier learns such per-term
evidence in seconds, and it makes different mistakes from the encoder. The two are trained apart
(the lexical one fits its training set almost perfectly, so trained jointly it would leave the
encoder nothing to learn) and their logits are added, the lexical ones times a weight chosen on
held-out-phrasing text: a product of experts inside one ONNX graph.

It reads the same ``input_ids`` as the encoder (the model's own tokenizer), so the serving contract
(``input_ids``, ``attention_mask`` -> ``logits``) and the runtime do not change. int8 dynamic
quantization covers its embedding table (a ``Gather``) and its linear layer.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.evaluate import macro_f1
from training.finetune import lr_factor
from training.model import collate

log = logging.getLogger("training")


class LexicalHead(nn.Module):
    """logits = out(sum_t E[input_ids_t] / sqrt(length)); during training each token is dropped with
    probability ``token_dropout`` (notes written by others leave out or reword some terms).

    ``mix`` is the weight the encoder classifier multiplies these logits by (a buffer, so it is
    saved, exported and checksummed with the model)."""

    def __init__(self, vocab_size: int, dim: int, num_labels: int, token_dropout: float = 0.25):
        super().__init__()
        if vocab_size < 1 or dim < 1 or num_labels < 1:
            raise ValueError(f"vocab_size, dim and num_labels must be >= 1, got {vocab_size}, {dim}, {num_labels}")
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"token_dropout must be in [0, 1), got {token_dropout}")
        # sparse gradients: a batch touches a few hundred of the ~30k rows; a dense Adam step over the
        # whole table would cost more than the rest of the step
        self.embedding = nn.Embedding(vocab_size, dim, sparse=True)
        self.out = nn.Linear(dim, num_labels)
        self.token_dropout = float(token_dropout)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.register_buffer("mix", torch.tensor(1.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(self.embedding.weight.dtype)
        length = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        if self.training and self.token_dropout > 0:
            mask = mask * (torch.rand_like(mask) >= self.token_dropout).to(mask.dtype)
        bag = (self.embedding(input_ids) * mask.unsqueeze(-1)).sum(dim=1) / length.sqrt()
        return self.out(bag)


@dataclass
class LexicalConfig:
    dim: int = 256
    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 32
    token_dropout: float = 0.3
    seed: int = 0
    progress: bool = True


@dataclass
class LexicalResult:
    epochs: int
    steps: int
    seconds: float
    val_accuracy: list[float]


def train_lexical(
    head: LexicalHead,
    train_ids: Sequence[Sequence[int]],
    train_labels: Sequence[int],
    val_ids: Sequence[Sequence[int]],
    val_labels: Sequence[int],
    pad_id: int,
    cfg: LexicalConfig,
) -> LexicalResult:
    """Adam (sparse for the embedding table, no weight decay: token dropout regularises) with warmup + cosine decay over ``cfg.epochs``
    passes; validation accuracy after each pass. Returns the training summary."""
    from tqdm.auto import tqdm

    if len(train_ids) != len(train_labels) or not len(train_ids):
        raise ValueError(f"train_lexical needs as many labels as texts (got {len(train_ids)} texts, "
                         f"{len(train_labels)} labels), and at least one")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    optimizers = [torch.optim.SparseAdam([head.embedding.weight], lr=cfg.lr),
                  torch.optim.AdamW(head.out.parameters(), lr=cfg.lr, weight_decay=0.0)]
    warmup = max(1, int(0.06 * total))
    t0, step, val_acc = time.perf_counter(), 0, []
    bar = tqdm(total=total, desc="lexical branch", disable=not cfg.progress, dynamic_ncols=True)
    for _ in range(cfg.epochs):
        head.train()
        order = list(range(len(train_ids)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, total, warmup, 0.02)
            loss = F.cross_entropy(head(*collate([train_ids[i] for i in batch], pad_id)), y[batch])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if len(val_ids):
            pred = lexical_logits(head, val_ids, pad_id).argmax(1)
            val_acc.append(float((pred == np.asarray(val_labels)).mean()))
            log.info("lexical branch: epoch %d, val accuracy %.4f", len(val_acc), val_acc[-1])
    bar.close()
    head.eval()
    return LexicalResult(cfg.epochs, step, time.perf_counter() - t0, val_acc)


@torch.no_grad()
def lexical_logits(head: LexicalHead, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 256) -> np.ndarray:

    was_training = head.training
    head.eval()
    out = [head(*collate(ids[i : i + batch_size], pad_id)).numpy() for i in range(0, len(ids), batch_size)]
    head.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, head.out.out_features), dtype=np.float32)


# 0 (encoder only) and 1/8 .. 32 (lexical dominant): only the ratio matters for the ranking, and
# temperature scaling fixes the scale afterwards
MIX_GRID = (0.0, *np.round(np.geomspace(0.125, 32.0, 33), 4))


def choose_mix(encoder_logits: np.ndarray, lex_logits: np.ndarray, labels: Sequence[int],
               grid: Sequence[float] = MIX_GRID) -> tuple[float, dict[float, float]]:
    """The weight w of ``encoder_logits + w * lex_logits`` with the best macro-F1 on ``labels`` (ties:
    the smaller w). Returns (w, {w: macro-F1})."""

    y = np.asarray(labels)
    scores = {float(w): macro_f1(y, (encoder_logits + w * lex_logits).argmax(1)) for w in grid}
    best = max(scores, key=lambda w: (round(scores[w], 6), -w))
    return best, scores


__all__ = ["LexicalConfig", "LexicalHead", "LexicalResult", "choose_mix", "lexical_logits", "train_lexical"]
