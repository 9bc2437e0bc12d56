"""Progress bars of the bench (tqdm on stderr; off with ``progress=False``)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Any = None, *, enabled: bool, **kwargs: Any) -> tqdm:
    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)
