"""Inference side of ehr-worker: the model registry and the ONNX Runtime text classifiers.

Never imports torch: a worker process loads ``onnxruntime`` + ``tokenizers`` only.
"""

from models.registry import (
    FORMAT_VERSION,
    Calibration,
    LabelSpec,
    Manifest,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    checksum_files,
    sha256_file,
    verify_version_dir,
)
from models.runtime import OnnxTextEncoder, TextClassifier, softmax

__all__ = [
    "FORMAT_VERSION",
    "Calibration",
    "LabelSpec",
    "Manifest",
    "ModelError",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "ModelRegistry",
    "OnnxTextEncoder",
    "TextClassifier",
    "checksum_files",
    "sha256_file",
    "softmax",
    "verify_version_dir",
]
