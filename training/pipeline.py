"""One model, end to end: data -> train -> distill -> prune -> export -> quantize -> calibrate ->
evaluate -> register.

``run_pipeline(task, registry, profile="default")`` is what ``python -m training pipeline --task``,
``python -m training build`` and ``ehr-worker models build`` run. Every stage reads its options
from the profile (a plain dict, see ``training.build.PROFILES``); a stage whose options are off is
skipped and says so:

- ``train``: ``method`` = ``full`` (all weights), ``lora``, ``qlora`` (4-bit NF4 + double
  quantization base, LoRA adapters) or ``8bit`` (8-bit base, LoRA adapters) on ``num_layers`` of
  the base model; ``loss`` (``ce``/``focal``), ``class_weights``, ``sampler`` (``weighted``).
  Adapters are merged into an fp32 model before distillation/export.
- ``distill``: when ``student_layers`` is set, a shallower student initialised from the trained
  model's layers learns from its logits (KL at ``distill_temperature`` plus CE).
- ``prune``: when ``prune_heads``/``prune_ffn`` are > 0, structured pruning of attention heads and
  FFN channels (torch-pruning), then a recovery fine-tune distilled from the unpruned model.
- ``export``/``quantize``/``calibrate``: ONNX, int8 (dynamic, per-channel), temperature and
  abstention threshold fitted on the int8 model's held-out-phrasing calibration logits.
- ``evaluate``: fp32 vs int8 on the held-out test split, plus the report of ``training.report``
  (per-class and rare-class F1, confusion and reliability PNGs, latency p50/p95, peak RSS) and,
  with ``baseline``, the comparison against the unchanged general base model in fp32. The report
  goes into the version folder (``report/``) so it travels, checksummed, with the model.
- ``register``: manifest + ``MODEL_CARD.md``, published atomically into the registry.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import MANIFEST, MODEL_CARD_FILE, MODEL_FILE, TOKENIZER_FILE, Manifest, ModelRegistry, checksum_files
from models.runtime import OnnxTextEncoder
from training.report import json_safe

log = logging.getLogger("training")

METHODS = ("full", "lora", "qlora", "8bit")
REPORT_DIR = "report"


class Stages:
    """Stage logging and timing: ``stage("train", "...")`` logs, ``stage.done("train")`` records
    the seconds since the previous ``done``; ``stage.skip("prune", "why")`` logs a skipped stage."""

    def __init__(self, task: str):
        self.task = task
        self.last = time.perf_counter()
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


def train_config(p: dict, seed: int, progress: bool, **overrides):
    """A ``TrainConfig`` from profile values (``overrides`` win)."""
    from training.finetune import TrainConfig, bf16_supported

    values = dict(
        epochs=float(p.get("epochs") or 1.0),
        max_steps=p.get("max_steps"),
        batch_size=int(p["batch_size"]),
        lr=float(p["lr"]),
        head_lr=float(p["head_lr"]),
        embed_lr=float(p["embed_lr"]) if p.get("embed_lr") else None,
        weight_decay=float(p["weight_decay"]),
        warmup_ratio=float(p["warmup_ratio"]),
        grad_clip=float(p["grad_clip"]),
        class_weights=p.get("class_weights"),
        label_smoothing=float(p.get("label_smoothing", 0.0)),
        evals_per_epoch=int(p["evals_per_epoch"]),
        patience=int(p["patience"]),
        max_length=int(p["max_length"]),
        threads=int(p["threads"]),
        seed=seed,
        bf16=bf16_supported() if p.get("bf16") == "auto" else bool(p.get("bf16")),
        freeze_embeddings=bool(p.get("freeze_embeddings")),
        head_init=str(p.get("head_init", "random")),
        prototype_per_class=int(p.get("prototype_per_class", 16)),
        loss=str(p.get("loss", "ce")),
        focal_gamma=float(p.get("focal_gamma", 2.0)),
        sampler=p.get("sampler"),
        distill_temperature=float(p.get("distill_temperature", 2.0)),
        distill_alpha=float(p.get("distill_alpha", 0.5)),
        optimizer=str(p.get("optimizer", "adamw")),
        checkpoint_dir=p.get("checkpoint_dir"),
        mlflow_uri=p.get("mlflow_uri"),
        progress=progress,
    )
    values.update(overrides)
    return TrainConfig(**values)


def build_model(method: str, base: Path, num_labels: int, p: dict):
    """The model to train for ``method``: a plain (truncated) encoder classifier, with LoRA adapters
    for ``lora``, on a 4-bit NF4 / 8-bit base for ``qlora`` / ``8bit``."""
    from training.finetune import EncoderClassifier

    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r} (choose from {', '.join(METHODS)})")
    lora = dict(r=int(p.get("lora_r", 8)), alpha=int(p.get("lora_alpha", 16)), dropout=float(p.get("lora_dropout", 0.05)))
    if method in ("full", "lora"):
        model = EncoderClassifier.from_pretrained(base, num_labels, num_layers=p["num_layers"],
                                                  layer_strategy=p["layer_strategy"], dropout=p["dropout"])
        if method == "lora":
            from training.adapters import apply_lora

            model = apply_lora(model, **lora)
        return model
    from training.adapters import apply_lora, load_quantized_encoder_classifier, prepare_for_kbit_training

    model = load_quantized_encoder_classifier(base, num_labels, bits=4 if method == "qlora" else 8,
                                              num_layers=p["num_layers"], layer_strategy=p["layer_strategy"],
                                              dropout=p["dropout"])
    prepare_for_kbit_training(model)
    return apply_lora(model, **lora)


def _param_count(model) -> int:
    return int(sum(x.numel() for x in model.parameters()))


def train_stage(task: str, p: dict, data: dict, base: Path, tokenizer, seed: int, progress: bool, stage: Stages):
    """Train (and, per the profile, distill and prune) a model; returns (fp32 torch model, info)."""
    from training.finetune import train

    method = str(p.get("method", "full"))
    labels = data["labels"]
    tr_x, tr_y, va_x, va_y = data["train_x"], data["train_y"], data["val_x"], data["val_y"]
    info: dict[str, Any] = {"method": method}

    model = build_model(method, base, len(labels), p)
    cfg = train_config(p, seed, progress)
    if method in ("qlora", "8bit") and cfg.head_init == "prototype":
        # a quantized base must train before any eval-mode forward (bitsandbytes on CPU)
        cfg.head_init = "random"
    from training.adapters import trainable_parameters

    trainable, total = trainable_parameters(model)
    stage("train", f"{method} on {base.name}: layers {list(getattr(model, 'kept_layers', []))}, "
          f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable, batch {cfg.batch_size}, "
          f"loss {cfg.loss}, sampler {cfg.sampler or 'none'}")
    result = train(model, tokenizer, tr_x, tr_y, va_x, va_y, cfg, desc=f"train {task} ({method})")
    stage("train", f"{result.steps} steps in {result.seconds:.0f} s; best val macro-F1 {result.best_val_macro_f1:.4f} "
          f"at step {result.best_step}{' (early stop)' if result.stopped_early else ''}")
    info.update(train_steps=result.steps, train_seconds=round(result.seconds, 1), best_step=result.best_step,
                best_val_macro_f1=round(result.best_val_macro_f1, 6), stopped_early=result.stopped_early,
                history=result.history, trainable_parameters=trainable, config=result.config)
    if method != "full":
        from training.adapters import merge_for_export

        model = merge_for_export(model)
        stage("train", f"adapters merged into an fp32 model for export ({_param_count(model) / 1e6:.1f}M parameters)")
    info["layers"] = list(getattr(model, "kept_layers", []))
    stage.done("train")

    # distill ------------------------------------------------------------------------------------
    student_layers = p.get("student_layers")
    if student_layers and int(student_layers) < model.encoder.config.num_hidden_layers:
        from training.distill import distill, make_student

        student = make_student(base, len(labels), int(student_layers), teacher=model)
        dcfg = train_config(p, seed, progress, epochs=float(p.get("distill_epochs", 1.0)),
                            max_steps=p.get("distill_max_steps"), head_init="random",
                            lr=float(p.get("distill_lr", p["lr"])), head_lr=float(p.get("distill_head_lr", p["lr"])))
        stage("distill", f"{model.encoder.config.num_hidden_layers} -> {student_layers} layers, T={dcfg.distill_temperature}, "
              f"alpha={dcfg.distill_alpha}, {_param_count(model) / 1e6:.1f}M -> {_param_count(student) / 1e6:.1f}M parameters")
        dis_x, dis_y = tr_x, tr_y
        if not dcfg.max_steps:
            dis_x, dis_y, dcfg.epochs = _fraction_of_an_epoch(tr_x, tr_y, dcfg.epochs, int(p["batch_size"]), seed)
        dres = distill(model, student, tokenizer, dis_x, dis_y, va_x, va_y, dcfg)
        stage("distill", f"{dres.steps} steps in {dres.seconds:.0f} s; best val macro-F1 {dres.best_val_macro_f1:.4f}")
        info["distill"] = {"student_layers": int(student_layers), "teacher_layers": info["layers"],
                           "steps": dres.steps, "seconds": round(dres.seconds, 1),
                           "best_val_macro_f1": round(dres.best_val_macro_f1, 6),
                           "temperature": dcfg.distill_temperature, "alpha": dcfg.distill_alpha}
        model = student
        info["layers"] = list(getattr(student, "kept_layers", []))
        stage.done("distill")
    else:
        stage.skip("distill", "no student_layers in the profile")

    # prune --------------------------------------------------------------------------------------
    head_ratio, ffn_ratio = float(p.get("prune_heads", 0.0)), float(p.get("prune_ffn", 0.0))
    if head_ratio > 0 or ffn_ratio > 0:
        from training.distill import teacher_logits
        from training.finetune import encode, pad_id_of
        from training.prune import prune_encoder, recover

        rec_x, rec_y, rec_epochs = _fraction_of_an_epoch(tr_x, tr_y, float(p.get("recovery_epochs", 0.5)),
                                                         int(p["batch_size"]), seed)
        before_logits = teacher_logits(model, tokenizer, rec_x)
        example_ids = encode(tokenizer, tr_x[:64])
        stats = prune_encoder(model, head_ratio=head_ratio, ffn_ratio=ffn_ratio, example_ids=example_ids,
                              pad_id=pad_id_of(tokenizer))
        stage("prune", f"heads -{head_ratio:.0%}, FFN -{ffn_ratio:.0%}: {_fmt_stats(stats)}")
        rcfg = train_config(p, seed, progress, epochs=rec_epochs,
                            max_steps=p.get("recovery_max_steps"), head_init="random",
                            lr=float(p.get("recovery_lr", p["lr"])), head_lr=float(p.get("recovery_lr", p["lr"])))
        rres = recover(model, tokenizer, rec_x, rec_y, va_x, va_y, rcfg, teacher_logits=before_logits)
        stage("prune", f"recovery: {rres.steps} steps in {rres.seconds:.0f} s; best val macro-F1 {rres.best_val_macro_f1:.4f}")
        info["prune"] = {**json_safe(stats), "head_ratio": head_ratio, "ffn_ratio": ffn_ratio,
                         "recovery_steps": rres.steps, "recovery_seconds": round(rres.seconds, 1),
                         "recovery_best_val_macro_f1": round(rres.best_val_macro_f1, 6)}
        stage.done("prune")
    else:
        stage.skip("prune", "prune_heads and prune_ffn are 0")
    # lexical ------------------------------------------------------------------------------------
    if int(p.get("lexical_dim") or 0) > 0:
        info["lexical"] = lexical_stage(model, p, data, tokenizer, seed, progress, stage)
        stage.done("lexical")
    else:
        stage.skip("lexical", "lexical_dim is 0")
    info["parameters"] = _param_count(model)
    model.eval()
    return model, info


def lexical_stage(model, p: dict, data: dict, tokenizer, seed: int, progress: bool, stage: Stages) -> dict:
    """Train a ``training.lexical.LexicalHead`` on the training split, choose its weight on the
    calibration set (held-out phrasings) against the trained encoder's logits, attach it to ``model``."""
    from training.finetune import encode, macro_f1, pad_id_of, predict_logits
    from training.lexical import LexicalConfig, LexicalHead, choose_mix, lexical_logits, train_lexical

    cfg = LexicalConfig(dim=int(p["lexical_dim"]), epochs=int(p.get("lexical_epochs", LexicalConfig.epochs)),
                        lr=float(p.get("lexical_lr", LexicalConfig.lr)),
                        token_dropout=float(p.get("lexical_token_dropout", LexicalConfig.token_dropout)),
                        batch_size=int(p["batch_size"]), seed=seed, progress=progress)
    pad = pad_id_of(tokenizer)
    head = LexicalHead(tokenizer.get_vocab_size(), cfg.dim, len(data["labels"]), token_dropout=cfg.token_dropout)
    stage("lexical", f"bag of word pieces -> {cfg.dim} -> {len(data['labels'])}, {cfg.epochs} epochs, "
          f"token dropout {cfg.token_dropout}")
    res = train_lexical(head, encode(tokenizer, data["train_x"]), data["train_y"], encode(tokenizer, data["val_x"]),
                        data["val_y"], pad, cfg)
    calib_ids = encode(tokenizer, data["calib_x"])
    enc_logits = predict_logits(model, calib_ids, pad)
    lex_logits = lexical_logits(head, calib_ids, pad)
    mix, scores = choose_mix(enc_logits, lex_logits, data["calib_y"])
    lex_only = macro_f1(data["calib_y"], lex_logits.argmax(1))
    stage("lexical", f"{res.steps} steps in {res.seconds:.0f} s; {data['calib_name']} macro-F1: encoder {scores[0.0]:.4f}, "
          f"lexical {lex_only:.4f}, encoder + {mix:g} x lexical {scores[mix]:.4f}")
    if mix > 0:
        head.mix.fill_(mix)
        model.lexical = head.to(next(model.parameters()).device).eval()
    else:
        stage("lexical", "weight 0 is best: the lexical branch is left out of the model")
    return {"dim": cfg.dim, "epochs": cfg.epochs, "lr": cfg.lr, "token_dropout": cfg.token_dropout,
            "steps": res.steps, "seconds": round(res.seconds, 1), "val_accuracy": [round(a, 4) for a in res.val_accuracy],
            "mix": float(mix) if mix > 0 else 0.0, "calib_macro_f1_encoder": round(scores[0.0], 4),
            "calib_macro_f1_lexical": round(lex_only, 4), "calib_macro_f1_combined": round(scores[mix], 4),
            "used": mix > 0, "parameters": sum(t.numel() for t in head.parameters()) if mix > 0 else 0}


