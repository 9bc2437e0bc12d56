"""Compression of a fine-tuned classifier: distillation into a shallower student, structured
pruning of attention heads and FFN channels, recovery fine-tuning, and the pruned model through
ONNX export and int8 quantization. Tiny models: the bundled MiniLM cut to 1-2 layers, 16 texts."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from models.runtime import OnnxTextEncoder

# the 16 short orders of 4 classes the fine-tuning tests fit
from tests.test_training_finetune import LABELS, TEXTS
from training.distill import distill, make_student, teacher_logits
from training.export import check_export, export_onnx, parity, quantize, save_tokenizer
from training.finetune import TrainConfig, train
from training.losses import distillation_loss
from training.model import EncoderClassifier, collate, default_base_model, encode, load_tokenizer, pad_id_of
from training.prune import apply_structure, prune_encoder, recover, structure

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_LENGTH = 32


def quick_cfg(**overrides) -> TrainConfig:
    """Enough steps to fit 16 short texts in a few seconds on two threads."""
    settings = {"max_steps": 30, "batch_size": 16, "lr": 5e-4, "head_lr": 2e-2, "warmup_ratio": 0.1,
                "max_length": MAX_LENGTH, "threads": 2, "seed": 0, "progress": False, "patience": 0,
                "eval_every": 10, "freeze_embeddings": True}
    return TrainConfig(**(settings | overrides))


def accuracy(model, tok, texts=TEXTS, labels=LABELS) -> float:
    return float(np.mean(teacher_logits(model, tok, texts).argmax(-1) == np.asarray(labels)))


def kl_to_teacher(student_logits: np.ndarray, targets: np.ndarray, temperature: float = 2.0) -> float:
    """The teacher term of the distillation loss alone (alpha = 1): how far the student's
    softened probabilities are from the teacher's."""
    no_labels = torch.zeros(len(targets), dtype=torch.long)
    return float(distillation_loss(torch.as_tensor(student_logits), torch.as_tensor(targets), no_labels,
                                   temperature, alpha=1.0))


@pytest.fixture(scope="module")
def base():
    return default_base_model()


@pytest.fixture(scope="module")
def tok(base):
    return load_tokenizer(base, MAX_LENGTH)


@pytest.fixture(scope="module")
def teacher(base, tok):
    """A 2-layer MiniLM classifier fitted to the 16 texts."""
    model = EncoderClassifier.from_pretrained(base, 4, num_layers=2, dropout=0.0)
    train(model, tok, TEXTS, LABELS, TEXTS, LABELS, quick_cfg(max_steps=20))
    assert accuracy(model, tok) == 1.0
    return model


