"""Structured pruning of a fine-tuned :class:`training.model.EncoderClassifier`, then a short
recovery fine-tune.

What is removed, inside every transformer block and nowhere else:

- whole attention heads: rows of ``query``/``key``/``value`` and the matching input columns of
  ``attention.output.dense`` (MiniLM-L6: 12 heads of 32 -> 9 heads at ``head_ratio=0.25``);
- FFN (intermediate) channels: rows of ``intermediate.dense`` and the matching input columns of
  ``output.dense`` (1536 -> 768 at ``ffn_ratio=0.5``).

The residual stream (hidden size), the embeddings and the classifier head are never touched, so
the tokenizer, the pooling and the ONNX interface stay what they were. ``torch-pruning`` builds the
dependency graph (which rows and columns must go together) and ranks heads and channels by weight
magnitude or by a first-order Taylor estimate of the loss change; every layer loses the same
fraction (local pruning), so all layers keep the same shape.

Hugging Face attention modules cache their head count at construction: after pruning
``num_attention_heads`` and ``all_head_size`` are updated (the head size is unchanged, so the
``1/sqrt(d)`` scaling is too). ``transformers`` 5 builds heads from ``hidden_size /
num_attention_heads``, which cannot express 9 heads of 32 in a 384-wide model, so the shapes are
kept in ``config.pruned_structure``; :func:`apply_structure` re-applies them to a freshly built model
before ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.finetune import TrainConfig, TrainResult, train
from training.model import EncoderClassifier, collate, count_parameters, layer_list, predict_logits

log = logging.getLogger("training")

IMPORTANCES = ("magnitude", "taylor")


# ---------------------------------------------------------------------------------------------
# the blocks of a BERT-style encoder


def encoder_layers(model: EncoderClassifier) -> list[nn.Module]:
    """The transformer blocks of ``model``, checked to have the BERT layout pruning relies on."""
    layers, _ = layer_list(model.encoder, model.encoder.config.num_hidden_layers)
    for layer in layers:
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if not all(hasattr(attention, name) for name in ("query", "key", "value")) or not hasattr(
            getattr(layer, "intermediate", None), "dense"
        ):
            raise ValueError(
                "prune_encoder supports BERT-style encoders (attention.self.query/key/value, "
                "attention.output.dense, intermediate.dense, output.dense: BERT, MiniLM, BioBERT, "
                f"ClinicalBERT...); {type(layer).__name__} has another layout"
            )
    return list(layers)


def structure(model: EncoderClassifier) -> dict:
    """Heads per layer, the head size and the FFN width per layer: what pruning changes."""
    layers = encoder_layers(model)
    return {
        "heads": [int(layer.attention.self.num_attention_heads) for layer in layers],
        "head_size": int(layers[0].attention.self.attention_head_size),
        "ffn": [int(layer.intermediate.dense.out_features) for layer in layers],
    }


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None,
                     dtype=like.weight.dtype, device=like.weight.device)


def apply_structure(model: EncoderClassifier, shape: dict) -> EncoderClassifier:
    """Give an unpruned model the layer shapes recorded by :func:`structure` (or found in
    ``config.pruned_structure``), so that a pruned model's ``state_dict`` loads into it. The
    resized layers are freshly initialised: load the state dict right after."""
    layers = encoder_layers(model)
    if len(shape["heads"]) != len(layers) or len(shape["ffn"]) != len(layers):
        raise ValueError(
            f"the structure has {len(shape['heads'])} layers but the model has {len(layers)}; "
            "build the model with the same num_layers as the pruned one"
        )
    for layer, heads, ffn in zip(layers, shape["heads"], shape["ffn"]):
        attention = layer.attention.self
        width = heads * int(shape["head_size"])
        hidden = attention.query.in_features
        for name in ("query", "key", "value"):
            setattr(attention, name, _linear(hidden, width, getattr(attention, name)))
        layer.attention.output.dense = _linear(width, hidden, layer.attention.output.dense)
        layer.intermediate.dense = _linear(hidden, ffn, layer.intermediate.dense)
        layer.output.dense = _linear(ffn, hidden, layer.output.dense)
        _set_head_count(attention, heads, int(shape["head_size"]))
    _record_structure(model)
    return model


def _set_head_count(attention: nn.Module, heads: int, head_size: int) -> None:
    """HF attention modules read these attributes in forward, not the linear layers' shapes."""
    attention.num_attention_heads = heads
    attention.attention_head_size = head_size
    attention.all_head_size = heads * head_size