def _sample(n: int, fraction: float, batch_size: int, seed: int) -> list[int]:
    """A sorted random ``fraction`` of ``range(n)`` (at least one batch)."""
    size = min(n, max(batch_size, int(fraction * n)))
    return sorted(np.random.default_rng(seed).permutation(n)[:size].tolist())


def _fraction_of_an_epoch(texts: list, labels: list, epochs: float, batch_size: int, seed: int):
    """(texts, labels, epochs) for a distillation/recovery run: below one epoch, one pass over a fixed
    random sample of that size, so that the teacher's logits are only computed for what it trains on."""
    if epochs >= 1.0:
        return texts, labels, epochs
    keep = _sample(len(texts), epochs, batch_size, seed)
    return [texts[i] for i in keep], [labels[i] for i in keep], 1.0


def _fmt_stats(stats: dict) -> str:
    before, after = stats.get("params_before"), stats.get("params_after")
    if before and after:
        return f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters"
    return ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))


def load_task_data(task: str, p: dict, seed: int, stage: Stages) -> dict:
    from training.build import load_splits

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
    data = {
        "splits": splits,
        "labels": labels,
        "train_x": splits["train"].texts(), "train_y": splits["train"].label_ids(),
        "val_x": splits["val"].texts(), "val_y": splits["val"].label_ids(),
        "test_x": splits["test"].texts(), "test_y": splits["test"].label_ids(),
        "calib_x": calib.texts(), "calib_y": calib.label_ids(),
        "calib_name": "held-out-phrasing calibration set" if "calib" in splits else "validation set",
        "hashes": {s: d.sha256() for s, d in splits.items()},
    }
    data["train_support"] = np.bincount(np.asarray(data["train_y"]), minlength=len(labels))
    stage("data", f"{len(labels)} labels; train {len(data['train_x'])}, val {len(data['val_x'])}, "
          f"test {len(data['test_x'])} examples; {int((data['train_support'] > 0).sum())} labels seen in train")
    stage.done("data")
    return data


