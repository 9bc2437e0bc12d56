"""Training data: generated protocol and rare-disease orders, and loaders for user-labelled files.

- ``training.datasets.protocol.generate(n, seed=0, split="train")``
- ``training.datasets.diagnosis.generate(n_per_disease, seed=0, split="train", max_diseases=None)``
  and ``diagnosis.disease_panel(max_diseases=None)``
- ``training.datasets.loaders.load_labelled_file(path, task=...)`` and ``stratified_split``

Every example is a FHIR ServiceRequest; ``Dataset.texts()`` applies ``schemas.text.build_model_input``.
Pure Python (no torch); nothing is downloaded. Data attribution: ``training/data/NOTICE.md``.
"""

from .common import Dataset, LabelledOrder, concat, label_key, stratified_split

__all__ = ["Dataset", "LabelledOrder", "concat", "label_key", "stratified_split"]