def perturbed(model: EncoderClassifier, seed: int = 0) -> EncoderClassifier:
    """``model`` with every weight nudged, so that copies of it cannot be mistaken for the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def layers_of(model: EncoderClassifier):
    return model.encoder.encoder.layer


# ---------------------------------------------------------------------------------------------
# distillation


def test_make_student_copies_the_teachers_layers_embeddings_and_head(base):
    # the teacher keeps base layers 1 and 4, so a copy of its first layer is not base layer 0
    teacher = perturbed(EncoderClassifier.from_pretrained(base, 4, num_layers=[1, 4], dropout=0.0))
    student = make_student(base, 4, 1, teacher=teacher)
    assert len(layers_of(student)) == 1 and student.encoder.config.num_hidden_layers == 1
    assert same_weights(layers_of(student)[0], layers_of(teacher)[0])
    assert same_weights(student.encoder.embeddings, teacher.encoder.embeddings)
    assert same_weights(student.head, teacher.head)
    assert student.kept_layers == [1]

    raw = make_student(base, 4, 1)  # no teacher: the base model's layer 0 and a fresh head
    assert not same_weights(layers_of(raw)[0], layers_of(teacher)[0])
    assert not same_weights(raw.head, teacher.head)

    with pytest.raises(ValueError, match="num_layers"):
        make_student(base, 4, 3, teacher=teacher)
    with pytest.raises(ValueError, match="label"):
        make_student(base, 5, 1, teacher=teacher)


@pytest.mark.slow
def test_distillation_trains_a_shallower_student_that_agrees_with_the_teacher(base, tok, teacher):
    targets = teacher_logits(teacher, tok, TEXTS)
    assert targets.shape == (len(TEXTS), 4) and np.isfinite(targets).all()
    student = make_student(base, 4, 1)  # from the raw base: distillation has all the work to do
    start = kl_to_teacher(teacher_logits(student, tok, TEXTS), targets)
    warm = make_student(base, 4, 1, teacher=teacher)  # from the teacher's own first layer and head
    assert kl_to_teacher(teacher_logits(warm, tok, TEXTS), targets) < 0.5 * start

    result = distill(teacher, student, tok, TEXTS, LABELS, TEXTS, LABELS, quick_cfg(max_steps=20))
    assert len(layers_of(student)) == 1 < len(layers_of(teacher))
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    student_logits = teacher_logits(student, tok, TEXTS)
    assert kl_to_teacher(student_logits, targets) < 0.1 * start
    agreement = np.mean(student_logits.argmax(-1) == targets.argmax(-1))
    assert agreement >= 0.9, agreement


# ---------------------------------------------------------------------------------------------
# pruning


def removed_parameters(hidden: int, head_size: int, heads_removed: int, ffn_removed: int) -> int:
    """Per layer: query/key/value rows (weights and biases) and the attention output's input
    columns of each head; intermediate rows (and biases) and output columns of each channel."""
    width = heads_removed * head_size
    return 3 * width * (hidden + 1) + width * hidden + ffn_removed * (2 * hidden + 1)


@pytest.fixture
def fresh(base):
    return EncoderClassifier.from_pretrained(base, 4, num_layers=2, dropout=0.0)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruning_removes_the_requested_heads_and_ffn_channels(fresh, tok, importance):
    ids = encode(tok, TEXTS)
    report = prune_encoder(fresh, head_ratio=0.25, ffn_ratio=0.5, importance=importance,
                           example_ids=ids, pad_id=pad_id_of(tok), labels=LABELS)
    assert report["heads_per_layer"] == [9, 9] and report["ffn_width"] == [768, 768]
    assert [len(r) for r in report["removed_heads"]] == [3, 3]
    assert report["params_before"] - report["params_after"] == 2 * removed_parameters(384, 32, 3, 768)
    for layer in layers_of(fresh):
        attention = layer.attention.self
        counts = (attention.num_attention_heads, attention.attention_head_size, attention.all_head_size)
        assert counts == (9, 32, 288)
        assert [attention.query.out_features, attention.key.out_features, attention.value.out_features] == [288] * 3
        assert layer.output.dense.out_features == 384  # the residual stream keeps its width
    assert fresh.encoder.get_input_embeddings().embedding_dim == 384 and fresh.head.in_features == 384
    assert fresh.encoder.config.pruned_structure == structure(fresh)
    logits = teacher_logits(fresh, tok, TEXTS)
    assert logits.shape == (len(TEXTS), 4) and np.isfinite(logits).all()


def test_pruning_only_drops_the_removed_heads_and_channels(fresh, tok):
    """The pruned model computes exactly what the full one computes with the removed heads and
    FFN channels zeroed: the right rows and columns went together."""
    masked = copy.deepcopy(fresh)
    ids = encode(tok, TEXTS)
    report = prune_encoder(fresh, head_ratio=0.5, ffn_ratio=0.25, example_ids=ids, pad_id=pad_id_of(tok))
    with torch.no_grad():
        for full, pruned, heads in zip(layers_of(masked), layers_of(fresh), report["removed_heads"]):
            value = full.attention.self.value
            for h in heads:  # a head with zero values adds nothing to the attention output
                value.weight[h * 32 : (h + 1) * 32] = 0
                value.bias[h * 32 : (h + 1) * 32] = 0
            kept = {tuple(row.tolist()) for row in pruned.intermediate.dense.weight}
            rows = full.intermediate.dense.weight
            dropped = [i for i, row in enumerate(rows) if tuple(row.tolist()) not in kept]
            assert len(dropped) == 384
            full.intermediate.dense.weight[dropped] = 0  # GELU(0) = 0: the channel is silent
            full.intermediate.dense.bias[dropped] = 0
        batch = collate(ids, pad_id_of(tok))
        np.testing.assert_allclose(fresh.eval()(*batch).numpy(), masked.eval()(*batch).numpy(), atol=1e-5)


def test_pruned_structure_reloads_into_a_fresh_model(fresh, base, tok):
    ids = encode(tok, TEXTS)
    prune_encoder(fresh, head_ratio=0.25, ffn_ratio=0.5, example_ids=ids, pad_id=pad_id_of(tok))
    reloaded = EncoderClassifier.from_pretrained(base, 4, num_layers=2, dropout=0.0)
    apply_structure(reloaded, fresh.encoder.config.pruned_structure).load_state_dict(fresh.state_dict())
    np.testing.assert_array_equal(teacher_logits(reloaded, tok, TEXTS), teacher_logits(fresh, tok, TEXTS))


def test_pruning_rejects_ratios_that_remove_everything(fresh, tok):
    ids = encode(tok, TEXTS)
    for bad in ({"head_ratio": 1.0}, {"head_ratio": 0.95}, {"ffn_ratio": 0.9999}, {"ffn_ratio": -0.1},
                {"importance": "random"}):
        with pytest.raises(ValueError):
            prune_encoder(fresh, example_ids=ids, pad_id=pad_id_of(tok), **bad)


@pytest.fixture(scope="module")
def recovered(teacher, tok):
    """The teacher with three quarters of its heads and 7/8 of its FFN channels pruned, then
    distilled back towards the unpruned teacher's logits."""
    model = copy.deepcopy(teacher)
    targets = teacher_logits(teacher, tok, TEXTS)
    report = prune_encoder(model, head_ratio=0.75, ffn_ratio=0.875, importance="taylor",
                           example_ids=encode(tok, TEXTS), pad_id=pad_id_of(tok), labels=LABELS)
    pruned_kl = kl_to_teacher(teacher_logits(model, tok, TEXTS), targets)
    result = recover(model, tok, TEXTS, LABELS, TEXTS, LABELS, quick_cfg(max_steps=10, eval_every=5),
                     teacher_logits=targets)
    return {"model": model, "report": report, "result": result, "pruned_kl": pruned_kl, "targets": targets}


