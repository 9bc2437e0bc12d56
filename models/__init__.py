"""Inference side of ehr-worker: the model registry and the ONNX Runtime text classifiers.

Never imports torch: a worker process loads ``onnxruntime`` + ``tokenizers`` only.
"""

from models import registry as _registry
from models.registry import *  # noqa: F403 - the registry's public names (its __all__), manifest included
from models.runtime import OnnxTextEncoder, TextClassifier, softmax

__all__ = [*_registry.__all__, "OnnxTextEncoder", "TextClassifier", "softmax"]
