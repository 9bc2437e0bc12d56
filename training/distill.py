"""Knowledge distillation of a fine-tuned classifier into a shallower student.

The teacher's logits on the training texts are computed once; the student is then trained by
:func:`training.finetune.train` on ``alpha * KL(teacher || student) * T^2 + (1 - alpha) * CE``
(``TrainConfig.distill_alpha`` and ``distill_temperature``, see :mod:`training.losses`).

A student built from the raw base model starts from general-purpose layers and a random head.
:func:`make_student` instead starts it from the teacher itself: its kept layers are copies of the
teacher's fine-tuned layers picked evenly through the depth (6 -> 3: layers 0, 2, 4, as
``resolve_layers`` does for the base), with the teacher's embeddings and head, so distillation only
has to repair what dropping the other layers broke.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.finetune import TrainConfig, TrainResult, train
from training.model import EncoderClassifier, encode, layer_list, pad_id_of, predict_logits, resolve_layers

log = logging.getLogger("training")


def teacher_logits(
    teacher: EncoderClassifier, tokenizer, texts: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """The teacher's raw logits on ``texts`` (``[len(texts), num_labels]``, rows in order), in eval
    mode without gradients; the tokenizer's current truncation applies."""
    return predict_logits(teacher, encode(tokenizer, texts), pad_id_of(tokenizer), batch_size=batch_size)


def _layers(model: EncoderClassifier):
    layers, _ = layer_list(model.encoder, model.encoder.config.num_hidden_layers)
    return layers


def _copy_module(source, target, what: str) -> None:
    """``target.load_state_dict(source)``, with an error that says what to do on a shape mismatch."""
    try:
        target.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise ValueError(
            f"cannot initialise the student's {what} from the teacher ({str(exc).splitlines()[0]}): "
            "build the student from the teacher's base model, and distill before pruning (a pruned "
            "teacher has narrower layers than the base)"
        ) from None


def make_student(
    base_model: str | Path,
    num_labels: int,
    num_layers: int,
    teacher: EncoderClassifier | None = None,
    layer_strategy: str = "spread",
    *,
    dropout: float = 0.1,
) -> EncoderClassifier:
    """A classifier on ``base_model`` with ``num_layers`` transformer layers.

    With a ``teacher`` (same base, same width), the student's layers, embeddings and head are copies
    of the teacher's fine-tuned ones: layer ``i`` of the student is teacher layer
    ``resolve_layers(teacher_layers, num_layers, layer_strategy)[i]``. Without one, the layers are
    the base model's (as ``EncoderClassifier.from_pretrained``) and the head is fresh."""
    if teacher is None:
        return EncoderClassifier.from_pretrained(base_model, num_labels, num_layers=num_layers,
                                                 layer_strategy=layer_strategy, dropout=dropout)
    if teacher.head.out_features != num_labels:
        raise ValueError(f"the teacher has {teacher.head.out_features} labels, the student was asked for "
                         f"{num_labels}: distil with the teacher's label set")
    teacher_layers = _layers(teacher)
    picks = resolve_layers(len(teacher_layers), num_layers, layer_strategy)
    if len(picks) >= len(teacher_layers):
        log.warning("make_student: the student keeps all %d teacher layers; it is a copy, not a compression",
                    len(teacher_layers))
    student = EncoderClassifier.from_pretrained(base_model, num_labels, num_layers=len(picks),
                                                layer_strategy="first", dropout=dropout)
    student_layers = _layers(student)
    for student_layer, teacher_index in zip(student_layers, picks):
        _copy_module(teacher_layers[teacher_index], student_layer, f"layer (teacher layer {teacher_index})")
    _copy_module(teacher.encoder.embeddings, student.encoder.embeddings, "embeddings")
    _copy_module(teacher.head, student.head, "head")
    # which layers of the base model the student's weights descend from
    base_indices = teacher.kept_layers or list(range(len(teacher_layers)))
    student.kept_layers = [base_indices[i] for i in picks]
    log.info("make_student: %d of %d teacher layers (%s), embeddings and head copied",
             len(picks), len(teacher_layers), picks)
    return student


def distill(
    teacher: EncoderClassifier,
    student: EncoderClassifier,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    val_texts: Sequence[str] | None,
    val_labels: Sequence[int] | None,
    cfg: TrainConfig | None = None,
) -> TrainResult:
    """Train ``student`` in place towards ``teacher``'s logits on ``train_texts`` (computed once)
    and the labels; validation and early stopping as in :func:`training.finetune.train`."""
    cfg = cfg or TrainConfig()
    if teacher.head.out_features != student.head.out_features:
        raise ValueError(f"teacher ({teacher.head.out_features} labels) and student "
                         f"({student.head.out_features} labels) must share the label set")
    tokenizer.enable_truncation(max_length=cfg.max_length)  # what the student will be trained on
    targets = teacher_logits(teacher, tokenizer, train_texts)
    accuracy = float(np.mean(targets.argmax(-1) == np.asarray(train_labels))) if len(targets) else float("nan")
    log.info("distill: teacher logits for %d texts (teacher training accuracy %.4f)", len(targets), accuracy)
    return train(student, tokenizer, train_texts, train_labels, val_texts, val_labels, cfg, desc="distill",
                 teacher_logits=targets)
