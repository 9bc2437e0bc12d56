"""Checkpoints to resume a training run from, and optional MLflow tracking of it.

``last.pt`` (written at every evaluation): the model's state_dict, the optimizer, the loop state
(step, best metric, losses, history), the data order and the RNG: enough to resume exactly.
``best.pt`` (when validation macro-F1 improves): the model's state_dict with its step and metric.
Files are written to a temporary name and renamed, so an interrupted save never leaves half a
checkpoint.

Tracking logs ids, counts and metrics only, never text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger("training")

CHECKPOINT_LAST = "last.pt"
CHECKPOINT_BEST = "best.pt"

# config keys that may change between a run and its resumption without a warning
RESUMABLE_CHANGES = {"resume", "progress", "max_steps", "epochs", "patience", "mlflow_uri"}


class DataOrder(Protocol):
    """What a checkpoint needs of the training batches (``finetune.TrainBatches``)."""

    lengths: list[int]

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopState:
    """What the training loop carries from step to step (and a checkpoint restores)."""

    step: int = 0
    best_f1: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the parameters that train. The frozen ones (a quantized or LoRA base, frozen
    embeddings) never change, and 4-bit weights cannot go back through ``load_state_dict``."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state``'s tensors into the parameters of ``model`` that train."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in state or tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"the saved state has no {name} of shape {list(param.shape)}: build the model "
                             "(base, layers, adapters, frozen parts) the same way as the run that saved it")
        param.copy_(state[name])


def _save_atomically(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: LoopState, batches: DataOrder, config: dict, *, best: bool) -> None:
    """``last.pt`` always, ``best.pt`` too when ``best``; ``config`` is the run's ``TrainConfig`` as a dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_state = model.state_dict()
    _save_atomically({"model": model_state, "optimizer": optimizer.state_dict(), "loop": asdict(state),
                      "batches": batches.state_dict(), "torch_rng": torch.get_rng_state(), "config": config},
                     directory / CHECKPOINT_LAST)
    if best:
        _save_atomically({"model": model_state, "step": state.step, "val_macro_f1": state.best_f1,
                          "config": config}, directory / CHECKPOINT_BEST)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def resume_from_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           batches: DataOrder, config: dict,
                           n_train: int) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    """Restore ``directory/last.pt`` into the model, optimizer and data order; returns the loop
    state and the best trainable weights so far (None when there is no checkpoint yet)."""
    path = Path(directory) / CHECKPOINT_LAST
    if not path.is_file():
        log.warning("resume: no %s yet, starting from step 0", path)
        return LoopState(), None
    ckpt = load_checkpoint(path)
    if ckpt["config"].get("batch_size") != config["batch_size"] or len(batches.lengths) != n_train:
        raise ValueError(f"{path} was written for another batch size or training set; resume with the same "
                         "data and batch_size, or point checkpoint_dir at a new folder")
    changed = sorted(k for k, v in config.items() if k in ckpt["config"] and ckpt["config"][k] != v)
    if set(changed) - RESUMABLE_CHANGES:
        log.warning("resume: config differs from the checkpoint's in %s", ", ".join(changed))
    load_trainable_state(model, ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise ValueError(f"{path}: the optimizer state does not fit this model's trainable parameters; build "
                         "the model and TrainConfig (optimizer, freeze_embeddings) as the run that wrote it") from exc
    batches.load_state_dict(ckpt["batches"])
    torch.set_rng_state(ckpt["torch_rng"])
    state = LoopState(**ckpt["loop"])
    best_path = Path(directory) / CHECKPOINT_BEST
    best = None
    if best_path.is_file():
        best_model = load_checkpoint(best_path)["model"]
        best = {name: best_model[name] for name, p in model.named_parameters() if p.requires_grad}
    log.info("resume: %s at step %d (best val macro-F1 %.4f at step %d)", path, state.step, state.best_f1,
             state.best_step)
    return state, best


# ---------------------------------------------------------------------------------------------
# experiment tracking


def import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError("TrainConfig.mlflow_uri is set but MLflow is not installed: pip install mlflow-skinny "
                          "(or pip install 'ehr-worker[mlflow]'), or leave mlflow_uri unset") from exc
    return mlflow


class NoTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class MlflowTracker(NoTracker):
    """One MLflow run: the config and data counts as parameters once, metrics at every evaluation."""

    def __init__(self, uri: str, run_name: str, params: dict):
        self.mlflow = import_mlflow()
        if uri.startswith("file:") or "://" not in uri:
            # mlflow-skinny has no SQLAlchemy, so a local store is a file store, which MLflow 3
            # refuses unless opted in; this uri asks for one explicitly
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow.set_tracking_uri(uri)
        # nested under a run the caller already started (a sweep), else a top-level run
        self.run = self.mlflow.start_run(run_name=run_name, nested=self.mlflow.active_run() is not None)
        self.mlflow.log_params({k: "None" if v is None else v for k, v in params.items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, ok: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


def start_tracking(uri: str | None, run_name: str, params: dict) -> NoTracker:
    """An MLflow run at ``uri`` logging ``params``, or a tracker that does nothing when ``uri`` is unset."""
    if not uri:
        return NoTracker()
    return MlflowTracker(uri, run_name, params)
