"""Train/test phrase pools of the protocol data set: which share of every phrase list the held-out
test split reads (training never does), and the question forms of each pool."""

from __future__ import annotations


def split_pool(items, pool: str, every: int = 3) -> tuple:
    """Train/test share of a phrase list: every ``every``-th item (positions every-1, 2*every-1, ...)
    is test-only; of two items the second, of three the third; a single item is shared."""
    items = tuple(items)
    if len(items) <= 1:
        return items
    if len(items) == 2:
        return items[:1] if pool == "train" else items[1:]
    if len(items) == 3:
        return items[:2] if pool == "train" else items[2:]
    return tuple(x for i, x in enumerate(items) if (i % every == every - 1) == (pool == "test"))


KB_EVERY = 4  # knowledge-table phrase lists: a quarter of the phrasings is held out for test


QUESTION_FORMS = {
    "train": ("r/o {q}", "rule out {q}", "eval for {q}", "concern for {q}", "?{q}", "assess for {q}", "evaluate for {q}",
              "c/f {q}", "{q}", "r/o {q}", "eval {q}", "concerning for {q}"),
    "test": ("query {q}", "exclude {q}", "question of {q}", "{q}?", "please evaluate for possible {q}", "suspect {q}",
             "ddx includes {q}", "worried about {q}", "looking for {q}", "? {q} - pls assess"),
}
