"""The stages of a pipeline run that make the PyTorch model: data, train, distill, prune, lexical.

Each stage is a function of the :class:`Run` (task, profile, data, base model, tokenizer, seed)
that logs what it does through :class:`Stages`, records its options and results in the run's
``info`` (the manifest's ``training`` section), and says why when its options leave it off.
``training.pipeline.run_pipeline`` calls them in order, then exports the model.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from schemas.labels import Label
from training.adapters import apply_lora, merge_for_export, prepare_for_kbit_training, trainable_parameters
from training.datasets.common import Dataset
from training.datasets.splits import load_splits
from training.distill import distill, make_student, teacher_logits
from training.evaluate import json_safe, macro_f1
from training.finetune import TrainConfig, train
from training.lexical import LexicalConfig, LexicalHead, choose_mix, lexical_logits, train_lexical
from training.model import (
    EncoderClassifier,
    Quantization,
    bf16_supported,
    count_parameters,
    encode,
    pad_id_of,
    predict_logits,
)
from training.profiles import Profile
from training.prune import prune_encoder, recover

log = logging.getLogger("training")

METHODS = ("full", "lora", "qlora", "8bit")


def setup_logging(progress: bool) -> None:
    """Stage logs to stderr when nothing else configured logging (a library caller may have)."""
    if progress and not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class Stages:
    """Stage logging and timing: ``stage("train", "...")`` logs, ``stage.done("train")`` records
    the seconds since the previous ``done``; ``stage.skip("prune", "why")`` logs a skipped stage."""

    def __init__(self, task: str):
        self.task = task
        self.started = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def __call__(self, name: str, message: str = "") -> None:
        log.info("[%s] %-9s %s", self.task, name, message)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(self.times.get(name, 0.0) + now - self.last, 1)
        self.last = now

    def skip(self, name: str, why: str) -> None:
        self(name, f"skipped ({why})")
        self.done(name)


@dataclass
class TaskData:
    """The texts and label ids of every split of one task, and what the manifest records of them."""

    labels: list[Label]
    train_x: list[str]
    train_y: list[int]
    val_x: list[str]
    val_y: list[int]
    test_x: list[str]
    test_y: list[int]
    calib_x: list[str]  # temperature and threshold are fitted here
    calib_y: list[int]
    heldout_calibration: bool  # calib is a held-out-phrasing sample (else it is the validation set)
    hashes: dict[str, str]  # split -> sha256 of its examples
    train_support: np.ndarray  # training examples per class
    splits: dict[str, Dataset] = field(default_factory=dict)  # the datasets themselves (orders, for exam masks)
    # protocol with a hospital catalog (training.protocol_catalog.catalog_data): its masks and manifest entry
    catalog_kw: dict[str, Any] = field(default_factory=dict)
    manifest_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calib_name(self) -> str:
        return "held-out-phrasing calibration set" if self.heldout_calibration else "validation set"


@dataclass
class Run:
    """What every stage of one pipeline run reads."""

    task: str
    profile: Profile
    data: TaskData
    base: Path  # the base model folder
    tokenizer: Any  # tokenizers.Tokenizer, truncating at profile.max_length
    seed: int
    progress: bool
    stage: Stages


def load_task_data(task: str, p: Profile, seed: int, stage: Stages) -> TaskData:
    stage("data", "generating train/val/test")
    splits = load_splits(task, p, seed)
    if "calib" in splits:  # never calibrate on an order that is also in the test set
        test_set = set(splits["test"].texts())
        keep = [i for i, t in enumerate(splits["calib"].texts()) if t not in test_set]
        splits["calib"] = splits["calib"].subset(keep)
    labels = list(splits["train"].labels)
    if any(d.labels != labels for d in splits.values()):
        raise RuntimeError(f"{task}: the train/val/test datasets have different label spaces")
    calib = splits.get("calib", splits["val"])
    train_y = splits["train"].label_ids()
    data = TaskData(
        labels=labels,
        train_x=splits["train"].texts(), train_y=train_y,
        val_x=splits["val"].texts(), val_y=splits["val"].label_ids(),
        test_x=splits["test"].texts(), test_y=splits["test"].label_ids(),
        calib_x=calib.texts(), calib_y=calib.label_ids(),
        heldout_calibration="calib" in splits,
        hashes={s: d.sha256() for s, d in splits.items()},
        train_support=np.bincount(np.asarray(train_y), minlength=len(labels)),
        splits=splits,
    )
    if task == "protocol" and p.catalog:
        from training.protocol_catalog import catalog_data

        extra = catalog_data(p.catalog)
        data.catalog_kw, data.manifest_extra = extra["catalog_kw"], extra["manifest_extra"]
    stage("data", f"{len(labels)} labels; train {len(data.train_x)}, val {len(data.val_x)}, "
          f"test {len(data.test_x)} examples; {int((data.train_support > 0).sum())} labels seen in train")
    stage.done("data")
    return data


def train_config(p: Profile, seed: int, progress: bool, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a run: every field that ``Profile`` also has, by name, from ``p``
    (``bf16="auto"`` resolved for this CPU, ``embed_lr=0`` as None); ``overrides`` win."""
    profile = p.values()
    values = {f.name: profile[f.name] for f in dataclasses.fields(TrainConfig) if f.name in profile}
    values.update(seed=seed, progress=progress, bf16=bf16_supported() if p.bf16 == "auto" else bool(p.bf16),
                  embed_lr=p.embed_lr or None)
    values.update(overrides)
    return TrainConfig(**values)