@pytest.mark.slow
def test_recovery_fine_tune_restores_training_accuracy(recovered, tok):
    assert recovered["report"]["heads_per_layer"] == [3, 3] and recovered["report"]["ffn_width"] == [192, 192]
    assert recovered["result"].steps == 10
    assert accuracy(recovered["model"], tok) >= 0.9
    # 16 easy texts keep their top-1 through pruning; what pruning damages, and recovery repairs,
    # is the match to the unpruned model's probabilities
    recovered_kl = kl_to_teacher(teacher_logits(recovered["model"], tok, TEXTS), recovered["targets"])
    assert recovered_kl < 0.1 * recovered["pruned_kl"], (recovered["pruned_kl"], recovered_kl)


@pytest.mark.slow
def test_pruned_model_exports_and_quantizes_with_int8_parity(recovered, tok, tmp_path):
    model = recovered["model"]
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    assert check_export(model, fp32, encode(tok, TEXTS), pad_id_of(tok)) < 1e-3
    int8 = quantize(fp32, tmp_path / "int8.onnx")
    tok_path = save_tokenizer(tok, tmp_path / "tokenizer.json", MAX_LENGTH)
    batch = TEXTS * 2 + [t.upper() for t in TEXTS] + [t + " please" for t in TEXTS]
    fp32_logits = OnnxTextEncoder(fp32, tok_path, MAX_LENGTH).logits(batch)
    served = OnnxTextEncoder(int8, tok_path, MAX_LENGTH)
    assert served.input_names == ["input_ids", "attention_mask"] and served.num_outputs == 4
    agreement = parity(fp32_logits, served.logits(batch))["top1_agreement"]
    assert agreement >= 0.99, agreement
