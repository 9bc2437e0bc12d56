"""Fine-tuning an :class:`training.model.EncoderClassifier` as a text classifier, nanoGPT style.

Read top to bottom: the options (``TrainConfig``), the order examples are seen in, the loss, the
optimizer and its schedule, then the loop. AdamW (no decay on biases and norms, a larger learning
rate for the fresh head), linear warmup then cosine decay, gradient clipping, optional class
weights and label smoothing, length-bucketed batches padded to their longest text, early stopping
on validation macro-F1, fixed seeds.

Options: focal loss (``training.losses``), class-balanced batches drawn with
``WeightedRandomSampler``, knowledge distillation from a teacher's logits, 8-bit and paged AdamW
from bitsandbytes, checkpoints to resume from and optional MLflow tracking
(``training.checkpoint``). The model, its tokenizer and the prototype head initialisation are in
``training.model``; parameter-efficient fine-tuning (LoRA, QLoRA on a 4/8-bit encoder) is in
``training.adapters``: ``train`` only updates parameters that require gradients.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.checkpoint import (
    CHECKPOINT_LAST,
    LoopState,
    import_mlflow,
    load_trainable_state,
    resume_from_checkpoint,
    save_checkpoint,
    start_tracking,
    trainable_state,
)
from training.evaluate import macro_f1
from training.losses import distillation_loss, focal_loss
from training.model import (
    EncoderClassifier,
    autocast,
    collate,
    encode,
    init_head_from_prototypes,
    keep_4bit_layers_trainable,
    pad_id_of,
    predict_logits,
)

log = logging.getLogger("training")


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class TrainConfig:
    """The loop's options. These defaults serve a direct call of ``train`` (a random head, one
    evaluation per epoch); a pipeline run fills every field that ``training.profiles.Profile`` also
    has from the profile (``training.stages.train_config``), so a build's defaults are Profile's."""

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
        import_mlflow()  # fail before any work when MLflow is asked for but missing


# ---------------------------------------------------------------------------------------------
# the order examples are seen in


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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
    label_ids = np.asarray(labels, dtype=np.int64)
    if label_ids.size == 0:
        return np.zeros(0, dtype=np.float64)
    counts = np.bincount(label_ids).astype(np.float64)
    return 1.0 / counts[label_ids] ** power


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
# loss


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


def make_loss(cfg: TrainConfig, labels: torch.Tensor, class_weights: torch.Tensor | None,
              teacher: torch.Tensor | None = None) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """``loss(logits, batch_indices) -> scalar``: distillation when there is a teacher, else
    cross-entropy (with label smoothing) or focal loss, all with the optional class weights."""
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


# ---------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule


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


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup to 1, then cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    val_ids = encode(tokenizer, val_texts) if has_val and val_texts else []

    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = int(round(cfg.warmup_ratio * total))
    eval_every = cfg.eval_every or max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    weights = class_weight_vector(train_labels, num_labels, cfg.class_weights)
    keep_4bit_layers_trainable(model)  # before any forward: see training.model
    if cfg.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    resuming = bool(cfg.resume and cfg.checkpoint_dir and (Path(cfg.checkpoint_dir) / CHECKPOINT_LAST).is_file())
    if cfg.head_init == "prototype" and not resuming:  # a resumed head comes from the checkpoint
        init_head_from_prototypes(model, train_ids, train_labels, pad, per_class=cfg.prototype_per_class,
                                  bf16=cfg.bf16, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    loss_fn = make_loss(cfg, labels_t, weights, teacher)
    batches = TrainBatches([len(x) for x in train_ids], train_labels, cfg)
    state, best_state = LoopState(), None
    if cfg.resume and cfg.checkpoint_dir:  # check_train_config: resume needs a checkpoint_dir
        state, best_state = resume_from_checkpoint(cfg.checkpoint_dir, model, optimizer, batches, asdict(cfg),
                                                   len(train_ids))
    start_step = state.step
    # started last, so that a bad option fails before an empty run is recorded
    tracker = start_tracking(cfg.mlflow_uri, desc, {**asdict(cfg), "n_train": len(train_ids), "n_val": len(val_ids),
                                                    "num_labels": num_labels, "distillation": teacher is not None})

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
            with autocast(cfg.bf16):
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
                    save_checkpoint(cfg.checkpoint_dir, model, optimizer, state, batches, asdict(cfg), best=improved)
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