def run_pipeline(
    task: str,
    registry: str | Path,
    *,
    profile: str | dict = "default",
    seed: int = 0,
    progress: bool = True,
    base_model: str | Path | None = None,
    version: str | None = None,
    make_current: bool = True,
    model_card_base_url: str | None = None,
    keep_dir: str | Path | None = None,
) -> tuple[Path, dict]:
    """Build, evaluate and publish one task's model; returns (published folder, summary row).

    ``keep_dir``: also leave the work files (fp32 ONNX, int8 ONNX, tokenizer) there.
    """
    if task == "diagnosis" and not (isinstance(profile, dict) and profile.get("diagnosis", profile).get("classifier")):
        # the diagnosis model is the torch-free HPO phenotype ranker (training.phenotype); the text
        # classifier below stays available for comparison (--set classifier=true)
        from training.phenotype.build import build_diagnosis

        return build_diagnosis(registry, profile=profile, seed=seed, progress=progress, make_current=make_current,
                               model_card_base_url=model_card_base_url, version=version)
    import torch

    from training import calibrate as cal
    from training import evaluate as ev
    from training.build import MODEL_NAMES, base_model_name, labels_json, new_version, resolve_profile, setup_logging
    from training.export import check_export, export_onnx, parity, quantize, save_tokenizer
    from training.finetune import default_base_model, encode, load_tokenizer, pad_id_of
    from training.modelcard import render_model_card

    setup_logging(progress)
    p = resolve_profile(profile, task)
    profile_name = profile if isinstance(profile, str) else str(p.get("profile_name", "custom"))
    reg = ModelRegistry(registry)
    base = Path(base_model) if base_model else default_base_model()
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a Hugging Face model folder (no config.json); pass --base-model "
                                "with a local folder holding config.json, the weights and the tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stage = Stages(task)
    t_start = time.perf_counter()

    data = load_task_data(task, p, seed, stage)
    labels = data["labels"]
    torch.set_num_threads(int(p["threads"]))
    tokenizer = load_tokenizer(base, int(p["max_length"]))
    model, train_info = train_stage(task, p, data, base, tokenizer, seed, progress, stage)
    max_length = int(p["max_length"])

    with tempfile.TemporaryDirectory(prefix=f"ehrw-build-{task}-") as tmp:
        work = Path(keep_dir) if keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = work / "version"
        out.mkdir(exist_ok=True)
        fp32_path = work / "model.fp32.onnx"

        stage("export", "ONNX (opset 17, dynamic batch and sequence)")
        export_onnx(model, fp32_path)
        save_tokenizer(tokenizer, out / TOKENIZER_FILE, max_length)
        probe = encode(tokenizer, data["test_x"][:16] or ["x"])
        export_diff = check_export(model, fp32_path, probe, pad_id_of(tokenizer))
        stage("export", f"{fp32_path.stat().st_size / 1e6:.1f} MB; max |torch - onnx| = {export_diff:.1e}")
        stage.done("export")
        del model
        gc.collect()

        stage("quantize", f"int8 weights, {p['embeddings']} embeddings, per_channel={p['per_channel']}")
        quantize(fp32_path, out / MODEL_FILE, per_channel=bool(p["per_channel"]), embeddings=p["embeddings"])
        size = ev.sizes(fp32_path, out / MODEL_FILE)
        stage("quantize", f"{size['int8_bytes'] / 1e6:.1f} MB ({size['int8_over_fp32']:.3f} of fp32)")
        stage.done("quantize")

        threads = int(p["threads"])
        fp32_enc = OnnxTextEncoder(fp32_path, out / TOKENIZER_FILE, max_length, threads=threads)
        int8_enc = OnnxTextEncoder(out / MODEL_FILE, out / TOKENIZER_FILE, max_length, threads=threads)

        # calibrate on the int8 model's logits: the model that is served
        stage("calibrate", f"temperature + threshold for precision {p['target_precision']} on the {data['calib_name']} "
              f"({len(data['calib_x'])})")
        val_logits = int8_enc.logits(data["val_x"], batch_size=64)
        # without a held-out-phrasing sample the calibration set is the validation set: reuse its logits
        calib_logits = int8_enc.logits(data["calib_x"], batch_size=64) if "calib" in data["splits"] else val_logits
        conf_k = int(p.get("confidence_top_k", 1))
        calibration = cal.calibrate(calib_logits, data["calib_y"], float(p["target_precision"]), top_k=conf_k)
        calibration["val"]["set"] = data["calib_name"]
        calibration["val"]["n"] = len(data["calib_x"])
        temperature, threshold = calibration["temperature"], calibration["abstain_below"]
        stage("calibrate", f"T = {temperature}, abstain below {threshold:.4f} of top-{conf_k} mass (coverage "
              f"{calibration['val']['coverage']:.3f}, precision {calibration['val']['precision']:.3f}), "
              f"ECE {calibration['val']['ece_before']:.3f} -> {calibration['val']['ece_after']:.3f}")
        stage.done("calibrate")

        stage("evaluate", f"held-out test set ({len(data['test_x'])}), fp32 vs int8, latency on 1 thread")
        m_fp32, logits_fp32 = ev.evaluate_onnx(fp32_enc, data["test_x"], data["test_y"], temperature=temperature)
        m_int8, logits_int8 = ev.evaluate_onnx(int8_enc, data["test_x"], data["test_y"], temperature=temperature,
                                               threshold=threshold, confidence_top_k=conf_k)
        par = parity(logits_fp32, logits_int8)
        m_val_int8 = ev.classification_metrics(val_logits, data["val_y"], temperature=temperature)
        del fp32_enc, int8_enc
        lat_int8 = ev.latency(OnnxTextEncoder(out / MODEL_FILE, out / TOKENIZER_FILE, max_length, threads=1),
                              data["test_x"], n=int(p["latency_n"]), seed=seed)
        lat_fp32 = ev.latency(OnnxTextEncoder(fp32_path, out / TOKENIZER_FILE, max_length, threads=1),
                              data["test_x"], n=max(20, int(p["latency_n"]) // 3), seed=seed)
        from training.report import rare_class_f1

        rare_f1 = {
            "fp32": rare_class_f1(data["test_y"], logits_fp32.argmax(1), data["train_support"]),
            "int8": rare_class_f1(data["test_y"], logits_int8.argmax(1), data["train_support"]),
        }
        m_fp32["rare_f1"], m_int8["rare_f1"] = rare_f1["fp32"], rare_f1["int8"]
        stage("evaluate", f"test accuracy fp32 {m_fp32['accuracy']:.4f} / int8 {m_int8['accuracy']:.4f}, macro-F1 "
              f"{m_fp32['macro_f1']:.4f} / {m_int8['macro_f1']:.4f}, rare-class F1 {rare_f1['fp32']:.4f} / "
              f"{rare_f1['int8']:.4f}, top-1 agreement {par['top1_agreement']:.4f}; "
              f"p50 {lat_int8['p50_ms']:.2f} ms (int8) vs {lat_fp32['p50_ms']:.2f} ms (fp32)")
        report, comparison = None, None
        if p.get("report", True):
            report, comparison = write_report(task, p, data, out, fp32_path, base, temperature, threshold, seed, stage)
        stage.done("evaluate")

        version = version or new_version(reg, task)
        created = datetime.now(timezone.utc).replace(microsecond=0)
        training_info = {
            "profile": profile_name,
            "seed": seed,
            **{k: v for k, v in train_info.items() if k != "config"},
            "embeddings_quantization": p["embeddings"],
            "per_channel": bool(p["per_channel"]),
            "train_config": train_info.get("config"),
            "n_train": len(data["train_x"]),
            "n_val": len(data["val_x"]),
            "n_test": len(data["test_x"]),
            "n_calibration": len(data["calib_x"]),
            "calibration_set": data["calib_name"],
            "data_sha256": data["hashes"],
            "profile_values": dict(p),
            "torch_onnx_max_abs_diff": export_diff,
        }
        metrics = {
            "test": {"fp32": m_fp32, "int8": m_int8, "int8_vs_fp32_top1_agreement": par["top1_agreement"], "parity": par},
            "val": {"int8": m_val_int8},
            "calibration": calibration["val"],
            "size": size,
            "latency_int8": lat_int8,
            "latency_fp32": lat_fp32,
            "stage_seconds": stage.times,
        }
        if report is not None:
            metrics["report"] = {k: report.get(k) for k in ("rare_f1", "ece_before", "ece_after", "p50_ms", "p95_ms",
                                                              "peak_rss_mb", "size_mb", "top5_accuracy")}
            metrics["report"]["rare_classes"] = (report.get("rare") or {}).get("n_classes")
        if comparison is not None:
            metrics["comparison"] = comparison
        manifest_dict = {
            "task": task,
            "name": MODEL_NAMES.get(task, f"ehrw-{task}"),
            "version": version,
            "base_model": base_model_name(base),
            "labels": labels_json(labels),
            "max_length": max_length,
            "calibration": {"temperature": temperature, "abstain_below": threshold, "confidence_top_k": conf_k,
                            "target_precision": float(p["target_precision"])},
            "metrics": json_safe(metrics),
            "files": {},
            "training_data_sha256": data["hashes"]["train"],
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "format_version": 1,
            "model_card_url": f"{model_card_base_url.rstrip('/')}/{task}/{version}/MODEL_CARD.md" if model_card_base_url else None,
            "training": json_safe(training_info),
        }
        (out / MODEL_CARD_FILE).write_text(render_model_card(manifest_dict, profile=profile_name), encoding="utf-8")
        manifest_dict["files"] = checksum_files(out)
        manifest = Manifest.model_validate(manifest_dict)
        manifest.write(out / MANIFEST)
        dest = reg.publish(task, version, out, make_current=make_current)
        stage("register", f"{dest} ({'current' if make_current else 'not current'}) in "
              f"{time.perf_counter() - t_start:.0f} s")
        stage.done("register")

    row = {
        "task": task,
        "method": train_info["method"],
        "labels": len(labels),
        "test_n": len(data["test_x"]),
        "acc_fp32": m_fp32["accuracy"],
        "acc_int8": m_int8["accuracy"],
        "f1_fp32": m_fp32["macro_f1"],
        "f1_int8": m_int8["macro_f1"],
        "rare_f1_int8": rare_f1["int8"],
        "top5_int8": m_int8["top5_accuracy"],
        "mb_fp32": size["fp32_bytes"] / 1e6,
        "mb_int8": size["int8_bytes"] / 1e6,
        "ratio": size["int8_over_fp32"],
        "p50_ms": lat_int8["p50_ms"],
        "threshold": threshold,
        "coverage": m_int8["selective"]["coverage"],
        "train_seconds": round(sum(stage.times.get(s, 0.0) for s in ("train", "distill", "prune")), 1),
        "seconds": round(time.perf_counter() - t_start, 1),
        "path": str(dest),
    }
    return dest, row


def write_report(task, p, data, out: Path, fp32_path: Path, base: Path, temperature, threshold, seed, stage):
    """The evaluation report (and the general-base-model comparison) into ``out/report``."""
    from training.report import comparison_table, evaluation_report, general_baseline

    report_dir = out / REPORT_DIR
    label_names = [lab.display for lab in data["labels"]]
    report = evaluation_report(out / MODEL_FILE, out / TOKENIZER_FILE, int(p["max_length"]), data["test_x"],
                               data["test_y"], label_names, report_dir, temperature=temperature, threshold=threshold,
                               confidence_top_k=int(p.get("confidence_top_k", 1)),
                               train_support=data["train_support"], fp32_onnx_path=fp32_path,
                               latency_n=int(p["latency_n"]), title=f"ehrw-{task} (int8)")
    stage("evaluate", f"report: rare-class F1 {report['rare_f1']:.4f} over {report['rare']['n_classes']} classes, "
          f"ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}, p95 {report['p95_ms']:.2f} ms, "
          f"peak RSS {report['peak_rss_mb']:.0f} MB -> {report_dir}")
    comparison = None
    if p.get("baseline", True):
        with tempfile.TemporaryDirectory(prefix="ehrw-baseline-") as tmp:
            baseline = general_baseline(base, data["train_x"], data["train_y"], data["test_x"], data["test_y"],
                                        num_classes=len(data["labels"]), train_support=data["train_support"],
                                        max_length=int(p["max_length"]), max_train=int(p.get("baseline_max_train", 3000)),
                                        latency_n=max(30, int(p["latency_n"]) // 3), threads=int(p["threads"]),
                                        work_dir=tmp, seed=seed)
        ours = dict(report, model=f"fine-tuned compressed ehrw-{task} (int8)")
        rows = [baseline, ours]
        (report_dir / "COMPARISON.md").write_text(
            f"# {task}: general base model vs fine-tuned compressed model\n\n"
            f"Held-out test split ({len(data['test_x'])} examples); latency on one thread, single order; "
            f"peak RSS of a fresh process that loads the model and runs the test texts.\n\n"
            + comparison_table(rows) + "\n", encoding="utf-8")
        keys = ("model", "accuracy", "macro_f1", "rare_f1", "p50_ms", "p95_ms", "size_mb", "peak_rss_mb")
        comparison = [{k: r.get(k) for k in keys} for r in rows]
        stage("evaluate", f"general base model fp32: accuracy {baseline['accuracy']:.4f}, rare-class F1 "
              f"{baseline['rare_f1']:.4f}, p50 {baseline['p50_ms']:.1f} ms, {baseline['size_mb']:.0f} MB")
    return report, comparison


__all__ = ["METHODS", "Stages", "build_model", "lexical_stage", "run_pipeline", "train_config", "train_stage"]
