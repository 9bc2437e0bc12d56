"""Training methods on a tiny model (bundled MiniLM cut to 1 layer, 16 short texts, 4 classes):
focal and distillation losses against their formulas, the class-balanced sampler, 8-bit and paged
optimizers, LoRA and QLoRA (4-bit NF4, 8-bit) training only their adapters, merging for ONNX
export, checkpoints that resume exactly, and MLflow tracking being optional."""

from __future__ import annotations

import copy
import logging
import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from tests.test_training_finetune import LABELS, TEXTS
from training import finetune
from training.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST, load_checkpoint
from training.finetune import (
    TrainBatches,
    TrainConfig,
    make_optimizer,
    sampler_weights,
    train,
)
from training.losses import distillation_loss, focal_loss
from training.model import (
    EncoderClassifier,
    collate,
    default_base_model,
    encode,
    load_tokenizer,
    pad_id_of,
    predict_logits,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

UNSEEN = [t.upper() for t in TEXTS] + [t + " please" for t in TEXTS]


def tiny_config(**overrides) -> TrainConfig:
    """20 steps over the 16 texts, evaluations every 10 steps, random head: seconds on 2 cores."""
    base = {"max_steps": 20, "batch_size": 16, "lr": 5e-4, "head_lr": 2e-2, "warmup_ratio": 0.1, "max_length": 32,
            "threads": 1, "seed": 0, "progress": False, "patience": 0, "eval_every": 10, "freeze_embeddings": True}
    return TrainConfig(**{**base, **overrides})


def loss_fell(losses, factor=0.5) -> bool:
    return float(np.mean(losses[-5:])) < factor * float(np.mean(losses[:5]))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_base_model(), 32)


@pytest.fixture(scope="module")
def base_classifier():
    """Loaded once; tests train deep copies (same weights and head init every time)."""
    torch.manual_seed(0)
    return EncoderClassifier.from_pretrained(default_base_model(), 4, num_layers=1, dropout=0.1)


# ---------------------------------------------------------------------------------------------
# losses


def test_focal_loss_matches_hand_computed_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # p = [0.25, 0.75] on both rows
    target = torch.tensor([1, 0])
    # row 0: p_y = 0.75 -> (0.25)^2 * -log 0.75; row 1: p_y = 0.25 -> (0.75)^2 * -log 0.25
    row0, row1 = 0.0625 * math.log(4 / 3), 0.5625 * math.log(4)
    assert float(focal_loss(logits, target, gamma=2.0)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(focal_loss(logits, target, gamma=2.0, reduction="sum")) == pytest.approx(row0 + row1, rel=1e-6)
    weight = torch.tensor([2.0, 1.0])  # class 0 (row 1) counts double, still divided by the batch size
    assert float(focal_loss(logits, target, gamma=2.0, weight=weight)) == pytest.approx((row0 + 2 * row1) / 2, rel=1e-6)
    assert focal_loss(logits, target, reduction="none").shape == (2,)


def test_focal_loss_at_gamma_zero_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target), atol=1e-6)
    weight = torch.rand(5, generator=gen) + 0.5
    summed = F.cross_entropy(logits, target, weight=weight, reduction="sum") / len(target)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0, weight=weight), summed, atol=1e-6)
    assert float(focal_loss(logits, target, gamma=2.0)) < float(focal_loss(logits, target, gamma=0.0))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.5), (4.0, 0.9), (1.0, 0.0)])
def test_distillation_loss_is_alpha_kl_t2_plus_ce(temperature, alpha):
    student = np.array([[1.0, 0.5, -1.0], [0.2, 2.0, 0.1]])
    teacher = np.array([[3.0, 0.0, -2.0], [-1.0, 1.0, 2.5]])
    target = np.array([0, 2])
    p_t, p_s = _softmax(teacher / temperature), _softmax(student / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1).mean()  # batchmean
    ce = -np.log(_softmax(student)[np.arange(2), target]).mean()
    expected = alpha * kl * temperature**2 + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), temperature, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# sampler and optimizers


