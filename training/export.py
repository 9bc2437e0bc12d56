"""ONNX export and int8 quantization of a trained :class:`training.model.EncoderClassifier`.

- ``export_onnx``: TorchScript-based exporter (``dynamo=False``: one self-contained file, no
  external ``.data``), inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
  sequence axes), output ``logits`` (``[batch, num_labels]``). BERT-style encoders default
  ``token_type_ids`` to zeros, so it is not an input.
- ``quantize``: ONNX Runtime dynamic quantization: int8 weights for every MatMul/Gemm (activations
  quantized on the fly), and the embedding tables either int8 (``Gather``) or 4-bit block-wise
  (``GatherBlockQuantized``, block 32) — ``embeddings="int4"`` is what brings the file under 25 %
  of fp32, since the 30k x 384 word-embedding table is two thirds of a 3-layer MiniLM.
- ``parity``: top-1 agreement and logit drift of the int8 model against fp32 on real texts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.model import collate

log = logging.getLogger("training")

OPSET = 17


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)


def save_tokenizer(tokenizer, path: str | Path, max_length: int) -> Path:
    """Write the tokenizer as served: truncation at ``max_length``, no padding (the runtime pads
    each batch to its longest text)."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.save(str(path))
    return Path(path)


def export_onnx(model, path: str | Path, *, opset: int = OPSET) -> Path:
    """Export ``model`` (``forward(input_ids, attention_mask) -> logits``) to one ONNX file."""
    import onnx

    path = Path(path)
    model = model.eval()
    encoder = getattr(model, "encoder", None)
    previous = getattr(getattr(encoder, "config", None), "_attn_implementation", None)
    if encoder is not None and hasattr(encoder, "set_attn_implementation"):
        with contextlib.suppress(Exception):  # plain matmul/softmax attention exports most portably
            encoder.set_attn_implementation("eager")
    dummy_ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]], dtype=torch.long)
    dummy_mask = (dummy_ids != 0).long()
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Logits(model),
                (dummy_ids, dummy_mask),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"},
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        if encoder is not None and previous and hasattr(encoder, "set_attn_implementation"):
            with contextlib.suppress(Exception):
                encoder.set_attn_implementation(previous)
    onnx.checker.check_model(str(path))
    return path


def check_export(model, onnx_path: str | Path, ids: Sequence[Sequence[int]], pad_id: int, *, atol: float = 1e-3) -> float:
    """Max |torch - onnx fp32| logit difference on ``ids``; raises if above ``atol``."""
    import onnxruntime as ort


    input_ids, mask = collate(ids, pad_id)
    with torch.no_grad():
        ref = model.eval()(input_ids, mask).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if diff > atol:
        raise RuntimeError(f"ONNX export of {onnx_path} differs from PyTorch by {diff:.2e} (> {atol})")
    return diff


@contextlib.contextmanager
def _quiet_ort_quantizer():
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    per_channel: bool = False,
    embeddings: str = "int4",
    lexical: str | None = None,
    block_size: int = 32,
) -> Path:
    """Dynamic int8 quantization (``QInt8`` weights) of MatMul/Gemm, plus the embedding tables
    as ``int8`` (per-tensor), ``int4`` (block-wise, symmetric) or ``fp32`` (left alone).
    ``lexical``: the lexical branch's table (``training.lexical``) alone as ``int8`` or ``int4``
    (None: as ``embeddings``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    lexical = lexical or embeddings
    for name, value in (("embeddings", embeddings), ("lexical", lexical)):
        if value not in ("int8", "int4", "fp32"):
            raise ValueError(f"{name} must be int8, int4 or fp32, got {value!r}")
    model = onnx.load(str(fp32_path))
    model.graph.ClearField("value_info")  # stale shapes break the quantizer's shape inference
    lexical_nodes = _lexical_gathers(model)
    tables = {n.name: lexical if n.name in lexical_nodes else embeddings for n in _table_gathers(model)}
    int4 = [name for name, kind in tables.items() if kind == "int4"]
    int8_excluded = [name for name, kind in tables.items() if kind != "int8"]
    with _quiet_ort_quantizer():
        quantize_dynamic(
            model,
            str(out_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            nodes_to_exclude=int8_excluded,
            per_channel=per_channel,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        if int4:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            int8_model = onnx.load(str(out_path))
            quantizer = MatMulNBitsQuantizer(
                int8_model,
                bits=4,
                block_size=block_size,
                is_symmetric=True,
                # every other Gather stays as it is (an int8 table must not be quantized twice)
                nodes_to_exclude=[n.name for n in int8_model.graph.node if n.op_type == "Gather" and n.name not in int4],
                op_types_to_quantize=("Gather",),
                quant_axes=(("Gather", 1),),
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    stale = out_path.with_name(out_path.name + ".data")
    if stale.exists():
        os.remove(stale)
    onnx.checker.check_model(str(out_path))
    return out_path


def _table_gathers(model) -> list:
    """The Gather nodes that read a weight table (an initializer): the embedding lookups."""
    tables = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in tables]


def _lexical_gathers(model) -> set[str]:
    """The lexical branch's table lookup (``model.lexical.embedding.weight`` in the export)."""
    return {n.name for n in _table_gathers(model) if ".lexical." in f".{n.input[0]}"}


def parity(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict:
    """How far the int8 model drifts from fp32 on the same texts."""
    a, b = np.asarray(fp32_logits), np.asarray(int8_logits)
    return {
        "n": int(a.shape[0]),
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))) if len(a) else float("nan"),
        "max_abs_logit_diff": float(np.abs(a - b).max()) if len(a) else 0.0,
        "mean_abs_logit_diff": float(np.abs(a - b).mean()) if len(a) else 0.0,
    }
