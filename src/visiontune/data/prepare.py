"""From the training/validation inputs to checked Records, classes and a validation split.

Every problem (bad row, unreadable image) is collected first, so one run reports all of
them: by default the run stops with a summary; with ``skip_bad_rows`` the bad rows are left
out and counted in the log. Problems with the dataset as a whole (no rows, one class) always
stop, because no amount of skipping fixes them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from visiontune import settings
from visiontune.data import checked
from visiontune.data.images import verify_image
from visiontune.data.labels import build_classes, check_task, sort_classes
from visiontune.data.storage import redact
from visiontune.data.sources import Problem, Record, load_records
from visiontune.data.split import stratified_split
from visiontune.errors import DataError

log = logging.getLogger(__name__)

SHOWN_IN_SUMMARY = 5


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class PreparedData:
    train: list[Record]
    validation: list[Record]
    classes: list[str]
    skipped: list[Problem] = field(default_factory=list)
    validation_is_split: bool = False  # validation rows were held out of the training data
    image_sizes: dict = field(default_factory=dict)  # min_width, max_width, min_height, max_height


def check_images(
    records: Iterable[Record], max_workers: int | None = None,
) -> dict[str, tuple[int, int] | str]:
    """Decode every distinct image once: uri -> (width, height), or the problem as text. With
    ``VISIONTUNE_REUSE_IMAGE_CHECK``, images an earlier check saw unchanged are not decoded
    again (``checked.py``); every result is recorded for such later runs.

    Threads, because Pillow releases the GIL while decoding and downloads wait on the network."""
    uris = list(dict.fromkeys(r.image for r in records))
    if not uris:
        return {}

    def check(uri: str) -> tuple[int, int] | str:
        try:
            return verify_image(uri, where=uri)
        except DataError as exc:
            return str(exc)

    stamps = {u: s for u in uris if (s := checked.stamp(u)) is not None}  # a stat: no threads
    # One thread a core for local files (more only contend: BENCHMARKS.md, "Scale"); four a
    # core when images come over the network (no stamp), where threads mostly wait.
    workers = max_workers or min(32, cpu_cores() * (4 if len(stamps) < len(uris) else 1))
    with ThreadPoolExecutor(max_workers=min(workers, len(uris))) as pool:
        known = checked.recall(stamps) if settings.flag("VISIONTUNE_REUSE_IMAGE_CHECK") else {}
        todo = [u for u in uris if u not in known]
        if len(uris) > 1000 or known:
            log.info("checking %d images%s", len(todo), f" ({len(known)} more unchanged since "
                     "an earlier check: not decoded again)" if known else "")
        results = dict(zip(todo, pool.map(check, todo)))
    checked.remember(stamps, results)
    return {u: known[u] if u in known else results[u] for u in uris}


def apply_verification(
    records: list[Record], results: dict[str, tuple[int, int] | str],
) -> tuple[list[Record], list[Problem]]:
    good, bad = [], []
    for record in records:
        result = results.get(record.image)
        if isinstance(result, str):
            bad.append(Problem(record.where, result))
        else:
            good.append(record)
    return good, bad


def size_range(records: Iterable[Record], results: dict[str, tuple[int, int] | str]) -> dict:
    sizes = [results[r.image] for r in records if isinstance(results.get(r.image), tuple)]
    if not sizes:
        return {}
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {"min_width": min(widths), "max_width": max(widths),
            "min_height": min(heights), "max_height": max(heights)}


def in_file_order(problems: Iterable[Problem]) -> list[Problem]:
    """Problems sorted by file, then line number (row problems and image problems interleave)."""
    def key(problem: Problem):
        path, _, line = problem.where.rpartition(":")
        return (path, int(line), "") if path and line.isdigit() else (problem.where, 0, "")
    return sorted(problems, key=key)


def summarize_problems(problems: list[Problem], rows: int, name: str) -> str:
    shown = "; ".join(str(p) for p in problems[:SHOWN_IN_SUMMARY])
    more = len(problems) - SHOWN_IN_SUMMARY
    return (f"{name}: {len(problems)} bad row(s) of {rows}: {shown}"
            + (f"; ... and {more} more" if more > 0 else ""))


def _read(
    source, name: str, task: str, image_column: str, label_column: str,
) -> tuple[list[Record], list[Problem]]:
    records, problems = load_records(source, task, image_column, label_column)
    log.info("%s data %s: %d row(s) read", name, redact(str(source)), len(records) + len(problems))
    return records, problems


def prepare_data(
    training_data: str | Path,
    validation_data: str | Path | None = None,
    *,
    task: str,
    image_column: str = "image_url",
    label_column: str = "label",
    validation_fraction: float = 0.2,
    seed: int = 42,
    skip_bad_rows: bool = False,
    verify_images: bool = True,
    extra_classes: Iterable[str] = (),
) -> PreparedData:
    """Read, check and split the data for training; DataError when it cannot be used."""
    check_task(task)
    sets: dict[str, tuple[str | Path, list[Record], list[Problem]]] = {}
    sets["training"] = (training_data, *_read(training_data, "training", task, image_column,
                                              label_column))
    has_validation = validation_data is not None and str(validation_data).strip() != ""
    if has_validation:
        sets["validation"] = (validation_data, *_read(validation_data, "validation", task,
                                                      image_column, label_column))

    results: dict[str, tuple[int, int] | str] = {}
    if verify_images:
        results = check_images(r for _, recs, _ in sets.values() for r in recs)

    kept: dict[str, list[Record]] = {}
    bad: dict[str, list[Problem]] = {}
    summaries: list[str] = []
    for name, (source, records, problems) in sets.items():
        rows = len(records) + len(problems)
        good, bad_images = apply_verification(records, results) if verify_images else (records, [])
        kept[name], bad[name] = good, in_file_order(problems + bad_images)
        if bad[name]:
            summaries.append(summarize_problems(bad[name], rows, f"{name} data {redact(str(source))}"))
            if skip_bad_rows:
                log.warning("%s data: skipped %d of %d rows: %s", name, len(bad[name]), rows,
                            "; ".join(str(p) for p in bad[name][:SHOWN_IN_SUMMARY])
                            + (" ..." if len(bad[name]) > SHOWN_IN_SUMMARY else ""))
    skipped = [p for problems in bad.values() for p in problems]
    if skipped and not skip_bad_rows:
        raise DataError(
            " ".join(summaries) + ". Fix these rows, or pass skip_bad_rows true (--skip_bad_rows "
            "true) to train without them; `visiontune data check` lists them all."
        )
    for name, (source, _, _) in sets.items():
        if not kept[name]:
            detail = f" (all {len(bad[name])} row(s) are bad)" if bad[name] else ""
            raise DataError(f"{name} data {redact(str(source))} has no usable rows{detail}")

    train = kept["training"]
    validation = kept.get("validation", [])
    classes = build_classes(train, validation, [str(c) for c in extra_classes])
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no labels at all"
        given = f"training data {redact(str(training_data))}" + (
            f" and validation data {redact(str(validation_data))}" if has_validation else "")
        verb = "hold" if has_validation else "holds"
        raise DataError(f"the {given} {verb} {found}; image classification needs at least 2 "
                        "classes (--training_data)")

    split = not has_validation
    if split:
        train, validation = stratified_split(train, validation_fraction, seed, task)
        if not validation:
            raise DataError(
                f"the training data has too few rows ({len(train)}) to hold out validation rows "
                "while keeping every class in training; give validation_data"
            )
    unseen = sorted(set(build_classes(validation)) - set(build_classes(train)))
    if unseen:
        log.warning("%d class(es) appear in validation but not in training: %s", len(unseen),
                    ", ".join(unseen[:10]) + (" ..." if len(unseen) > 10 else ""))

    sizes = size_range(train + validation, results)
    log.info(
        "data: %d training row(s), %d validation row(s)%s, %d classes%s%s", len(train),
        len(validation),
        f" (held out {validation_fraction:.0%} of the training data, seed {seed})" if split else "",
        len(classes),
        f", image widths {sizes['min_width']}-{sizes['max_width']} px, heights "
        f"{sizes['min_height']}-{sizes['max_height']} px" if sizes else "",
        f", {len(skipped)} bad row(s) skipped" if skipped else "",
    )
    return PreparedData(train=train, validation=validation, classes=classes, skipped=skipped,
                        validation_is_split=split, image_sizes=sizes)


def prepare_test_data(
    source: str | Path,
    *,
    task: str,
    classes: list[str],
    image_column: str = "image_url",
    label_column: str = "label",
    skip_bad_rows: bool = False,
    name: str = "test",
) -> tuple[list[Record], int]:
    """Labelled data for evaluation against a model's ``classes``: (usable Records, bad rows
    skipped). Bad rows follow training's rules; a label the model does not know is an error
    of the data as a whole (the model cannot be scored on it), not a row to skip."""
    check_task(task)
    records, problems = _read(source, name, task, image_column, label_column)
    labels = {lab for r in records for lab in (r.label if isinstance(r.label, tuple) else (r.label,))}
    unknown = sort_classes(labels - set(classes))
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        known = ", ".join(classes[:30]) + (" ..." if len(classes) > 30 else "")
        raise DataError(f"{name} {redact(str(source))}: {len(unknown)} label(s) the model does not know: "
                        f"{shown} (the model's classes: {known})")
    rows = len(records) + len(problems)
    good, bad_images = apply_verification(records, check_images(records))
    bad = in_file_order(problems + bad_images)
    if bad:
        summary = summarize_problems(bad, rows, f"{name} {redact(str(source))}")
        if not skip_bad_rows:
            raise DataError(summary + ". Fix these rows, or pass skip_bad_rows true "
                            "(--skip_bad_rows true) to go on without them; `visiontune data check` "
                            "lists them all.")
        log.warning("skipped: %s", summary)
    if not good:
        raise DataError(f"{name} {redact(str(source))} has no usable rows"
                        + (f" (all {len(bad)} row(s) are bad)" if bad else ""))
    return good, len(bad)
