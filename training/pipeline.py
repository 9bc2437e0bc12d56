"""One model, end to end: data -> train -> distill -> prune -> lexical -> export -> quantize ->
calibrate -> evaluate -> register.

``run_pipeline(task, registry, profile="default")`` is what ``python -m training pipeline --task``,
``python -m training build`` and ``ehr-worker models build`` run; it reads top to bottom, one
function per stage. Every stage reads its options from the profile (a
:class:`training.profiles.Profile`); a stage whose options are off is skipped and says so:

- ``train``: ``method`` = ``full`` (all weights), ``lora``, ``qlora`` (4-bit NF4 + double
  quantization base, LoRA adapters) or ``8bit`` (8-bit base, LoRA adapters) on ``num_layers`` of
  the base model; ``loss`` (``ce``/``focal``), ``class_weights``, ``sampler`` (``weighted``).
  Adapters are merged into an fp32 model before distillation/export.
- ``distill``: when ``student_layers`` is set, a shallower student initialised from the trained
  model's layers learns from its logits (KL at ``distill_temperature`` plus CE).
- ``prune``: when ``prune_heads``/``prune_ffn`` are > 0, structured pruning of attention heads and
  FFN channels (torch-pruning), then a recovery fine-tune distilled from the unpruned model.
- ``lexical``: when ``lexical_dim`` > 0, a bag-of-word-pieces branch added to the encoder's logits.
  (These four are in ``training.stages``.)
- ``export``/``quantize``/``calibrate``: ONNX, int8 (dynamic, per-channel), temperature and
  abstention threshold fitted on the int8 model's held-out-phrasing calibration logits.
- ``evaluate``: fp32 vs int8 on the held-out test split, plus the report of ``training.report``
  (per-class and rare-class F1, confusion and reliability PNGs, latency p50/p95, peak RSS) and,
  with ``baseline``, the comparison against the unchanged general base model in fp32
  (``training.baseline``). The report goes into the version folder (``report/``) so it travels,
  checksummed, with the model.
- ``register``: manifest + ``MODEL_CARD.md``, published atomically into the registry.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.registry import (
    MANIFEST,
    MODEL_CARD_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Manifest,
    ModelRegistry,
    checksum_files,
)
from models.runtime import OnnxTextEncoder
from schemas.tasks import MODEL_NAMES
from training import calibrate as cal
from training import evaluate as ev
from training.baseline import general_baseline
from training.evaluate import json_safe, rare_class_f1
from training.export import check_export, export_onnx, parity, quantize, save_tokenizer
from training.model import (
    EncoderClassifier,
    base_model_name,
    count_parameters,
    default_base_model,
    encode,
    load_tokenizer,
    pad_id_of,
)
from training.modelcard import render_model_card
from training.phenotype.build import build_diagnosis
from training.profiles import Profile, resolve_profile
from training.protocol_eval import calibrate_on_exams, write_exam_slices
from training.report import comparison_table, evaluation_report
from training.stages import (
    Run,
    Stages,
    distill_stage,
    lexical_stage,
    load_task_data,
    prune_stage,
    setup_logging,
    train_stage,
)

REPORT_DIR = "report"


def run_pipeline(
    task: str,
    registry: str | Path,
    *,
    profile: str | Profile | Mapping[str, Any] = "default",
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
    setup_logging(progress)
    p = resolve_profile(profile, task)
    if task == "diagnosis" and not p.classifier:
        # the diagnosis model is the torch-free HPO phenotype ranker (training.phenotype); the text
        # classifier below stays available for comparison (--set classifier=true)
        return build_diagnosis(registry, profile={"profile_name": p.name, "hpo": p.hpo}, seed=seed,
                               progress=progress, make_current=make_current,
                               model_card_base_url=model_card_base_url, version=version)
    reg = ModelRegistry(registry)
    base = base_model_folder(base_model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stage = Stages(task)

    data = load_task_data(task, p, seed, stage)
    torch.set_num_threads(p.threads)
    run = Run(task, p, data, base, load_tokenizer(base, p.max_length), seed, progress, stage)

    model, info = train_stage(run)
    model = distill_stage(run, model, info)
    prune_stage(run, model, info)
    lexical_stage(run, model, info)
    info["parameters"] = count_parameters(model)
    model.eval()

    with tempfile.TemporaryDirectory(prefix=f"ehrw-build-{task}-") as tmp:
        files = ModelFiles.in_folder(Path(keep_dir) if keep_dir else Path(tmp))
        export_diff = export_stage(run, model, files)
        del model  # the ONNX files are the model from here on
        gc.collect()
        size = quantize_stage(run, files)
        calibration = calibrate_stage(run, files)
        evaluation = evaluate_stage(run, files, calibration)
        dest = register_stage(run, files, info, calibration, evaluation, registry=reg, export_diff=export_diff,
                              size=size, version=version or reg.new_version(task), make_current=make_current,
                              model_card_base_url=model_card_base_url)
    return dest, summary_row(run, info, evaluation, size, calibration, dest)


def base_model_folder(base_model: str | Path | None) -> Path:
    base = Path(base_model) if base_model else default_base_model()
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a Hugging Face model folder (no config.json); pass --base-model "
                                "with a local folder holding config.json, the weights and the tokenizer")
    return base


@dataclass
class ModelFiles:
    """Where the exported model lives while it is evaluated: ``version/`` becomes the registry's
    version folder; the fp32 export stays outside it."""

    work: Path
    version: Path
    fp32: Path

    @classmethod
    def in_folder(cls, work: Path) -> ModelFiles:
        work.mkdir(parents=True, exist_ok=True)
        (work / "version").mkdir(exist_ok=True)
        return cls(work, work / "version", work / "model.fp32.onnx")

    @property
    def int8(self) -> Path:
        return self.version / MODEL_FILE

    @property
    def tokenizer(self) -> Path:
        return self.version / TOKENIZER_FILE

    def encoder(self, model: Path, max_length: int, threads: int) -> OnnxTextEncoder:
        return OnnxTextEncoder(model, self.tokenizer, max_length, threads=threads)


def export_stage(run: Run, model: EncoderClassifier, files: ModelFiles) -> float:
    """fp32 ONNX and the tokenizer; returns the largest logit difference between torch and ONNX."""
    run.stage("export", "ONNX (opset 17, dynamic batch and sequence)")
    export_onnx(model, files.fp32)
    save_tokenizer(run.tokenizer, files.tokenizer, run.profile.max_length)
    probe = encode(run.tokenizer, run.data.test_x[:16] or ["x"])
    export_diff = check_export(model, files.fp32, probe, pad_id_of(run.tokenizer))
    run.stage("export", f"{files.fp32.stat().st_size / 1e6:.1f} MB; max |torch - onnx| = {export_diff:.1e}")
    run.stage.done("export")
    return export_diff


def quantize_stage(run: Run, files: ModelFiles) -> dict:
    """int8 ONNX into the version folder; returns the sizes (``training.evaluate.sizes``)."""
    p = run.profile
    lexical = p.lexical_embeddings or p.embeddings
    run.stage("quantize", f"int8 weights, {p.embeddings} embeddings, {lexical} lexical table, "
              f"per_channel={p.per_channel}")
    quantize(files.fp32, files.int8, per_channel=p.per_channel, embeddings=p.embeddings, lexical=lexical)
    size = ev.sizes(files.fp32, files.int8)
    run.stage("quantize", f"{size['int8_bytes'] / 1e6:.1f} MB ({size['int8_over_fp32']:.3f} of fp32)")
    run.stage.done("quantize")
    return size


@dataclass
class Calibration:
    temperature: float
    threshold: float  # abstain below this top-k probability mass
    top_k: int
    summary: dict  # the manifest's metrics.calibration
    val_logits: np.ndarray  # the int8 model's, on the validation split


def calibrate_stage(run: Run, files: ModelFiles) -> Calibration:
    """Temperature and abstention threshold fitted on the int8 model's logits (the model that is
    served) on the calibration set, for the profile's ``target_precision``."""
    p, data = run.profile, run.data
    int8 = files.encoder(files.int8, p.max_length, p.threads)
    run.stage("calibrate", f"temperature + threshold for precision {p.target_precision} on the {data.calib_name} "
              f"({len(data.calib_x)})")
    val_logits = int8.logits(data.val_x, batch_size=64)
    # without a held-out-phrasing sample the calibration set is the validation set: reuse its logits
    calib_logits = int8.logits(data.calib_x, batch_size=64) if data.heldout_calibration else val_logits
    fitted = cal.calibrate(calib_logits, data.calib_y, p.target_precision, top_k=p.confidence_top_k)
    if run.task == "protocol":  # served restricted to the ordered exam: fit the threshold on that
        fitted = calibrate_on_exams(fitted, calib_logits, data.splits.get("calib", data.splits["val"]), data.calib_y,
                                    p.target_precision, **data.catalog_kw)
    summary = fitted["val"]
    summary["set"] = data.calib_name
    summary["n"] = len(data.calib_x)
    result = Calibration(fitted["temperature"], fitted["abstain_below"], p.confidence_top_k, summary, val_logits)
    run.stage("calibrate", f"T = {result.temperature}, abstain below {result.threshold:.4f} of top-{result.top_k} "
              f"mass (coverage {summary['coverage']:.3f}, precision {summary['precision']:.3f}), "
              f"ECE {summary['ece_before']:.3f} -> {summary['ece_after']:.3f}")
    run.stage.done("calibrate")
    return result