def build_model(method: str, base: Path, num_labels: int, p: Profile) -> EncoderClassifier:
    """The model to train for ``method``: a plain (truncated) encoder classifier, with LoRA adapters
    for ``lora``, on a 4-bit NF4 / 8-bit base for ``qlora`` / ``8bit``."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r} (choose from {', '.join(METHODS)})")
    quantization = Quantization(bits=4 if method == "qlora" else 8) if method in ("qlora", "8bit") else None
    model = EncoderClassifier.from_pretrained(base, num_labels, num_layers=p.num_layers,
                                              layer_strategy=p.layer_strategy, dropout=p.dropout,
                                              quantization=quantization)
    if method == "full":
        return model
    if quantization is not None:
        prepare_for_kbit_training(model)
    return apply_lora(model, r=p.lora_r, alpha=p.lora_alpha, dropout=p.lora_dropout)


def train_stage(run: Run) -> tuple[EncoderClassifier, dict[str, Any]]:
    """Train a model with the profile's ``method``; adapters are merged into an fp32 model.
    Returns the model and the run's ``info``, which the later stages add to."""
    p, data, stage = run.profile, run.data, run.stage
    info: dict[str, Any] = {"method": p.method}
    model = build_model(p.method, run.base, len(data.labels), p)
    cfg = train_config(p, run.seed, run.progress)
    if p.method in ("qlora", "8bit") and cfg.head_init == "prototype":
        # a quantized base must train before any eval-mode forward (bitsandbytes on CPU)
        cfg.head_init = "random"
    trainable, total = trainable_parameters(model)
    stage("train", f"{p.method} on {run.base.name}: layers {model.kept_layers or []}, "
          f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable, batch {cfg.batch_size}, "
          f"loss {cfg.loss}, sampler {cfg.sampler or 'none'}")
    result = train(model, run.tokenizer, data.train_x, data.train_y, data.val_x, data.val_y, cfg,
                   desc=f"train {run.task} ({p.method})")
    stage("train", f"{result.steps} steps in {result.seconds:.0f} s; best val macro-F1 {result.best_val_macro_f1:.4f} "
          f"at step {result.best_step}{' (early stop)' if result.stopped_early else ''}")
    info.update(train_steps=result.steps, train_seconds=round(result.seconds, 1), best_step=result.best_step,
                best_val_macro_f1=round(result.best_val_macro_f1, 6), stopped_early=result.stopped_early,
                history=result.history, trainable_parameters=trainable, config=result.config)
    if p.method != "full":
        model = merge_for_export(model)
        stage("train", f"adapters merged into an fp32 model for export ({count_parameters(model) / 1e6:.1f}M parameters)")
    info["layers"] = list(model.kept_layers or [])
    stage.done("train")
    return model, info


