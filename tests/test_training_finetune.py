"""Training building blocks: layer selection, LR schedule, loss going down, ONNX export parity,
int8 quantization (size and fp32 agreement), temperature scaling and the abstention threshold."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.runtime import OnnxTextEncoder, softmax  # noqa: E402
from training import calibrate as cal  # noqa: E402
from training.export import check_export, export_onnx, parity, quantize, save_tokenizer  # noqa: E402
from training.finetune import (  # noqa: E402
    TrainConfig,
    bucketed_batches,
    class_weight_vector,
    lr_factor,
    train,
)
from training.model import (  # noqa: E402
    EncoderClassifier,
    default_base_model,
    encode,
    load_tokenizer,
    pad_id_of,
    resolve_layers,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = {
    0: ["ct head trauma fall", "head ct after fall on warfarin", "ct brain bleed after trauma", "fall hit head ct"],
    1: ["mri knee meniscal tear", "knee mri twisting injury", "mri knee locking after sport", "acl tear knee mri"],
    2: ["us ruq gallstones", "right upper quadrant ultrasound pain", "ruq us cholecystitis", "gallbladder ultrasound ruq"],
    3: ["xr chest cough fever", "chest x-ray pneumonia", "cxr two views cough", "chest radiograph fever cough"],
}
TEXTS = [t for texts in CLASSES.values() for t in texts]
LABELS = [c for c, texts in CLASSES.items() for _ in texts]


def test_resolve_layers():
    assert resolve_layers(6, None) == [0, 1, 2, 3, 4, 5]
    assert resolve_layers(6, 3) == [0, 2, 4]
    assert resolve_layers(6, 2) == [0, 3]
    assert resolve_layers(6, 3, "first") == [0, 1, 2]
    assert resolve_layers(6, [1, 3, 5]) == [1, 3, 5]
    for bad in (0, 7, [6], [1, 1]):
        with pytest.raises(ValueError):
            resolve_layers(6, bad)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, 0.02) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(total, total, warmup, 0.02) == pytest.approx(0.02)


def test_bucketed_batches_cover_every_example_once():
    import random

    lengths = [random.Random(i).randint(3, 60) for i in range(103)]
    batches = bucketed_batches(lengths, 8, random.Random(0), bucket=4)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert max(len(b) for b in batches) == 8


def test_class_weights():
    w = class_weight_vector([0, 0, 0, 0, 1], 3, "balanced")
    assert w[1] > w[0] and w.shape == (3,)
    assert class_weight_vector([0, 1], 2, None) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-layer MiniLM classifier trained to fit 16 short orders of 4 classes (seconds)."""
    base = default_base_model()
    tok = load_tokenizer(base, 32)
    model = EncoderClassifier.from_pretrained(base, 4, num_layers=1, dropout=0.0)
    cfg = TrainConfig(max_steps=30, batch_size=16, lr=5e-4, head_lr=2e-2, warmup_ratio=0.1, max_length=32,
                      threads=2, seed=0, progress=False, patience=0, eval_every=10,
                      freeze_embeddings=True)
    result = train(model, tok, TEXTS, LABELS, TEXTS, LABELS, cfg)
    out = tmp_path_factory.mktemp("export")
    fp32 = export_onnx(model, out / "fp32.onnx")
    save_tokenizer(tok, out / "tokenizer.json", 32)
    return {"model": model, "tok": tok, "result": result, "fp32": fp32, "dir": out}


def test_loss_decreases_and_the_model_fits(trained):
    losses = trained["result"].losses
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert trained["result"].best_val_macro_f1 >= 0.9
    assert trained["result"].history and trained["result"].history[-1]["step"] == 30


def test_onnx_export_matches_pytorch(trained):
    tok = trained["tok"]
    diff = check_export(trained["model"], trained["fp32"], encode(tok, TEXTS), pad_id_of(tok))
    assert diff < 1e-3
    enc = OnnxTextEncoder(trained["fp32"], trained["dir"] / "tokenizer.json", 32)
    assert enc.input_names == ["input_ids", "attention_mask"] and enc.num_outputs == 4
    assert enc.logits(TEXTS).argmax(1).tolist() == LABELS