def test_sampler_weights_are_inverse_class_counts():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    w = sampler_weights(labels)
    assert w.shape == (100,)
    assert w[0] == pytest.approx(1 / 60) and w[60] == pytest.approx(1 / 30) and w[99] == pytest.approx(1 / 10)
    assert [w[np.asarray(labels) == c].sum() for c in range(3)] == pytest.approx([1.0, 1.0, 1.0])  # equal mass
    half = sampler_weights(labels, power=0.5)
    assert half[99] / half[0] == pytest.approx(math.sqrt(6))
    assert np.all(sampler_weights(labels, power=0.0) == 1.0)


def test_weighted_batches_are_roughly_balanced():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    batches = TrainBatches([5] * 100, labels, tiny_config(sampler="weighted", batch_size=10))
    drawn = np.concatenate([batches.next() for _ in range(300)])  # 30 epochs of 100 draws
    shares = np.bincount(np.asarray(labels)[drawn], minlength=3) / len(drawn)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.04), shares
    plain = TrainBatches([5] * 100, labels, tiny_config(batch_size=10))
    epoch = np.concatenate([plain.next() for _ in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))  # no sampler: each example once an epoch


class _TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(128, 64)  # 8192 weights: bitsandbytes keeps 8-bit state from 4096
        self.head = torch.nn.Linear(64, 4)


def test_optimizer_choice_and_cpu_fallback_of_paged_optimizers(caplog):
    import bitsandbytes.optim as bnb_optim

    assert type(make_optimizer(_TinyClassifier(), tiny_config())) is torch.optim.AdamW
    assert type(make_optimizer(_TinyClassifier(), tiny_config(optimizer="adamw8bit"))) is bnb_optim.AdamW8bit
    with caplog.at_level(logging.WARNING, logger="training"):
        paged = make_optimizer(_TinyClassifier(), tiny_config(optimizer="paged_adamw"))
        paged8 = make_optimizer(_TinyClassifier(), tiny_config(optimizer="paged_adamw8bit"))
    assert type(paged) is torch.optim.AdamW and type(paged8) is bnb_optim.AdamW8bit
    assert "CUDA" in caplog.text and "paged_adamw8bit" in caplog.text
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(_TinyClassifier(), tiny_config(optimizer="sgd"))


def test_8bit_adamw_minimises_on_the_cpu():
    torch.manual_seed(0)
    model, x = _TinyClassifier(), torch.randn(32, 128)
    optimizer = make_optimizer(model, tiny_config(optimizer="adamw8bit", lr=1e-2, head_lr=1e-2))
    losses = []
    for _ in range(30):
        loss = model.head(model.encoder(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert optimizer.state[model.encoder.weight]["state1"].dtype == torch.uint8  # the state really is 8-bit


# ---------------------------------------------------------------------------------------------
# full fine-tuning variants


@pytest.fixture(scope="module")
def full_ce(base_classifier, tok):
    model = copy.deepcopy(base_classifier)
    return model, train(model, tok, TEXTS, LABELS, TEXTS, LABELS, tiny_config())


@pytest.mark.slow
def test_full_fine_tuning_loss_decreases(full_ce):
    _, result = full_ce
    assert len(result.losses) == 20 and loss_fell(result.losses)
    assert result.best_val_macro_f1 >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"loss": "focal", "focal_gamma": 2.0}, {"sampler": "weighted"}],
                         ids=["focal", "weighted-sampler"])
def test_loss_decreases_with(options, base_classifier, tok):
    model = copy.deepcopy(base_classifier)
    result = train(model, tok, TEXTS, LABELS, TEXTS, LABELS, tiny_config(**options))
    assert loss_fell(result.losses), result.losses


