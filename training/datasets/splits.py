"""The train / val / test (and calibration) splits a pipeline run trains and evaluates on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.tasks import TASKS
from training.datasets.common import Dataset, Split

if TYPE_CHECKING:
    from training.profiles import Profile

# the calibration sample is drawn with this seed offset, so it shares no example with test
CALIBRATION_SEED_OFFSET = 7919


def load_splits(task: str, p: Profile, seed: int) -> dict[str, Dataset]:
    """train / val / test, plus ``calib`` when ``calibration_split`` is ``heldout``: a second sample
    of the test generator (held-out phrasings, another seed, no example shared with test), so the
    temperature and threshold are fitted on text that differs from training the way real orders do."""
    heldout = p.calibration_split == "heldout"
    out: dict[str, Dataset] = {}
    if task == "protocol":
        from training.datasets import protocol

        generate = protocol.generate
        if p.catalog:  # a hospital's own catalog (training.protocol_catalog)
            from training.protocol_catalog import catalog_generator

            generate = catalog_generator(p.catalog)
        sizes: dict[Split, int] = {"train": p.n_train, "val": p.n_val, "test": p.n_test}
        for split, n in sizes.items():
            out[split] = generate(n, seed=seed, split=split)
        if heldout:
            out["calib"] = generate(p.n_val, seed=seed + CALIBRATION_SEED_OFFSET, split="test")
        return out
    if task == "diagnosis":
        from training.datasets import diagnosis

        def gen(n: int, split: Split, s: int) -> Dataset:
            return diagnosis.generate(n, seed=s, split=split, max_diseases=p.max_diseases)

        per_disease: dict[Split, int] = {"train": p.n_train_per_disease, "val": p.n_val_per_disease,
                                         "test": p.n_test_per_disease}
        for split, n in per_disease.items():
            out[split] = gen(n, split, seed)
        if heldout:
            out["calib"] = gen(p.n_val_per_disease, "test", seed + CALIBRATION_SEED_OFFSET)
        return out
    raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
