"""The general-model baseline a fine-tuned, compressed model is compared against: the unchanged
base sentence encoder (fp32, all layers, mean pooling, exported to ONNX and run like the served
models) as a frozen feature extractor with a logistic-regression head."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.runtime import OnnxTextEncoder
from training import evaluate as ev
from training.evaluate import (
    RARE_FRACTION,
    IntSeq,
    json_safe,
    macro_f1_over,
    peak_rss_mb,
    rare_classes,
    sample_texts,
)
from training.export import check_export, export_onnx, save_tokenizer
from training.model import EncoderClassifier, default_base_model, encode, load_tokenizer, pad_id_of

GENERAL_BASELINE_NAME = "general base model fp32"


def stratified_subsample(labels: IntSeq, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Up to ``max_n`` indices (ascending) such that every class gets its first example before any
    class gets its second, and so on: subsampling never drops a rare class that fits."""
    labels = np.asarray(labels)
    if max_n is None or len(labels) <= max_n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]  # by class, random within class
    positions = np.arange(len(grouped))
    starts = np.flatnonzero(np.r_[True, labels[grouped][1:] != labels[grouped][:-1]])
    rank = positions - starts[np.searchsorted(starts, positions, side="right") - 1]
    order = np.lexsort((rng.random(len(grouped)), rank))
    return np.sort(grouped[order[:max_n]])


def export_base_encoder(base_model_dir: str | Path, out_dir: str | Path, max_length: int) -> tuple[Path, Path]:
    """The unchanged base encoder (all layers, fp32) with masked mean pooling as an ONNX model whose
    output is the sentence embedding, and its tokenizer; reused when already in ``out_dir``."""
    out_dir = Path(out_dir)
    onnx_path, tokenizer_path = out_dir / "base_encoder.fp32.onnx", out_dir / "tokenizer.json"
    if onnx_path.is_file() and tokenizer_path.is_file():
        return onnx_path, tokenizer_path
    class MeanPooledEncoder(EncoderClassifier):
        """The classifier's encoder and pooling without its head: the sentence embedding."""

        def forward(self, input_ids, attention_mask):
            return self.pool(input_ids, attention_mask)

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(base_model_dir, max_length)
    model = MeanPooledEncoder.from_pretrained(base_model_dir, 1, num_layers=None, dropout=0.0).eval()
    export_onnx(model, onnx_path)
    check_export(model, onnx_path, encode(tokenizer, ["ct head without contrast", "x"]), pad_id_of(tokenizer))
    save_tokenizer(tokenizer, tokenizer_path, max_length)
    return onnx_path, tokenizer_path


def _head_probabilities(head, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``predict_proba`` spread over all ``num_classes`` columns (classes absent from the training
    subsample get probability 0)."""
    probs = np.zeros((len(features), num_classes), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(features)
    return probs


def general_baseline(
    base_model_dir: str | Path | None,
    train_texts: Sequence[str],
    y_train: IntSeq,
    test_texts: Sequence[str],
    y_test: IntSeq,
    *,
    num_classes: int | None = None,
    train_support: IntSeq | None = None,
    max_length: int = 128,
    max_train: int | None = 4000,
    latency_n: int = 100,
    rare_fraction: float = RARE_FRACTION,
    threads: int = 2,
    C: float = 1.0,
    max_iter: int = 300,
    work_dir: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """The "general base model fp32" reference: the unchanged base sentence encoder
    (``training.model.default_base_model()`` when ``base_model_dir`` is None: all 6 MiniLM
    layers, fp32, mean pooling, exported to ONNX and run with ONNX Runtime like the served models)
    as a frozen feature extractor, L2-normalised embeddings as sentence-transformers makes them,
    and a logistic-regression head fitted on at most ``max_train`` training examples
    (:func:`stratified_subsample`).

    Rare classes are chosen by ``train_support``, else by the support of the full ``y_train``.
    Latency: the encoder forward of one text on one thread (the head adds microseconds). Size: the
    fp32 encoder file plus the head's float32 weights. ``work_dir`` keeps the ONNX export for reuse.

    Keys: ``model``, ``base_model``, ``n_train``, ``n_train_total``, ``n``, ``num_classes``,
    ``accuracy``, ``macro_f1``, ``weighted_f1``, ``rare_f1``, ``rare_classes``, ``top3_accuracy``,
    ``top5_accuracy``, ``ece``, ``p50_ms``, ``p95_ms``, ``latency``, ``size_bytes``, ``size_mb``,
    ``encoder_bytes``, ``head_bytes``, ``peak_rss_mb``, ``embed_seconds``, ``fit_seconds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if base_model_dir is None:
        base_model_dir = default_base_model()
    y_train, y_test = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    num_classes = int(num_classes or max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
    chosen = stratified_subsample(y_train, max_train, seed)
    if len(np.unique(y_train[chosen])) < 2:
        raise ValueError("the general baseline needs training examples of at least two classes")

    with tempfile.TemporaryDirectory(prefix="ehrw-baseline-") as tmp:
        onnx_path, tokenizer_path = export_base_encoder(base_model_dir, Path(work_dir or tmp), max_length)
        encoder = OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=threads)
        t0 = time.perf_counter()
        train_features = encoder.logits([train_texts[i] for i in chosen], batch_size=64)
        test_features = encoder.logits(list(test_texts), batch_size=64)
        embed_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        head = make_pipeline(Normalizer(), StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        head.fit(train_features, y_train[chosen])
        fit_seconds = time.perf_counter() - t0
        probs = _head_probabilities(head, test_features, num_classes)
        single = OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=1)
        lat = ev.latency(single, test_texts, n=latency_n, seed=seed)
        rss = peak_rss_mb(onnx_path, tokenizer_path, max_length, sample_texts(test_texts, latency_n, seed))
        encoder_bytes = onnx_path.stat().st_size

    metrics = ev.classification_metrics(np.log(np.clip(probs, 1e-12, None)), y_test)  # softmax(log p) = p
    y_pred = probs.argmax(axis=1)
    support = np.asarray(train_support) if train_support is not None else np.bincount(y_train, minlength=num_classes)
    rare = rare_classes(support, rare_fraction)
    linear = head[-1]
    head_bytes = int((linear.coef_.size + linear.intercept_.size) * 4)
    return json_safe({
        "model": GENERAL_BASELINE_NAME,
        "base_model": str(base_model_dir),
        "n_train": len(chosen),
        "n_train_total": len(y_train),
        "n": len(y_test),
        "num_classes": num_classes,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "weighted_f1": metrics["weighted_f1"],
        "rare_f1": macro_f1_over(y_test, y_pred, rare),
        "rare_classes": len(rare),
        "top3_accuracy": metrics["top3_accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "ece": metrics["ece"],
        "p50_ms": lat["p50_ms"],
        "p95_ms": lat["p95_ms"],
        "latency": lat,
        "size_bytes": encoder_bytes + head_bytes,
        "size_mb": (encoder_bytes + head_bytes) / 1e6,
        "encoder_bytes": encoder_bytes,
        "head_bytes": head_bytes,
        "peak_rss_mb": rss,
        "embed_seconds": round(embed_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
    })
