"""The phenotype-driven diagnosis model: HPO compile, case generation, fitting, evaluation, registry build.

Torch-free. ``build_diagnosis(registry, profile=...)`` is what ``python -m training pipeline --task
diagnosis`` calls; the worker serves the result with :mod:`models.diagnosis` (numpy only).
"""