@pytest.mark.slow
def test_training_with_teacher_logits_reduces_the_distillation_loss(base_classifier, tok):
    teacher = np.full((len(TEXTS), 4), -1.0, dtype=np.float32)
    teacher[np.arange(len(TEXTS)), LABELS] = 3.0  # a confident teacher that agrees with the labels
    teacher[:, 0] += 1.0  # ... and leans to class 0, which only distillation can teach
    model = copy.deepcopy(base_classifier)
    ids, mask = collate(encode(tok, TEXTS), pad_id_of(tok))
    labels, teacher_t = torch.tensor(LABELS), torch.from_numpy(teacher)

    def distill_loss_now() -> float:
        with torch.no_grad():
            return float(distillation_loss(model.eval()(ids, mask), teacher_t, labels, 2.0, 0.7))

    before = distill_loss_now()
    result = train(model, tok, TEXTS, LABELS, TEXTS, LABELS,
                   tiny_config(distill_temperature=2.0, distill_alpha=0.7), teacher_logits=teacher)
    assert loss_fell(result.losses, 0.7), result.losses
    assert distill_loss_now() < 0.5 * before
    with pytest.raises(ValueError, match="teacher_logits must be"):
        train(model, tok, TEXTS, LABELS, cfg=tiny_config(), teacher_logits=teacher[:3])


