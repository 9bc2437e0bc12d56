"""Build profiles: every option of a pipeline run, with one default each.

:class:`Profile` is the single list of keys a pipeline run reads, each with its default and a
comment. A named profile (``PROFILE_OVERRIDES``) is a set of overrides of those defaults per
task; ``PROFILES`` is what they resolve to, as plain values (``python -m training profiles``
prints it). ``--set KEY=VALUE`` on the command line overrides one more key; a key that is not a
field of ``Profile`` is an error that names the close matches.

To add an option: add a field with its default and a comment saying what it does, read it as
``profile.<name>`` where it is used; if ``TrainConfig`` has a field of the same name, the training
loop gets it too (``train_config`` projects by field name).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from schemas.tasks import TASKS


@dataclass
class Profile:
    # what the manifest and model card call this profile
    name: str = "custom"

    # -- data (training.datasets.splits.load_splits) ----------------------------------------------
    n_train: int = 12000  # protocol: generated training orders
    n_val: int = 1000  # protocol: validation orders (early stopping)
    n_test: int = 2000  # protocol: held-out-phrasing test orders
    # diagnosis: False builds the default torch-free HPO phenotype ranker (training.phenotype), whose own
    # sizes live in training.phenotype.build.PROFILES; True builds this text classifier (for comparison)
    classifier: bool = False
    hpo: str | None = None  # diagnosis: a folder with another HPO release (default: the vendored 2023-01-27)
    max_diseases: int | None = 1000  # diagnosis: the first N of the 4,808 panel diseases (None: all)
    n_train_per_disease: int = 20  # diagnosis: training notes per disease
    n_val_per_disease: int = 1
    n_test_per_disease: int = 3
    # protocol: a hospital's own catalog (CSV or FHIR CodeSystem JSON; training.protocol_catalog); None: the 34 defaults
    catalog: str | None = None
    calibration_split: str = "heldout"  # "val" or "heldout" (a held-out-phrasing sample, see load_splits)

    # -- model ------------------------------------------------------------------------------------
    num_layers: int | list[int] | None = 3  # of the 6 MiniLM layers: 0, 2, 4 ("spread"); latency is per layer
    layer_strategy: str = "spread"  # "spread" | "first" (training.model.resolve_layers)
    max_length: int = 128  # word pieces per order, in training and at serving time
    dropout: float = 0.1

    # -- training (projected onto training.finetune.TrainConfig by field name) --------------------
    method: str = "full"  # full | lora | qlora (4-bit NF4 + double quant) | 8bit (training.stages.METHODS)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 2e-3  # the freshly initialised head
    embed_lr: float | None = None  # the word-embedding table (None: lr)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    class_weights: str | None = None  # None | "balanced" | "sqrt"
    label_smoothing: float = 0.0
    evals_per_epoch: int = 2
    patience: int = 3  # evaluations without a better validation macro-F1 before stopping (0: never stop)
    threads: int = 2
    bf16: bool | str = "auto"  # bfloat16 autocast while training; "auto": where the CPU supports it natively
    freeze_embeddings: bool = True  # the word-embedding table stays as pretrained: faster, no overfit to generator vocab
    head_init: str = "prototype"  # start the head from class means: far faster with hundreds of classes
    prototype_per_class: int = 8  # training examples per class used for the prototypes
    loss: str = "ce"  # ce | focal (training.losses)
    focal_gamma: float = 2.0
    sampler: str | None = None  # None | "weighted" (WeightedRandomSampler, 1/count per example)
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes; paged needs CUDA)
    lora_r: int = 8  # LoRA rank (methods lora, qlora, 8bit)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    checkpoint_dir: str | None = None  # last.pt at every evaluation, best.pt when val macro-F1 improves
    mlflow_uri: str | None = None  # e.g. "file:./mlruns"; needs `pip install mlflow-skinny`

    # -- distillation into a shallower student (training.distill) ----------------------------------
    student_layers: int | None = None  # None: no distillation
    distill_epochs: float = 1.0  # may be a fraction: a random sample of that share of the training set
    distill_max_steps: int | None = None  # overrides distill_epochs when set
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the teacher term; 1 - alpha goes to the labels
    distill_lr: float | None = None  # the student's encoder (None: lr)
    distill_head_lr: float | None = None  # the student's head (None: lr)

    # -- structured pruning and recovery (training.prune) -----------------------------------------
    prune_heads: float = 0.0  # fraction of attention heads removed per layer
    prune_ffn: float = 0.0  # fraction of FFN channels removed per layer
    recovery_epochs: float = 0.5  # recovery fine-tune, distilled from the unpruned model
    recovery_max_steps: int | None = None  # overrides recovery_epochs when set
    recovery_lr: float | None = None  # encoder and head during recovery (None: lr)

    # -- lexical branch (training.lexical): bag-of-word-pieces logits added to the encoder's --------
    lexical_dim: int = 0  # 0: no lexical branch
    lexical_epochs: int = 10
    lexical_lr: float = 1e-2
    lexical_token_dropout: float = 0.3

    # -- export, quantization, calibration ---------------------------------------------------------
    # int8 embeddings + per-channel int8 weights. Measured on a 600-class diagnosis model (test top-1
    # agreement with fp32 / accuracy change): per-channel 0.86 / -0.1 pt, per-tensor 0.54 / -4.8 pt;
    # int4 embeddings (19-22 % of fp32 instead of 25.3 %) 0.64-0.80 / -0.6 to -3.4 pt.
    embeddings: str = "int8"  # int8 | int4
    # the lexical branch's word-piece table alone (None: as `embeddings`). A bag of word pieces sums
    # many rows, so 4-bit block-wise rows cost it little; it is what brings the file under 25 % of fp32
    lexical_embeddings: str | None = None  # None | int8 | int4
    per_channel: bool = True
    target_precision: float = 0.9  # the abstention threshold keeps this precision on the calibration set
    # abstain when the top-k probability mass is below the calibrated threshold (1: top-1 probability)
    confidence_top_k: int = 1

    # -- evaluation (training.evaluate, training.report, training.baseline) -----------------------
    latency_n: int = 300  # single-order latency samples
    report: bool = True  # REPORT.md, report.json, confusion and reliability PNGs in the version folder
    baseline: bool = True  # compare against the unchanged general base model (a 6-layer fp32 export)
    baseline_max_train: int = 3000  # training examples for the baseline's logistic-regression head

    def __post_init__(self) -> None:
        for f in fields(self):  # JSON gives 1 for 1.0: keep float options floats
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and "float" in str(f.type).split(" |")[0]:
                setattr(self, f.name, float(value))

    @classmethod
    def from_values(cls, values: Mapping[str, Any], base: Profile | None = None) -> Profile:
        """``base`` (the defaults when None) with ``values`` applied; an unknown key is a ``KeyError``
        that names the close matches."""
        check_keys(values)
        return dataclasses.replace(base or cls(), **values)

    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILE_KEYS = tuple(f.name for f in fields(Profile))


def check_keys(values: Mapping[str, Any]) -> None:
    for key in values:
        if key not in PROFILE_KEYS:
            close = difflib.get_close_matches(key, PROFILE_KEYS, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise KeyError(f"unknown profile key {key!r}{hint} (`python -m training profiles` lists them all)")


_TINY: dict[str, Any] = {
    "num_layers": 1,
    "max_length": 64,
    "max_steps": 80,
    "lr": 1e-3,
    "head_lr": 2e-2,
    "evals_per_epoch": 1,
    "patience": 0,
    "latency_n": 30,
    "baseline": False,  # the general-model comparison costs a 6-layer fp32 export; the pipeline test runs it
    "lexical_dim": 32,  # a small lexical branch, so that the served tiny models have the default models' graph
    "lexical_epochs": 3,
}

# profile name -> task -> the values that differ from Profile's defaults
PROFILE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        # Budget: both models in about 20 minutes on 2 CPU cores (a training step of a 3-layer MiniLM on
        # 32 notes is ~0.75 s here). Fresh examples beat extra epochs over the same ones (the test split
        # uses held-out phrasings), so: many examples, about one epoch, then distill and prune.
        "protocol": {
            "lr": 1.5e-4,
            "head_lr": 3e-3,
            "class_weights": "sqrt",
            "target_precision": 0.95,  # auto-assign only at 95 % precision (issue 11); coverage is reported
            # 3 -> 1 layer (the teacher's first). Measured at 64 word pieces on 2,400 training orders, one
            # teacher, held-out split as served: 2 layers top-1 91.2 / top-3 97.65 / coverage at 95 %
            # precision 93.3; 1 layer 91.15 / 97.75 / 93.1, at 0.66x the 2-layer student's CPU per order
            "student_layers": 1,
            "distill_epochs": 0.5,
            "prune_ffn": 0.25,
            "recovery_epochs": 0.25,
            # measured: held-out-phrasing macro-F1 encoder 0.687, lexical 0.716, both 0.773; test rare-class
            # F1 0.780 -> 0.824
            "lexical_dim": 256,
            # the order code and the reason come first in the model input (schemas.text); the orders the
            # bench times run to 111 word pieces (p50), held-out test orders to 41 (14 % past 64): the
            # encoder's cost is linear in the length, and what decides the protocol sits in the first 64
            "max_length": 64,
            # 4-bit rows for the lexical table only: int8 everywhere else was 25.17 % of fp32 (over 25 %)
            "lexical_embeddings": "int4",
        },
        "diagnosis": {
            # `--set max_diseases=4808` (or null) covers the whole panel
            # one layer trained directly for 2 epochs reached validation macro-F1 0.828 in 6 minutes; a
            # 2-layer teacher distilled into 1 layer reached 0.780 in 12: no distillation here
            "num_layers": 1,
            # rare-disease vocabulary is what separates the classes: word embeddings learn here
            # (measured on 1,000 diseases, 1 layer, 1 epoch: test accuracy 0.42 frozen -> 0.47 trained)
            "freeze_embeddings": False,
            # ... and learn fast: measured on 1,000 diseases, 1 layer, 1 epoch, test accuracy 0.47 at the
            # encoder's lr -> 0.62 with the embedding table at 3e-3
            "embed_lr": 3e-3,
            "epochs": 2.0,
            "lr": 2e-4,
            "head_lr": 5e-3,
            "target_precision": 0.8,
            # the RiskAssessment lists 5 diseases: it is right when the disease is among them, so the
            # abstention threshold is on the top-5 probability mass, at 0.8 top-5 precision
            "confidence_top_k": 5,
            "prune_ffn": 0.25,
            "recovery_epochs": 0.25,
            # the bag of word pieces carries the specific findings: measured on held-out phrasings,
            # macro-F1 encoder 0.610, lexical 0.731, both 0.770; test accuracy 0.635 -> 0.809
            "lexical_dim": 256,
        },
    },
    # ``python -m training methods``: smaller data so that five methods run in reasonable time
    "methods": {
        "protocol": {
            "n_train": 4000,
            "n_val": 400,
            "n_test": 1000,
            "lr": 1.5e-4,
            "head_lr": 3e-3,
            "class_weights": "sqrt",
            "baseline": False,
            "latency_n": 150,
        },
        "diagnosis": {
            "max_diseases": 300,
            "n_train_per_disease": 12,
            "lr": 2e-4,
            "head_lr": 5e-3,
            "target_precision": 0.8,
            "baseline": False,
            "latency_n": 150,
        },
    },
    "tiny": {
        "protocol": {**_TINY, "n_train": 1020, "n_val": 102, "n_test": 102},
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


def named_profile(name: str, task: str) -> Profile:
    if name not in PROFILE_OVERRIDES:
        raise ValueError(f"unknown profile {name!r} (choose from {', '.join(PROFILE_OVERRIDES)})")
    if task not in PROFILE_OVERRIDES[name]:
        raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    return Profile.from_values({"name": name, **PROFILE_OVERRIDES[name][task]})


def resolve_profile(profile: str | Profile | Mapping[str, Any], task: str) -> Profile:
    """The ``Profile`` of ``task``: a named profile, a ``Profile``, a mapping ``{task: Profile or
    values}`` or a mapping of values (overrides of the defaults)."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, str):
        return named_profile(profile, task)
    values = profile.get(task, profile)
    return values if isinstance(values, Profile) else Profile.from_values(values)


# every named profile as plain values: what `python -m training profiles` prints
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    name: {task: named_profile(name, task).values() for task in tasks} for name, tasks in PROFILE_OVERRIDES.items()
}


__all__ = ["PROFILES", "PROFILE_KEYS", "PROFILE_OVERRIDES", "Profile", "check_keys", "named_profile", "resolve_profile"]