@dataclass
class Evaluation:
    fp32: dict  # test metrics of the fp32 export
    int8: dict  # ... of the int8 model, with its abstention
    parity: dict  # int8 vs fp32 logits
    val_int8: dict
    latency_int8: dict
    latency_fp32: dict
    report: dict | None  # training.report.evaluation_report (profile.report)
    comparison: list[dict] | None  # against the general base model (profile.baseline)


def evaluate_stage(run: Run, files: ModelFiles, calibration: Calibration) -> Evaluation:
    """fp32 vs int8 on the held-out test split, latency on one thread, and the report."""
    p, data, seed = run.profile, run.data, run.seed
    temperature = calibration.temperature
    run.stage("evaluate", f"held-out test set ({len(data.test_x)}), fp32 vs int8, latency on 1 thread")
    m_fp32, logits_fp32 = ev.evaluate_onnx(files.encoder(files.fp32, p.max_length, p.threads), data.test_x,
                                           data.test_y, temperature=temperature)
    m_int8, logits_int8 = ev.evaluate_onnx(files.encoder(files.int8, p.max_length, p.threads), data.test_x,
                                           data.test_y, temperature=temperature, threshold=calibration.threshold,
                                           confidence_top_k=calibration.top_k)
    par = parity(logits_fp32, logits_int8)
    m_val_int8 = ev.classification_metrics(calibration.val_logits, data.val_y, temperature=temperature)
    lat_int8 = ev.latency(files.encoder(files.int8, p.max_length, 1), data.test_x, n=p.latency_n, seed=seed)
    lat_fp32 = ev.latency(files.encoder(files.fp32, p.max_length, 1), data.test_x, n=max(20, p.latency_n // 3),
                          seed=seed)
    m_fp32["rare_f1"] = rare_class_f1(data.test_y, logits_fp32.argmax(1), data.train_support)
    m_int8["rare_f1"] = rare_class_f1(data.test_y, logits_int8.argmax(1), data.train_support)
    run.stage("evaluate", f"test accuracy fp32 {m_fp32['accuracy']:.4f} / int8 {m_int8['accuracy']:.4f}, macro-F1 "
              f"{m_fp32['macro_f1']:.4f} / {m_int8['macro_f1']:.4f}, rare-class F1 {m_fp32['rare_f1']:.4f} / "
              f"{m_int8['rare_f1']:.4f}, top-1 agreement {par['top1_agreement']:.4f}; "
              f"p50 {lat_int8['p50_ms']:.2f} ms (int8) vs {lat_fp32['p50_ms']:.2f} ms (fp32)")
    if run.task == "protocol":  # top-1/top-3/coverage by slice, restricted to the ordered exam
        m_int8["protocol_slices"] = write_exam_slices(files.version / REPORT_DIR, logits_int8, data, temperature,
                                                      calibration.threshold, **data.catalog_kw)
    report = evaluation_report_stage(run, files, calibration) if p.report else None
    comparison = baseline_comparison(run, files, report) if report is not None and p.baseline else None
    run.stage.done("evaluate")
    return Evaluation(m_fp32, m_int8, par, m_val_int8, lat_int8, lat_fp32, report, comparison)


def evaluation_report_stage(run: Run, files: ModelFiles, calibration: Calibration) -> dict:
    """The evaluation report into ``version/report``."""
    p, data = run.profile, run.data
    report_dir = files.version / REPORT_DIR
    report = evaluation_report(files.int8, files.tokenizer, p.max_length, data.test_x, data.test_y,
                               [label.display for label in data.labels], report_dir,
                               temperature=calibration.temperature, threshold=calibration.threshold,
                               confidence_top_k=calibration.top_k, train_support=data.train_support,
                               fp32_onnx_path=files.fp32, latency_n=p.latency_n, title=f"ehrw-{run.task} (int8)")
    run.stage("evaluate", f"report: rare-class F1 {report['rare_f1']:.4f} over {report['rare']['n_classes']} classes, "
              f"ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}, p95 {report['p95_ms']:.2f} ms, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB -> {report_dir}")
    return report


def baseline_comparison(run: Run, files: ModelFiles, report: dict) -> list[dict]:
    """The unchanged general base model against ours, into ``version/report/COMPARISON.md``."""
    p, data = run.profile, run.data
    with tempfile.TemporaryDirectory(prefix="ehrw-baseline-") as tmp:
        baseline = general_baseline(run.base, data.train_x, data.train_y, data.test_x, data.test_y,
                                    num_classes=len(data.labels), train_support=data.train_support,
                                    max_length=p.max_length, max_train=p.baseline_max_train,
                                    latency_n=max(30, p.latency_n // 3), threads=p.threads, work_dir=tmp,
                                    seed=run.seed)
    rows = [baseline, dict(report, model=f"fine-tuned compressed ehrw-{run.task} (int8)")]
    (files.version / REPORT_DIR / "COMPARISON.md").write_text(
        f"# {run.task}: general base model vs fine-tuned compressed model\n\n"
        f"Held-out test split ({len(data.test_x)} examples); latency on one thread, single order; "
        f"peak RSS of a fresh process that loads the model and runs the test texts.\n\n"
        + comparison_table(rows) + "\n", encoding="utf-8")
    run.stage("evaluate", f"general base model fp32: accuracy {baseline['accuracy']:.4f}, rare-class F1 "
              f"{baseline['rare_f1']:.4f}, p50 {baseline['p50_ms']:.1f} ms, {baseline['size_mb']:.0f} MB")
    keys = ("model", "accuracy", "macro_f1", "rare_f1", "p50_ms", "p95_ms", "size_mb", "peak_rss_mb")
    return [{k: r.get(k) for k in keys} for r in rows]


def register_stage(run: Run, files: ModelFiles, info: dict[str, Any], calibration: Calibration,
                   evaluation: Evaluation, *, registry: ModelRegistry, export_diff: float, size: dict,
                   version: str, make_current: bool, model_card_base_url: str | None) -> Path:
    """Manifest and model card into the version folder, checksummed, published into the registry."""
    p, data, task = run.profile, run.data, run.task
    created = datetime.now(timezone.utc).replace(microsecond=0)
    training_info = {
        "profile": p.name,
        "seed": run.seed,
        **{k: v for k, v in info.items() if k != "config"},
        "embeddings_quantization": p.embeddings,
        "lexical_quantization": (p.lexical_embeddings or p.embeddings) if p.lexical_dim else None,
        "per_channel": p.per_channel,
        "train_config": info.get("config"),
        "n_train": len(data.train_x),
        "n_val": len(data.val_x),
        "n_test": len(data.test_x),
        "n_calibration": len(data.calib_x),
        "calibration_set": data.calib_name,
        "data_sha256": data.hashes,
        "profile_values": p.values(),
        "torch_onnx_max_abs_diff": export_diff,
    }
    metrics: dict[str, Any] = {
        "test": {"fp32": evaluation.fp32, "int8": evaluation.int8,
                 "int8_vs_fp32_top1_agreement": evaluation.parity["top1_agreement"], "parity": evaluation.parity},
        "val": {"int8": evaluation.val_int8},
        "calibration": calibration.summary,
        "size": size,
        "latency_int8": evaluation.latency_int8,
        "latency_fp32": evaluation.latency_fp32,
        "stage_seconds": run.stage.times,
    }
    report = evaluation.report
    if report is not None:
        metrics["report"] = {k: report.get(k) for k in ("rare_f1", "ece_before", "ece_after", "p50_ms", "p95_ms",
                                                          "peak_rss_mb", "size_mb", "top5_accuracy")}
        metrics["report"]["rare_classes"] = (report.get("rare") or {}).get("n_classes")
    if evaluation.comparison is not None:
        metrics["comparison"] = evaluation.comparison
    card_url = f"{model_card_base_url.rstrip('/')}/{task}/{version}/MODEL_CARD.md" if model_card_base_url else None
    manifest_dict = {
        "task": task,
        "name": MODEL_NAMES.get(task, f"ehrw-{task}"),
        "version": version,
        "base_model": base_model_name(run.base),
        "labels": [dataclasses.asdict(label) for label in data.labels],
        "max_length": p.max_length,
        "calibration": {"temperature": calibration.temperature, "abstain_below": calibration.threshold,
                        "confidence_top_k": calibration.top_k, "target_precision": p.target_precision},
        "metrics": json_safe(metrics),
        "files": {},
        "training_data_sha256": data.hashes["train"],
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "format_version": 1,
        "model_card_url": card_url,
        "training": json_safe(training_info),
        **data.manifest_extra,  # a hospital catalog's attributes (training.protocol_catalog)
    }
    (files.version / MODEL_CARD_FILE).write_text(render_model_card(manifest_dict, profile=p.name), encoding="utf-8")
    manifest_dict["files"] = checksum_files(files.version)
    Manifest.model_validate(manifest_dict).write(files.version / MANIFEST)
    dest = registry.publish(task, version, files.version, make_current=make_current)
    run.stage("register", f"{dest} ({'current' if make_current else 'not current'}) in "
              f"{time.perf_counter() - run.stage.started:.0f} s")
    run.stage.done("register")
    return dest


def summary_row(run: Run, info: dict[str, Any], evaluation: Evaluation, size: dict, calibration: Calibration,
                dest: Path) -> dict:
    """One line of ``training.evaluate.summary_table``."""
    m_fp32, m_int8, times = evaluation.fp32, evaluation.int8, run.stage.times
    return {
        "task": run.task,
        "method": info["method"],
        "labels": len(run.data.labels),
        "test_n": len(run.data.test_x),
        "acc_fp32": m_fp32["accuracy"],
        "acc_int8": m_int8["accuracy"],
        "f1_fp32": m_fp32["macro_f1"],
        "f1_int8": m_int8["macro_f1"],
        "rare_f1_int8": m_int8["rare_f1"],
        "top5_int8": m_int8["top5_accuracy"],
        "mb_fp32": size["fp32_bytes"] / 1e6,
        "mb_int8": size["int8_bytes"] / 1e6,
        "ratio": size["int8_over_fp32"],
        "p50_ms": evaluation.latency_int8["p50_ms"],
        "threshold": calibration.threshold,
        "coverage": m_int8["selective"]["coverage"],
        "train_seconds": round(sum(times.get(s, 0.0) for s in ("train", "distill", "prune")), 1),
        "seconds": round(time.perf_counter() - run.stage.started, 1),
        "path": str(dest),
    }


__all__ = ["REPORT_DIR", "run_pipeline"]