@pytest.mark.parametrize("embeddings, max_ratio", [("int8", 0.26), ("int4", 0.25)])
def test_int8_quantization_is_small_and_agrees_with_fp32(trained, embeddings, max_ratio):
    out = trained["dir"] / f"int8-{embeddings}.onnx"
    quantize(trained["fp32"], out, embeddings=embeddings)
    assert out.stat().st_size <= max_ratio * trained["fp32"].stat().st_size
    assert not out.with_name(out.name + ".data").exists()
    tok_path = trained["dir"] / "tokenizer.json"
    batch = TEXTS * 4 + [t.upper() for t in TEXTS] + [t + " please" for t in TEXTS]
    fp32 = OnnxTextEncoder(trained["fp32"], tok_path, 32).logits(batch)
    int8 = OnnxTextEncoder(out, tok_path, 32).logits(batch)
    agreement = parity(fp32, int8)["top1_agreement"]
    assert agreement >= 0.99, agreement


def test_temperature_scaling_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 10))
    true_t = 2.5
    labels = np.array([rng.choice(10, p=p) for p in softmax(logits, true_t)])
    assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)
    assert cal.nll(logits, labels, true_t) < cal.nll(logits, labels, 1.0)
    calibrated = softmax(logits, true_t)
    assert cal.expected_calibration_error(calibrated, labels) < 0.03
    assert cal.expected_calibration_error(softmax(logits, 0.5), labels) > 0.1


def test_threshold_reaches_the_target_precision_with_most_coverage():
    rng = np.random.default_rng(1)
    n = 2000
    conf = rng.uniform(0.05, 1.0, n)
    correct = rng.uniform(size=n) < conf  # accuracy rises with confidence
    labels = np.zeros(n, dtype=int)
    probs = np.zeros((n, 3))
    probs[:, 0] = conf
    probs[:, 1] = (1 - conf) * 0.6
    probs[:, 2] = (1 - conf) * 0.4
    labels[~correct] = 1
    for target in (0.8, 0.9):
        chosen = cal.choose_threshold(probs, labels, target)
        assert chosen["reached"] and chosen["precision"] >= target
        below = cal.selective(probs, labels, chosen["threshold"] - 0.02)
        assert below["coverage"] > chosen["coverage"]
    everything = cal.choose_threshold(probs, probs.argmax(1), 0.9)
    assert everything["coverage"] == 1.0
    hopeless = cal.choose_threshold(probs, np.full(n, 2), 0.9)
    assert not hopeless["reached"] and hopeless["coverage"] == 0.0
    summary = cal.calibrate(np.log(probs + 1e-9), labels, 0.9)
    assert summary["temperature"] > 0 and 0 <= summary["abstain_below"] <= 1


def test_threshold_on_the_top_k_mass_counts_an_answer_right_when_the_label_is_among_the_k():
    rng = np.random.default_rng(3)
    n, c = 2000, 50
    logits = rng.normal(size=(n, c)) * 2.0
    labels = np.where(rng.random(n) < 0.5, logits.argmax(1), np.argsort(-logits, axis=1)[:, 2])  # half 3rd-ranked
    probs = softmax(logits, 1.0)
    assert cal.top_k_correct(probs, labels, 1).mean() == pytest.approx(0.5, abs=0.05)
    assert cal.top_k_correct(probs, labels, 3).all()
    top1 = cal.choose_threshold(probs, labels, 0.9, k=1)
    top3 = cal.choose_threshold(probs, labels, 0.9, k=3)
    assert top3["precision"] == 1.0 and top3["coverage"] == 1.0 and top3["k"] == 3
    assert top1["coverage"] < top3["coverage"]
    out = cal.calibrate(logits, labels, 0.9, top_k=3)
    assert out["confidence_top_k"] == 3 and out["val"]["coverage"] == 1.0