# ---------------------------------------------------------------------------------------------
# checkpoints


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_checkpoint_resume_continues_from_the_saved_step(full_ce, base_classifier, tok, tmp_path, monkeypatch):
    """Interrupted right after the step-10 checkpoint, then resumed: the same 20 losses as an
    uninterrupted run (``full_ce``, same config), so data order, RNG and optimizer all came back."""
    _, reference = full_ce
    real_save = finetune.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Interrupted

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_crash)
    cfg = tiny_config(checkpoint_dir=str(tmp_path))
    with pytest.raises(_Interrupted):
        train(copy.deepcopy(base_classifier), tok, TEXTS, LABELS, TEXTS, LABELS, cfg)
    assert (tmp_path / CHECKPOINT_LAST).is_file() and (tmp_path / CHECKPOINT_BEST).is_file()
    assert load_checkpoint(tmp_path / CHECKPOINT_LAST)["loop"]["step"] == 10
    monkeypatch.setattr(finetune, "save_checkpoint", real_save)

    resumed = train(copy.deepcopy(base_classifier), tok, TEXTS, LABELS, TEXTS, LABELS, tiny_config(
        checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.start_step == 10 and resumed.steps == 20
    np.testing.assert_allclose(resumed.losses, reference.losses, rtol=1e-4, atol=1e-6)
    assert [h["step"] for h in resumed.history] == [10, 20]
    assert load_checkpoint(tmp_path / CHECKPOINT_LAST)["loop"]["step"] == 20


# ---------------------------------------------------------------------------------------------
# LoRA and QLoRA


def _frozen_and_lora_weights(model) -> tuple[dict, dict]:
    frozen, lora = {}, {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            lora[name] = param.detach().clone()
        elif not name.startswith("head."):
            frozen[name] = param.detach().clone()
    return frozen, lora


def _train_adapters(model, tok):
    """Train an adapter model; return the result and which base / LoRA weights changed."""
    from training.adapters import trainable_parameters

    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in n or n.startswith("head.") for n in trainable_names)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < 0.02 * total  # 1-layer MiniLM: ~57k of ~14M (the word embeddings)
    frozen_before, lora_before = _frozen_and_lora_weights(model)
    result = train(model, tok, TEXTS, LABELS, TEXTS, LABELS, tiny_config(lr=5e-3, freeze_embeddings=False))
    frozen_after, lora_after = _frozen_and_lora_weights(model)
    base_changed = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    lora_changed = [n for n in lora_before if not torch.equal(lora_before[n], lora_after[n])]
    return result, base_changed, lora_changed, len(lora_before)


@pytest.fixture(scope="module")
def lora_trained(base_classifier, tok):
    from training.adapters import apply_lora

    model = apply_lora(copy.deepcopy(base_classifier), r=8, alpha=16)
    return (model, *_train_adapters(model, tok))


@pytest.fixture(scope="module", params=[4, 8], ids=["4bit-nf4", "8bit"])
def qlora_trained(request, tok):
    from training.adapters import load_qlora_classifier

    torch.manual_seed(0)
    model = load_qlora_classifier(default_base_model(), 4, bits=request.param, num_layers=1, dropout=0.1)
    return (model, *_train_adapters(model, tok))


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_the_head(lora_trained):
    _, result, base_changed, lora_changed, n_lora = lora_trained
    assert loss_fell(result.losses), result.losses
    assert base_changed == []
    assert len(lora_changed) == n_lora  # A and B of every adapted layer moved


@pytest.mark.slow
def test_qlora_trains_only_the_adapters_and_the_head(qlora_trained):
    model, result, base_changed, lora_changed, n_lora = qlora_trained
    from training.adapters import is_quantized

    assert is_quantized(model)
    assert loss_fell(result.losses), result.losses
    assert base_changed == []  # the 4/8-bit codes, norms and embeddings are untouched
    assert len(lora_changed) == n_lora


@pytest.mark.slow
def test_merged_qlora_model_is_plain_fp32_and_agrees(qlora_trained, tok):
    from training.adapters import has_lora, is_quantized, merge_for_export

    model = qlora_trained[0]
    merged = merge_for_export(model)
    assert not is_quantized(merged) and not has_lora(merged)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    ids, pad = encode(tok, TEXTS + UNSEEN), pad_id_of(tok)
    # the adapters were trained against dequantized weights and are merged into the fp32 ones:
    # logits drift, the decisions should not
    agreement = np.mean(predict_logits(model, ids, pad).argmax(1) == predict_logits(merged, ids, pad).argmax(1))
    assert agreement >= 0.9, agreement


@pytest.mark.slow
def test_4bit_model_survives_an_eval_forward_before_training(tok):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward (AVX512-BF16 CPUs),
    which used to break training afterwards; train() undoes it first."""
    import bitsandbytes as bnb

    from training.adapters import load_qlora_classifier

    # with gradient checkpointing, which peft's prepare_model_for_kbit_training sets up (works on CPU)
    model = load_qlora_classifier(default_base_model(), 4, bits=4, num_layers=1, gradient_checkpointing=True)
    assert model.encoder.get_base_model().is_activation_checkpointing
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()  # bitsandbytes' default
    predict_logits(model, encode(tok, TEXTS), pad_id_of(tok))
    result = train(model, tok, TEXTS, LABELS, cfg=tiny_config(max_steps=3, head_init="prototype"))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))


@pytest.mark.slow
def test_merged_lora_model_exports_to_onnx_and_matches(lora_trained, tok, tmp_path):
    from training.adapters import has_lora, merge_for_export
    from training.export import check_export, export_onnx

    model = lora_trained[0]
    merged = merge_for_export(model)
    assert not has_lora(merged) and has_lora(model)  # the adapter model is left as it was
    ids, pad = encode(tok, TEXTS + UNSEEN), pad_id_of(tok)
    np.testing.assert_allclose(predict_logits(merged, ids, pad), predict_logits(model, ids, pad), atol=1e-4)
    onnx_path = export_onnx(merged, tmp_path / "lora-merged.onnx")
    assert check_export(merged, onnx_path, ids, pad) < 1e-3


# ---------------------------------------------------------------------------------------------
# MLflow (optional)


def test_mlflow_missing_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, installed or not
    cfg = tiny_config(mlflow_uri=f"file:{tmp_path / 'mlruns'}")
    with pytest.raises(ImportError, match="pip install mlflow-skinny"):
        train(None, None, TEXTS, LABELS, cfg=cfg)  # fails on the config, before touching the model


@pytest.mark.slow
def test_mlflow_logs_params_and_eval_metrics(base_classifier, tok, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    train(copy.deepcopy(base_classifier), tok, TEXTS, LABELS, TEXTS, LABELS, tiny_config(mlflow_uri=uri),
          desc="mlflow-test")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["loss"] == "ce" and runs[0].data.params["n_train"] == "16"
    history = client.get_metric_history(runs[0].info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [10, 20]