def _record_structure(model: EncoderClassifier) -> dict:
    """Write the pruned shapes into the encoder config (saved with ``save_pretrained``); the FFN
    width is also a plain config value when every layer has the same one."""
    shape = structure(model)
    config = model.encoder.config
    config.pruned_structure = shape
    if len(set(shape["ffn"])) == 1:
        config.intermediate_size = shape["ffn"][0]
    return shape


# ---------------------------------------------------------------------------------------------
# pruning


@contextlib.contextmanager
def _eager_attention(model: EncoderClassifier):
    """Trace plain matmul/softmax attention: torch-pruning follows autograd nodes, and the fused
    SDPA kernel hides which query/key/value rows belong to which head."""
    encoder = model.encoder
    previous = getattr(encoder.config, "_attn_implementation", None)
    switch = hasattr(encoder, "set_attn_implementation") and previous not in (None, "eager")
    if switch:
        encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            encoder.set_attn_implementation(previous)


def _batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, len(ids)))) for start in range(0, len(ids), batch_size)]


def _accumulate_gradients(
    model: EncoderClassifier, layers, ids, pad_id: int, labels, *, batch_size: int, max_batches: int
) -> int:
    """Sum the gradients of the classification loss over a few batches, for Taylor importance
    (|w * dL/dw| per head or channel). Without labels, the model's own predictions are the
    targets: the importance of a head is then how much the current decisions depend on it."""
    if labels is None:
        labels = predict_logits(model, ids, pad_id).argmax(-1).tolist()
    targets = torch.as_tensor(list(labels), dtype=torch.long)
    frozen = [p for layer in layers for p in layer.parameters() if not p.requires_grad]
    for p in frozen:  # a frozen layer still needs gradients to be ranked
        p.requires_grad_(True)
    model.eval()  # no dropout noise in the estimate
    model.zero_grad(set_to_none=True)
    used = 0
    try:
        for batch in _batches(ids, batch_size)[:max_batches]:
            logits = model(*collate([ids[i] for i in batch], pad_id))
            F.cross_entropy(logits, targets[batch], reduction="sum").backward()
            used += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return used


def _importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {name!r}")


def _check_ratios(shape: dict, head_ratio: float, ffn_ratio: float) -> None:
    """Each layer must keep at least one head and one FFN channel (heads are removed rounding up,
    channels rounding down what is kept)."""
    for name, ratio in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{name} is the fraction to remove, in [0, 1); got {ratio}")
    fewest_heads = min(shape["heads"])
    if math.ceil(head_ratio * fewest_heads) >= fewest_heads:
        raise ValueError(f"head_ratio={head_ratio} would remove all {fewest_heads} heads of a layer; "
                         f"use at most {(fewest_heads - 1) / fewest_heads:.3f}")
    if int(min(shape["ffn"]) * (1 - ffn_ratio)) < 1:
        raise ValueError(f"ffn_ratio={ffn_ratio} would remove every FFN channel of a layer; use a smaller ratio")


def _build_pruner(model: EncoderClassifier, layers, example, importance, head_ratio: float, ffn_ratio: float):
    """A local (per-layer) MetaPruner that may only shrink heads and FFN channels.

    Ignoring every module that writes the residual stream (embeddings, attention and FFN output
    projections) and the head makes torch-pruning drop the hidden-size group entirely; only the
    two in-layer groups remain: {query, key, value, attention.output.dense input} and
    {intermediate.dense, output.dense input}."""
    import torch_pruning as tp

    num_heads, ratios, ignored = {}, {}, [model.head, model.encoder.get_input_embeddings()]
    for layer in layers:
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            num_heads[linear] = int(attention.num_attention_heads)
        ignored += [layer.attention.output.dense, layer.output.dense]
        if head_ratio > 0:
            ratios[attention] = head_ratio  # only triggers the group: head dims are never thinned
        else:
            ignored += [attention.query, attention.key, attention.value]
        if ffn_ratio > 0:
            ratios[layer.intermediate] = ffn_ratio
        else:
            ignored.append(layer.intermediate.dense)
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=False,
        pruning_ratio=0.0,  # anything not named in pruning_ratio_dict stays whole
        pruning_ratio_dict=ratios,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=head_ratio,
    )


