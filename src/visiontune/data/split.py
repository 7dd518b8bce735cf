"""Hold out validation rows when no validation data is given: seeded and stratified.

Rows are grouped into strata (multi-class: the label; multi-label: the row's rarest label,
or "no labels"), each stratum gives its share of the validation rows (largest remainders
decide the rounding, ties broken by the seed), and every stratum keeps at least one row in
training. A final pass moves a validation row back when a class with two or more rows would
otherwise be missing from training (possible in multi-label data). Same records, fraction and
seed give the same split; both parts keep the input order.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from visiontune.data.labels import check_task
from visiontune.data.sources import Record
from visiontune.tasks import MULTICLASS


def _labels(record: Record) -> tuple[str, ...]:
    return (record.label,) if isinstance(record.label, str) else tuple(record.label)


def _strata(records: list[Record], task: str) -> list[str]:
    if task == MULTICLASS:
        return [str(r.label) for r in records]
    counts = Counter(label for r in records for label in _labels(r))
    # "\0" cannot be a class name (labels are stripped text), so it safely means "no labels".
    return [min(_labels(r), key=lambda c: (counts[c], c)) if _labels(r) else "\0" for r in records]


def stratified_split(
    records: list[Record], fraction: float, seed: int, task: str,
) -> tuple[list[Record], list[Record]]:
    """(training, validation), about ``fraction`` of the rows in validation."""
    check_task(task)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1, not {fraction}")
    total = len(records)
    if total < 2:
        return list(records), []

    groups: dict[str, list[int]] = {}
    for index, key in enumerate(_strata(records, task)):
        groups.setdefault(key, []).append(index)
    keys = sorted(groups)
    rng = random.Random(seed)

    target = max(1, round(total * fraction))
    quota = {k: len(groups[k]) * fraction for k in keys}
    capacity = {k: len(groups[k]) - 1 for k in keys}
    taken = {k: min(math.floor(quota[k]), capacity[k]) for k in keys}
    tiebreak = {k: rng.random() for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-(quota[k] - math.floor(quota[k])), tiebreak[k]))
    remaining = target - sum(taken.values())
    while remaining > 0:
        progressed = False
        for key in by_remainder:
            if remaining and taken[key] < capacity[key]:
                taken[key] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break  # every stratum is down to one training row

    validation: set[int] = set()
    for key in keys:
        members = list(groups[key])
        rng.shuffle(members)
        validation.update(members[: taken[key]])

    _keep_every_class_in_training(records, validation)
    train = [r for i, r in enumerate(records) if i not in validation]
    held_out = [r for i, r in enumerate(records) if i in validation]
    return train, held_out


def _keep_every_class_in_training(records: list[Record], validation: set[int]) -> None:
    totals = Counter(label for r in records for label in _labels(r))
    in_train = Counter(
        label for i, r in enumerate(records) if i not in validation for label in _labels(r)
    )
    for label in sorted(totals):
        if totals[label] >= 2 and in_train[label] == 0:
            index = min(i for i in validation if label in _labels(records[i]))
            validation.discard(index)
            in_train.update(_labels(records[index]))
