"""``medfm train --split-limit N``: a quick run on part of a split never trains on a held-out case."""

from __future__ import annotations

from pathlib import Path

from medfm.data.datasets import Case, split_cases
from medfm.train.trainer import _first_per_dataset


def _cases() -> list[Case]:
    return [Case(dataset, f"{dataset}-{i}", Path(f"{i}.png"), Path(f"{i}_mask.png"), None, patient=f"p{i // 2}")
            for dataset in ("a", "b") for i in range(20)]


def test_the_limit_is_taken_after_the_split_so_held_out_cases_stay_held_out() -> None:
    train, held_out = split_cases(_cases(), 0.2, 0, 4)
    small_train, small_val = _first_per_dataset(train, 3), _first_per_dataset(held_out, 3)
    assert [sum(c.dataset == d for c in small_train) for d in "ab"] == [3, 3]
    ids = lambda cases: [c.case_id for c in cases]  # noqa: E731
    assert set(ids(small_val)) <= set(ids(held_out)) and not set(ids(small_train)) & set(ids(held_out))
    assert ids(small_train) == [i for i in ids(train) if i in ids(small_train)]  # order kept
    # a limit before the split (--limit) moves the held-out cases: the reason for --split-limit
    assert set(ids(split_cases(_cases()[:6] + _cases()[20:26], 0.2, 0, 4)[1])) - set(ids(held_out))