def distill_stage(run: Run, model: EncoderClassifier, info: dict[str, Any]) -> EncoderClassifier:
    """With ``student_layers`` below the model's depth: a student initialised from the model's own
    layers learns from its logits; returns the student (else the model, unchanged)."""
    p, data, stage = run.profile, run.data, run.stage
    teacher_depth = model.encoder.config.num_hidden_layers
    if not p.student_layers or p.student_layers >= teacher_depth:
        stage.skip("distill", "no student_layers in the profile")
        return model
    student = make_student(run.base, len(data.labels), p.student_layers, teacher=model)
    cfg = train_config(p, run.seed, run.progress, epochs=p.distill_epochs, max_steps=p.distill_max_steps,
                       head_init="random", lr=p.distill_lr or p.lr, head_lr=p.distill_head_lr or p.lr)
    stage("distill", f"{teacher_depth} -> {p.student_layers} layers, T={cfg.distill_temperature}, "
          f"alpha={cfg.distill_alpha}, {count_parameters(model) / 1e6:.1f}M -> "
          f"{count_parameters(student) / 1e6:.1f}M parameters")
    texts, labels = data.train_x, data.train_y
    if not cfg.max_steps:
        texts, labels, cfg.epochs = fraction_of_an_epoch(texts, labels, cfg.epochs, p.batch_size, run.seed)
    result = distill(model, student, run.tokenizer, texts, labels, data.val_x, data.val_y, cfg)
    stage("distill", f"{result.steps} steps in {result.seconds:.0f} s; best val macro-F1 {result.best_val_macro_f1:.4f}")
    info["distill"] = {"student_layers": p.student_layers, "teacher_layers": info["layers"],
                       "steps": result.steps, "seconds": round(result.seconds, 1),
                       "best_val_macro_f1": round(result.best_val_macro_f1, 6),
                       "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha}
    info["layers"] = list(student.kept_layers or [])
    stage.done("distill")
    return student


def prune_stage(run: Run, model: EncoderClassifier, info: dict[str, Any]) -> None:
    """With ``prune_heads``/``prune_ffn`` > 0: structured pruning of ``model`` in place, then a
    recovery fine-tune distilled from the unpruned model's logits."""
    p, data, stage = run.profile, run.data, run.stage
    if p.prune_heads <= 0 and p.prune_ffn <= 0:
        stage.skip("prune", "prune_heads and prune_ffn are 0")
        return
    texts, labels, epochs = fraction_of_an_epoch(data.train_x, data.train_y, p.recovery_epochs, p.batch_size,
                                                 run.seed)
    before_logits = teacher_logits(model, run.tokenizer, texts)
    stats = prune_encoder(model, head_ratio=p.prune_heads, ffn_ratio=p.prune_ffn,
                          example_ids=encode(run.tokenizer, data.train_x[:64]), pad_id=pad_id_of(run.tokenizer))
    stage("prune", f"heads -{p.prune_heads:.0%}, FFN -{p.prune_ffn:.0%}: {_pruned_size(stats)}")
    cfg = train_config(p, run.seed, run.progress, epochs=epochs, max_steps=p.recovery_max_steps, head_init="random",
                       lr=p.recovery_lr or p.lr, head_lr=p.recovery_lr or p.lr)
    result = recover(model, run.tokenizer, texts, labels, data.val_x, data.val_y, cfg, teacher_logits=before_logits)
    stage("prune", f"recovery: {result.steps} steps in {result.seconds:.0f} s; best val macro-F1 "
          f"{result.best_val_macro_f1:.4f}")
    info["prune"] = {**json_safe(stats), "head_ratio": p.prune_heads, "ffn_ratio": p.prune_ffn,
                     "recovery_steps": result.steps, "recovery_seconds": round(result.seconds, 1),
                     "recovery_best_val_macro_f1": round(result.best_val_macro_f1, 6)}
    stage.done("prune")


def lexical_stage(run: Run, model: EncoderClassifier, info: dict[str, Any]) -> None:
    """With ``lexical_dim`` > 0: train a ``training.lexical.LexicalHead`` on the training split,
    choose its weight on the calibration set (held-out phrasings) against the trained encoder's
    logits, and attach it to ``model`` when it helps."""
    p, data, stage = run.profile, run.data, run.stage
    if p.lexical_dim <= 0:
        stage.skip("lexical", "lexical_dim is 0")
        return
    cfg = LexicalConfig(dim=p.lexical_dim, epochs=p.lexical_epochs, lr=p.lexical_lr,
                        token_dropout=p.lexical_token_dropout, batch_size=p.batch_size, seed=run.seed,
                        progress=run.progress)
    tokenizer, pad = run.tokenizer, pad_id_of(run.tokenizer)
    head = LexicalHead(tokenizer.get_vocab_size(), cfg.dim, len(data.labels), token_dropout=cfg.token_dropout)
    stage("lexical", f"bag of word pieces -> {cfg.dim} -> {len(data.labels)}, {cfg.epochs} epochs, "
          f"token dropout {cfg.token_dropout}")
    res = train_lexical(head, encode(tokenizer, data.train_x), data.train_y, encode(tokenizer, data.val_x),
                        data.val_y, pad, cfg)
    calib_ids = encode(tokenizer, data.calib_x)
    enc_logits = predict_logits(model, calib_ids, pad)
    lex_logits = lexical_logits(head, calib_ids, pad)
    mix, scores = choose_mix(enc_logits, lex_logits, data.calib_y)
    lex_only = macro_f1(data.calib_y, lex_logits.argmax(1))
    stage("lexical", f"{res.steps} steps in {res.seconds:.0f} s; {data.calib_name} macro-F1: encoder {scores[0.0]:.4f}, "
          f"lexical {lex_only:.4f}, encoder + {mix:g} x lexical {scores[mix]:.4f}")
    if mix > 0:
        head.mix.fill_(mix)
        model.lexical = head.to(next(model.parameters()).device).eval()
    else:
        stage("lexical", "weight 0 is best: the lexical branch is left out of the model")
    info["lexical"] = {
        "dim": cfg.dim, "epochs": cfg.epochs, "lr": cfg.lr, "token_dropout": cfg.token_dropout,
        "steps": res.steps, "seconds": round(res.seconds, 1), "val_accuracy": [round(a, 4) for a in res.val_accuracy],
        "mix": float(mix) if mix > 0 else 0.0, "calib_macro_f1_encoder": round(scores[0.0], 4),
        "calib_macro_f1_lexical": round(lex_only, 4), "calib_macro_f1_combined": round(scores[mix], 4),
        "used": mix > 0, "parameters": count_parameters(head) if mix > 0 else 0,
    }
    stage.done("lexical")


def sample_indices(n: int, fraction: float, batch_size: int, seed: int) -> list[int]:
    """A sorted random ``fraction`` of ``range(n)`` (at least one batch)."""
    size = min(n, max(batch_size, int(fraction * n)))
    return sorted(np.random.default_rng(seed).permutation(n)[:size].tolist())


def fraction_of_an_epoch(texts: list[str], labels: list[int], epochs: float, batch_size: int,
                         seed: int) -> tuple[list[str], list[int], float]:
    """(texts, labels, epochs) for a distillation/recovery run: below one epoch, one pass over a fixed
    random sample of that size, so that the teacher's logits are only computed for what it trains on."""
    if epochs >= 1.0:
        return texts, labels, epochs
    keep = sample_indices(len(texts), epochs, batch_size, seed)
    return [texts[i] for i in keep], [labels[i] for i in keep], 1.0


def _pruned_size(stats: dict) -> str:
    before, after = stats.get("params_before"), stats.get("params_after")
    if before and after:
        return f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters"
    return ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
