"""Build the registry's models: data -> train -> export -> quantize -> calibrate -> evaluate -> register.

``build_models(registry, tasks=("protocol", "diagnosis"), profile="default")`` is what
``python -m training build`` and ``ehr-worker models build`` call. A profile is a plain dict of
values (``PROFILES``); ``default`` builds the shipped models (about a quarter of an hour on two
CPU cores), ``tiny`` builds real but small models in well under a minute for tests and CI.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

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

log = logging.getLogger("training")

TASKS = ("protocol", "diagnosis")
MODEL_NAMES = {"protocol": "ehrw-protocol", "diagnosis": "ehrw-diagnosis"}

_COMMON_DEFAULT: dict[str, Any] = {
    "num_layers": 3,  # of the 6 MiniLM layers: 0, 2, 4 ("spread"); the latency budget is per layer
    "layer_strategy": "spread",
    "max_length": 128,
    "batch_size": 32,
    "lr": 1e-4,
    "head_lr": 2e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.06,
    "grad_clip": 1.0,
    "dropout": 0.1,
    "label_smoothing": 0.0,
    "evals_per_epoch": 2,
    "patience": 3,
    "threads": 2,
    "bf16": "auto",  # bfloat16 autocast while training where the CPU supports it natively
    "head_init": "prototype",  # start the head from class means: far faster with hundreds of classes
    "prototype_per_class": 8,
    "freeze_embeddings": True,  # the word-embedding table stays as pretrained: faster, no overfit to generator vocab
    # int8 embeddings + per-channel int8 weights. Measured on a 600-class diagnosis model (test top-1
    # agreement with fp32 / accuracy change): per-channel 0.86 / -0.1 pt, per-tensor 0.54 / -4.8 pt;
    # int4 embeddings (19-22 % of fp32 instead of 25.3 %) 0.64-0.80 / -0.6 to -3.4 pt.
    "embeddings": "int8",
    "per_channel": True,
    "latency_n": 300,
    "calibration_split": "heldout",  # "val" or "heldout" (a held-out-phrasing sample, see load_splits)
}

_TINY: dict[str, Any] = {
    **_COMMON_DEFAULT,
    "num_layers": 1,
    "max_length": 64,
    "epochs": None,
    "max_steps": 80,
    "batch_size": 32,
    "lr": 1e-3,
    "head_lr": 2e-2,
    "evals_per_epoch": 1,
    "patience": 0,
    "class_weights": None,
    "latency_n": 30,
}

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        # Budget: both models in about 15 minutes on 2 (shared) CPU cores. Fresh examples beat extra
        # epochs over the same ones (the test split uses held-out phrasings), so: many examples, ~1 epoch.
        "protocol": {
            **_COMMON_DEFAULT,
            "n_train": 12000,
            "n_val": 1000,
            "n_test": 2000,
            "epochs": 1.5,  # 2 epochs measured no better on the held-out-phrasing test (0.731 either way)
            "lr": 1.5e-4,
            "head_lr": 3e-3,
            "class_weights": "sqrt",
            "target_precision": 0.9,
        },
        "diagnosis": {
            **_COMMON_DEFAULT,
            "max_diseases": 600,
            "n_train_per_disease": 32,
            "n_val_per_disease": 2,
            "n_test_per_disease": 3,
            "epochs": 1.5,
            "lr": 2e-4,
            "head_lr": 5e-3,
            "class_weights": None,
            "target_precision": 0.8,
        },
    },
    "tiny": {
        "protocol": {**_TINY, "n_train": 1020, "n_val": 102, "n_test": 102, "target_precision": 0.9},
        "diagnosis": {
            **_TINY,
            "max_diseases": 30,
            "n_train_per_disease": 8,
            "n_val_per_disease": 2,
            "n_test_per_disease": 2,
            "target_precision": 0.8,
        },
    },
}


def resolve_profile(profile: str | dict, task: str) -> dict[str, Any]:
    if isinstance(profile, dict):
        values = profile.get(task, profile)
        return {**_COMMON_DEFAULT, **values}
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    return copy.deepcopy(PROFILES[profile][task])


# ---------------------------------------------------------------------------------------------
# stages


class _Stages:
    def __init__(self, task: str):
        self.task = task
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.times: dict[str, float] = {}

    def __call__(self, name: str, message: str = "") -> None:
        log.info("[%s] %-9s %s", self.task, name, message)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self.last, 1)
        self.last = now


CALIBRATION_SEED_OFFSET = 7919


def load_splits(task: str, p: dict, seed: int) -> dict:
    """train / val / test, plus ``calib`` when ``calibration_split`` is ``heldout``: a second sample
    of the test generator (held-out phrasings, another seed, no example shared with test), so the
    temperature and threshold are fitted on text that differs from training the way real orders do."""
    heldout = p.get("calibration_split", "val") == "heldout"
    if task == "protocol":
        from training.datasets import protocol

        out = {s: protocol.generate(int(p[f"n_{s}"]), seed=seed, split=s) for s in ("train", "val", "test")}
        if heldout:
            out["calib"] = protocol.generate(int(p["n_val"]), seed=seed + CALIBRATION_SEED_OFFSET, split="test")
        return out
    if task == "diagnosis":
        from training.datasets import diagnosis

        def gen(n: int, split: str, s: int):
            return diagnosis.generate(n, seed=s, split=split, max_diseases=p.get("max_diseases"))

        out = {s: gen(int(p[f"n_{s}_per_disease"]), s, seed) for s in ("train", "val", "test")}
        if heldout:
            out["calib"] = gen(int(p["n_val_per_disease"]), "test", seed + CALIBRATION_SEED_OFFSET)
        return out
    raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def _labels_json(labels) -> list[dict]:
    return [{"system": lab.system, "code": lab.code, "display": lab.display} for lab in labels]


def new_version(registry: ModelRegistry, task: str, now: datetime | None = None) -> str:
    base = (now or datetime.now(timezone.utc)).strftime("%Y%m%d.%H%M%S")
    existing = set(registry.versions(task)) if (registry.root / task).is_dir() else set()
    version, n = base, 1
    while version in existing or (registry.root / task / version).exists():
        version = f"{base}.{n}"
        n += 1
    return version


def _setup_logging(progress: bool) -> None:
    if progress and not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_task(
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
    import torch

    from training import calibrate as cal
    from training import evaluate as ev
    from training.export import check_export, export_onnx, parity, quantize, save_tokenizer
    from training.finetune import (
        EncoderClassifier,
        TrainConfig,
        bf16_supported,
        default_base_model,
        encode,
        load_tokenizer,
        pad_id_of,
        train,
    )
    from training.modelcard import render_model_card

    _setup_logging(progress)
    p = resolve_profile(profile, task)
    profile_name = profile if isinstance(profile, str) else "custom"
    reg = ModelRegistry(registry)
    base = Path(base_model) if base_model else default_base_model()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stage = _Stages(task)
    t_start = time.perf_counter()

    # 1. data ----------------------------------------------------------------------------------
    stage("data", "generating train/val/test")
    data = load_splits(task, p, seed)
    train_ds, val_ds, test_ds = data["train"], data["val"], data["test"]
    if "calib" in data:  # never calibrate on an order that is also in the test set
        test_set = set(data["test"].texts())
        keep = [i for i, t in enumerate(data["calib"].texts()) if t not in test_set]
        data["calib"] = data["calib"].subset(keep)
    calib_ds = data.get("calib", val_ds)
    labels = list(train_ds.labels)
    if any(d.labels != labels for d in data.values()):
        raise RuntimeError(f"{task}: the train/val/test datasets have different label spaces")
    train_texts, val_texts, test_texts = train_ds.texts(), val_ds.texts(), test_ds.texts()
    y_train, y_val, y_test = train_ds.label_ids(), val_ds.label_ids(), test_ds.label_ids()
    hashes = {s: d.sha256() for s, d in data.items()}
    stage("data", f"{len(labels)} labels; train {len(train_ds)}, val {len(val_ds)}, test {len(test_ds)} examples; "
          f"{len(set(y_train))} labels seen in train")
    stage.done("data")

    # 2. train ---------------------------------------------------------------------------------
    torch.set_num_threads(int(p["threads"]))
    tokenizer = load_tokenizer(base, int(p["max_length"]))
    model = EncoderClassifier.from_pretrained(
        base, len(labels), num_layers=p["num_layers"], layer_strategy=p["layer_strategy"], dropout=p["dropout"]
    )
    cfg = TrainConfig(
        epochs=float(p.get("epochs") or 1.0),
        max_steps=p.get("max_steps"),
        batch_size=int(p["batch_size"]),
        lr=float(p["lr"]),
        head_lr=float(p["head_lr"]),
        weight_decay=float(p["weight_decay"]),
        warmup_ratio=float(p["warmup_ratio"]),
        grad_clip=float(p["grad_clip"]),
        class_weights=p.get("class_weights"),
        label_smoothing=float(p["label_smoothing"]),
        evals_per_epoch=int(p["evals_per_epoch"]),
        patience=int(p["patience"]),
        max_length=int(p["max_length"]),
        threads=int(p["threads"]),
        seed=seed,
        bf16=bf16_supported() if p.get("bf16") == "auto" else bool(p.get("bf16")),
        freeze_embeddings=bool(p.get("freeze_embeddings")),
        head_init=str(p.get("head_init", "random")),
        prototype_per_class=int(p.get("prototype_per_class", 16)),
        progress=progress,
    )
    stage("train", f"{base.name}: layers {model.kept_layers}, {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M "
          f"parameters, max_length {cfg.max_length}, batch {cfg.batch_size}")
    kept_layers = list(model.kept_layers)
    result = train(model, tokenizer, train_texts, y_train, val_texts, y_val, cfg, desc=f"train {task}")
    stage("train", f"{result.steps} steps in {result.seconds:.0f} s; best val macro-F1 {result.best_val_macro_f1:.4f} "
          f"at step {result.best_step}{' (early stop)' if result.stopped_early else ''}")
    stage.done("train")

    with tempfile.TemporaryDirectory(prefix=f"ehrw-build-{task}-") as tmp:
        work = Path(keep_dir) if keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = work / "version"
        out.mkdir(exist_ok=True)
        fp32_path = work / "model.fp32.onnx"

        # 3. export ----------------------------------------------------------------------------
        stage("export", "ONNX (opset 17, dynamic batch and sequence)")
        export_onnx(model, fp32_path)
        save_tokenizer(tokenizer, out / TOKENIZER_FILE, int(p["max_length"]))
        probe = encode(tokenizer, test_texts[:16] or ["x"])
        export_diff = check_export(model, fp32_path, probe, pad_id_of(tokenizer))
        stage("export", f"{fp32_path.stat().st_size / 1e6:.1f} MB; max |torch - onnx| = {export_diff:.1e}")
        stage.done("export")
        del model
        gc.collect()

        # 4. quantize ---------------------------------------------------------------------------
        stage("quantize", f"int8 weights, {p['embeddings']} embeddings, per_channel={p['per_channel']}")
        quantize(fp32_path, out / MODEL_FILE, per_channel=bool(p["per_channel"]), embeddings=p["embeddings"])
        size = ev.sizes(fp32_path, out / MODEL_FILE)
        stage("quantize", f"{size['int8_bytes'] / 1e6:.1f} MB ({size['int8_over_fp32']:.3f} of fp32)")
        stage.done("quantize")

        eval_threads = int(p["threads"])
        fp32_enc = OnnxTextEncoder(fp32_path, out / TOKENIZER_FILE, int(p["max_length"]), threads=eval_threads)
        int8_enc = OnnxTextEncoder(out / MODEL_FILE, out / TOKENIZER_FILE, int(p["max_length"]), threads=eval_threads)

        # 5. calibrate (on the int8 model's validation logits: the model that is served) ------
        calib_name = "held-out-phrasing calibration set" if "calib" in data else "validation set"
        stage("calibrate", f"temperature + threshold for precision {p['target_precision']} on the {calib_name} "
              f"({len(calib_ds)})")
        val_logits = int8_enc.logits(val_texts, batch_size=64)
        calib_logits = val_logits if calib_ds is val_ds else int8_enc.logits(calib_ds.texts(), batch_size=64)
        calibration = cal.calibrate(calib_logits, calib_ds.label_ids(), float(p["target_precision"]))
        calibration["val"]["set"] = calib_name
        calibration["val"]["n"] = len(calib_ds)
        temperature, threshold = calibration["temperature"], calibration["abstain_below"]
        stage("calibrate", f"T = {temperature}, abstain below {threshold:.4f} (coverage "
              f"{calibration['val']['coverage']:.3f}, precision {calibration['val']['precision']:.3f}), "
              f"ECE {calibration['val']['ece_before']:.3f} -> {calibration['val']['ece_after']:.3f}")
        stage.done("calibrate")

        # 6. evaluate ---------------------------------------------------------------------------
        stage("evaluate", f"held-out test set ({len(test_texts)}), fp32 vs int8, latency on 1 thread")
        m_fp32, logits_fp32 = ev.evaluate_onnx(fp32_enc, test_texts, y_test, temperature=temperature)
        m_int8, logits_int8 = ev.evaluate_onnx(int8_enc, test_texts, y_test, temperature=temperature, threshold=threshold)
        par = parity(logits_fp32, logits_int8)
        m_val_int8 = ev.classification_metrics(val_logits, y_val, temperature=temperature)
        del fp32_enc, int8_enc
        lat_int8 = ev.latency(OnnxTextEncoder(out / MODEL_FILE, out / TOKENIZER_FILE, int(p["max_length"]), threads=1),
                              test_texts, n=int(p["latency_n"]), seed=seed)
        lat_fp32 = ev.latency(OnnxTextEncoder(fp32_path, out / TOKENIZER_FILE, int(p["max_length"]), threads=1),
                              test_texts, n=max(20, int(p["latency_n"]) // 3), seed=seed)
        stage("evaluate", f"test accuracy fp32 {m_fp32['accuracy']:.4f} / int8 {m_int8['accuracy']:.4f}, macro-F1 "
              f"{m_fp32['macro_f1']:.4f} / {m_int8['macro_f1']:.4f}, top-1 agreement {par['top1_agreement']:.4f}; "
              f"p50 {lat_int8['p50_ms']:.2f} ms (int8) vs {lat_fp32['p50_ms']:.2f} ms (fp32)")
        stage.done("evaluate")

        # 7. register ---------------------------------------------------------------------------
        version = version or new_version(reg, task)
        created = datetime.now(timezone.utc).replace(microsecond=0)
        training_info = {
            "profile": profile_name,
            "seed": seed,
            "layers": kept_layers,
            "embeddings_quantization": p["embeddings"],
            "per_channel": bool(p["per_channel"]),
            "steps": result.steps,
            "best_step": result.best_step,
            "best_val_macro_f1": round(result.best_val_macro_f1, 6),
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 1),
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "head_lr": cfg.head_lr,
            "epochs": p.get("epochs"),
            "max_steps": p.get("max_steps"),
            "class_weights": cfg.class_weights,
            "bf16": cfg.bf16,
            "freeze_embeddings": cfg.freeze_embeddings,
            "head_init": cfg.head_init,
            "n_train": len(train_ds),
            "n_val": len(val_ds),
            "n_test": len(test_ds),
            "n_calibration": len(calib_ds),
            "calibration_set": calib_name,
            "data_sha256": hashes,
            "history": result.history,
            "profile_values": {k: v for k, v in p.items()},
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
        manifest_dict = {
            "task": task,
            "name": MODEL_NAMES.get(task, f"ehrw-{task}"),
            "version": version,
            "base_model": _base_model_name(base),
            "labels": _labels_json(labels),
            "max_length": int(p["max_length"]),
            "calibration": {"temperature": temperature, "abstain_below": threshold,
                            "target_precision": float(p["target_precision"])},
            "metrics": _clean(metrics),
            "files": {},
            "training_data_sha256": hashes["train"],
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "format_version": 1,
            "model_card_url": f"{model_card_base_url.rstrip('/')}/{task}/{version}/MODEL_CARD.md" if model_card_base_url else None,
            "training": _clean(training_info),
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
        "labels": len(labels),
        "test_n": len(test_ds),
        "acc_fp32": m_fp32["accuracy"],
        "acc_int8": m_int8["accuracy"],
        "f1_fp32": m_fp32["macro_f1"],
        "f1_int8": m_int8["macro_f1"],
        "top5_int8": m_int8["top5_accuracy"],
        "mb_fp32": size["fp32_bytes"] / 1e6,
        "mb_int8": size["int8_bytes"] / 1e6,
        "ratio": size["int8_over_fp32"],
        "p50_ms": lat_int8["p50_ms"],
        "threshold": threshold,
        "coverage": m_int8["selective"]["coverage"],
        "seconds": round(time.perf_counter() - t_start, 1),
        "path": str(dest),
    }
    return dest, row


def _base_model_name(base: Path) -> str:
    try:
        from training.finetune import default_base_model

        if base.resolve() == default_base_model().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
    except Exception:  # noqa: BLE001 - the bundled package may be absent with a custom base
        pass
    cfg = base / "config.json"
    if cfg.is_file():
        name = json.loads(cfg.read_text()).get("_name_or_path")
        if name and not str(name).startswith("/"):
            return f"{name} ({base.name})"
    return str(base)


def _clean(value):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def build_models(
    registry: str | Path,
    tasks: Iterable[str] = TASKS,
    profile: str | dict = "default",
    seed: int = 0,
    progress: bool = True,
    *,
    base_model: str | Path | None = None,
    model_card_base_url: str | None = None,
) -> dict[str, Path]:
    """Build, evaluate and publish (as CURRENT) one model per task; returns ``{task: version folder}``
    and prints a summary table (fp32 vs int8 test accuracy/macro-F1, size, latency)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if "all" in tasks:
        tasks = list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)}, all)")
    _setup_logging(progress)
    t0 = time.perf_counter()
    out: dict[str, Path] = {}
    rows = []
    for task in tasks:
        dest, row = build_task(task, registry, profile=profile, seed=seed, progress=progress, base_model=base_model,
                               model_card_base_url=model_card_base_url)
        out[task] = dest
        rows.append(row)
    if progress:
        from training.evaluate import summary_table

        print("\n" + summary_table(rows), file=sys.stderr)
        print(f"built {', '.join(tasks)} in {time.perf_counter() - t0:.0f} s into {Path(registry)}", file=sys.stderr)
    return out


__all__ = ["PROFILES", "TASKS", "build_models", "build_task", "new_version", "resolve_profile"]
