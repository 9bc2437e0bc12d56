"""Parameter-efficient fine-tuning of an :class:`training.model.EncoderClassifier`: LoRA, and
QLoRA (LoRA on an encoder loaded in 4-bit NF4 or 8-bit by bitsandbytes).

- :func:`apply_lora` wraps ``model.encoder`` with peft LoRA adapters; afterwards only the
  adapters and the classifier head require gradients, which is all ``finetune.train`` updates.
- ``EncoderClassifier.from_pretrained(..., quantization=Quantization(bits=4))`` loads any local
  Hugging Face encoder folder in 4 or 8 bits (the head, outside the encoder, stays fp32);
  :func:`load_qlora_classifier` adds ``prepare_model_for_kbit_training`` and LoRA.
- :func:`merge_for_export` gives back a plain fp32 ``EncoderClassifier`` (LoRA merged into the
  fp32 base weights) that ``training.export.export_onnx`` exports like any other.

bitsandbytes on the CPU (0.50): 4-bit NF4 with double quantization, 8-bit, and LoRA training on
them work (see ``training.model.keep_4bit_layers_trainable`` for the one trap).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from training.model import EncoderClassifier, Quantization, count_parameters

log = logging.getLogger("training")

# Linear layers worth adapting, by their name in the usual encoder families
LORA_TARGET_NAMES = (
    "query", "key", "value", "dense",  # BERT, RoBERTa, ELECTRA, MiniLM (attention, output, MLP)
    "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
    "query_proj", "key_proj", "value_proj",  # DeBERTa
    "q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2",  # DistilBERT
    "Wqkv", "Wo", "Wi",  # ModernBERT
)


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA needs peft: pip install 'ehr-worker[train]'") from exc
    return peft


@contextlib.contextmanager
def _quiet_peft_deprecations():
    """peft calls transformers' deprecated ``*gradient_checkpointing*`` names; not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        yield


def has_lora(model: EncoderClassifier) -> bool:
    return isinstance(model.encoder, _peft().PeftModel)


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is stored by bitsandbytes in 4 or 8 bits."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def lora_target_modules(encoder: nn.Module) -> list[str]:
    """Names of the encoder's linear layers that LoRA should adapt: every ``nn.Linear`` (the
    bitsandbytes 4/8-bit ones included) named like an attention projection or MLP layer, except
    the pooler, whose output the mean-pooling classifier never uses."""
    names = [name for name, module in encoder.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGET_NAMES
             and "pooler" not in name.split(".")]
    if not names:
        linear = [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]
        raise ValueError(f"no known attention/MLP layer names in this encoder; pass target_modules= "
                         f"from its linear layers: {linear[:12]}")
    return names


def apply_lora(
    model: EncoderClassifier,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> EncoderClassifier:
    """Wrap ``model.encoder`` in LoRA adapters (``W x + (alpha / r) * B A x``, B starting at zero,
    so the model is unchanged until it trains) and freeze everything else but the head.
    ``target_modules``: layer names or suffixes; by default :func:`lora_target_modules`."""
    peft = _peft()
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters; merge_for_export() it first to stack another")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(target_modules or lora_target_modules(model.encoder)),
                             bias="none")
    with _quiet_peft_deprecations():
        model.encoder = peft.get_peft_model(model.encoder, config)
    model.head.requires_grad_(True)  # the head lives outside the encoder and always trains
    trainable, total = trainable_parameters(model)
    log.info("LoRA r=%d alpha=%d on %d layers: %d of %d parameters train (%.2f%%)", r, alpha,
             len(config.target_modules), trainable, total, 100.0 * trainable / max(total, 1))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (:func:`training.model.count_parameters`)."""
    return count_parameters(model, trainable_only=True), count_parameters(model)


# ---------------------------------------------------------------------------------------------
# quantized encoders (QLoRA)


def prepare_for_kbit_training(model: EncoderClassifier, gradient_checkpointing: bool = False) -> EncoderClassifier:
    """peft's ``prepare_model_for_kbit_training`` on the encoder: freezes it and keeps norms in
    fp32. Gradient checkpointing works on the CPU too but costs about a third more compute for
    activation memory that these small encoders rarely need, hence off by default."""
    with _quiet_peft_deprecations():
        # non-reentrant checkpointing: what torch recommends, and it needs no input-grad hook
        model.encoder = _peft().prepare_model_for_kbit_training(
            model.encoder, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_qlora_classifier(
    base_model: str | Path,
    num_labels: int,
    bits: int = 4,
    num_layers: int | Sequence[int] | None = None,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
    layer_strategy: str = "spread",
    **quantization,
) -> EncoderClassifier:
    """QLoRA: ``EncoderClassifier.from_pretrained`` with ``Quantization(bits, **quantization)``
    (``double_quant``, ``quant_type``, ``compute_dtype``) + :func:`prepare_for_kbit_training` +
    :func:`apply_lora` (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
    model = EncoderClassifier.from_pretrained(base_model, num_labels, num_layers=num_layers,
                                              layer_strategy=layer_strategy,
                                              quantization=Quantization(bits, **quantization))
    prepare_for_kbit_training(model, gradient_checkpointing)
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)


# ---------------------------------------------------------------------------------------------
# export


def _plain_classifier(encoder: nn.Module, like: EncoderClassifier) -> EncoderClassifier:
    """A new ``EncoderClassifier`` on ``encoder`` with ``like``'s head (copied) and provenance."""
    plain = EncoderClassifier(encoder, like.head.out_features, dropout=like.dropout.p,
                              kept_layers=like.kept_layers, base_model_path=like.base_model_path)
    plain.head.load_state_dict({k: v.detach().float() for k, v in like.head.state_dict().items()})
    return plain.eval()


def _reload_fp32_encoder(model: EncoderClassifier) -> nn.Module:
    if not model.base_model_path:
        raise ValueError("merging a quantized model needs its fp32 base: build it with "
                         "EncoderClassifier.from_pretrained (which records base_model_path)")
    fp32 = EncoderClassifier.from_pretrained(model.base_model_path, model.head.out_features,
                                             num_layers=model.kept_layers, dropout=model.dropout.p)
    return fp32.encoder


def merge_for_export(model: EncoderClassifier) -> EncoderClassifier:
    """A plain fp32 ``EncoderClassifier`` for ``export_onnx``; ``model`` is left as it is.

    - fp32 LoRA: the adapters merged into a copy of the weights (``W + (alpha / r) * B A``); the
      logits are those of the adapter model up to float rounding.
    - 4/8-bit (with or without LoRA): the fp32 base is reloaded from ``base_model_path`` with the
      same kept layers and the trained LoRA deltas merged into it (as QLoRA intends: the adapters
      were trained against the dequantized weights, so logits drift a little; check top-1
      agreement, not exact equality).
    - no adapters, not quantized: a copy.
    """
    peft = _peft()
    if is_quantized(model):
        encoder = _reload_fp32_encoder(model)
        if has_lora(model):
            config = copy.deepcopy(model.encoder.peft_config["default"])
            with _quiet_peft_deprecations():
                fp32_peft = peft.get_peft_model(encoder, config)
            peft.set_peft_model_state_dict(fp32_peft, peft.get_peft_model_state_dict(model.encoder))
            encoder = fp32_peft.merge_and_unload()
    else:
        encoder = copy.deepcopy(model.encoder)
        if isinstance(encoder, peft.PeftModel):
            encoder = encoder.merge_and_unload()
    encoder.requires_grad_(True)  # a plain model again: nothing is meant to stay frozen
    return _plain_classifier(encoder.float(), model)