def _removed_heads(
    group, queries: dict[nn.Module, int], head_size: int, is_out_channel_fn
) -> dict[int, list[int]]:
    """Which heads of which layer a pruning group removes (from the query rows it drops)."""
    removed = {}
    for dep, idxs in group:
        layer = queries.get(dep.target.module)
        if layer is not None and is_out_channel_fn(dep.handler):
            removed[layer] = sorted({int(i) // head_size for i in idxs})
    return removed


def prune_encoder(
    model: EncoderClassifier,
    *,
    head_ratio: float = 0.25,
    ffn_ratio: float = 0.5,
    importance: str = "magnitude",
    example_ids: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[int] | None = None,
    batch_size: int = 32,
    taylor_batches: int = 4,
) -> dict:
    """Remove ``head_ratio`` of the attention heads (rounded up) and ``ffn_ratio`` of the FFN
    channels of every layer of ``model``, in place.

    ``example_ids`` (token ids of real texts) trace the graph and, for ``importance="taylor"``,
    feed up to ``taylor_batches`` batches of gradients against ``labels`` (or the model's own
    predictions). Returns the parameter counts before and after, the heads and FFN width per
    layer, and which heads were removed. Fine-tune afterwards (:func:`recover`)."""
    scorer = _importance(importance)
    if not example_ids:
        raise ValueError("prune_encoder needs example_ids: the token ids of a few real texts")
    layers = encoder_layers(model)
    before = structure(model)
    _check_ratios(before, head_ratio, ffn_ratio)
    was_training = model.training
    params_before = count_parameters(model)
    removed: dict[int, list[int]] = {}
    with _eager_attention(model):
        if importance == "taylor":
            used = _accumulate_gradients(model, layers, example_ids, pad_id, labels,
                                         batch_size=batch_size, max_batches=taylor_batches)
            log.info("prune: Taylor importance from %d batches", used)
        example = collate(example_ids[:batch_size], pad_id)
        pruner = _build_pruner(model, layers, example, scorer, head_ratio, ffn_ratio)
        queries = {layer.attention.self.query: i for i, layer in enumerate(layers)}
        for group in pruner.step(interactive=True):
            is_out = pruner.DG.is_out_channel_pruning_fn
            removed.update(_removed_heads(group, queries, before["head_size"], is_out))
            group.prune()
        for layer in layers:
            attention = layer.attention.self
            _set_head_count(attention, pruner.num_heads[attention.query], before["head_size"])
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    after = _record_structure(model)
    params_after = count_parameters(model)
    log.info("prune: heads %s -> %s, FFN %s -> %s, parameters %d -> %d (%.1f%% fewer)",
             before["heads"], after["heads"], before["ffn"], after["ffn"], params_before, params_after,
             100.0 * (1 - params_after / params_before))
    return {
        "params_before": params_before,
        "params_after": params_after,
        "heads_before": before["heads"],
        "heads_per_layer": after["heads"],
        "head_size": after["head_size"],
        "ffn_before": before["ffn"],
        "ffn_width": after["ffn"],
        "removed_heads": [removed.get(i, []) for i in range(len(layers))],
        "importance": importance,
    }


# ---------------------------------------------------------------------------------------------
# recovery


def recover(
    model: EncoderClassifier,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    val_texts: Sequence[str] | None,
    val_labels: Sequence[int] | None,
    cfg: TrainConfig | None = None,
    teacher_logits=None,
) -> TrainResult:
    """A short fine-tune of the pruned model; with ``teacher_logits`` (the unpruned model's, from
    :func:`training.distill.teacher_logits`, rows aligned with ``texts``) it is distilled back
    towards what the full model predicted."""
    log.info("recover: %d training texts, %s", len(texts),
             "labels only" if teacher_logits is None else "distilled from the unpruned model")
    return train(model, tokenizer, texts, labels, val_texts, val_labels, cfg, desc="recover",
                 teacher_logits=teacher_logits)
