"""``visiontune data check``: everything wrong with a dataset, before any training starts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from visiontune.data.storage import redact
from visiontune.data.labels import build_classes, check_task
from visiontune.data.prepare import apply_verification, check_images, in_file_order, size_range
from visiontune.data.sources import load_records
from visiontune.tasks import MULTICLASS

LISTED = 50  # bad rows and classes listed in full up to this many


def check_data(
    source: str | Path, task: str, *, image_column: str = "image_url",
    label_column: str = "label", skip_bad_rows: bool = False,
) -> tuple[str, bool]:
    """(report text, whether training could use this data with these settings).

    Reads every row and decodes every image once. A source that cannot be read at all
    raises DataError, as training would."""
    check_task(task)
    records, problems = load_records(source, task, image_column, label_column)
    rows = len(records) + len(problems)
    results = check_images(records)
    good, bad_images = apply_verification(records, results)
    problems = in_file_order(problems + bad_images)

    lines = [f"data: {redact(str(source))}", f"task: {task}",
             f"rows: {rows} read, {len(good)} usable, {len(problems)} bad"]

    classes = build_classes(good)
    counts = Counter(
        label for r in good for label in ((r.label,) if isinstance(r.label, str) else r.label)
    )
    lines.append(f"classes: {len(classes)}" + ("" if task == MULTICLASS else " (rows per label)"))
    width = max((len(c) for c in classes[:LISTED]), default=0)
    lines += [f"  {name:<{width}}  {counts[name]}" for name in classes[:LISTED]]
    if len(classes) > LISTED:
        lines.append(f"  ... and {len(classes) - LISTED} more")
    if task != MULTICLASS:
        unlabeled = sum(1 for r in good if not r.label)
        if unlabeled:
            lines.append(f"rows with no labels: {unlabeled}")

    sizes = size_range(good, results)
    if sizes:
        lines.append(f"image sizes: width {sizes['min_width']}-{sizes['max_width']} px, "
                     f"height {sizes['min_height']}-{sizes['max_height']} px")

    if problems:
        lines.append(f"bad rows: {len(problems)}")
        lines += [f"  {p}" for p in problems[:LISTED]]
        if len(problems) > LISTED:
            lines.append(f"  ... and {len(problems) - LISTED} more")

    if not good:
        verdict, ok = "NOT USABLE: no usable rows", False
    elif len(classes) < 2:
        verdict, ok = f"NOT USABLE: {len(classes)} class(es); at least 2 are needed", False
    elif problems and not skip_bad_rows:
        verdict, ok = (f"NOT USABLE as is: {len(problems)} bad row(s) stop training; fix them, or "
                       "pass --skip_bad_rows true to train without them"), False
    elif problems:
        verdict, ok = f"usable: {len(problems)} bad row(s) will be skipped", True
    else:
        verdict, ok = "usable", True
    lines.append(f"result: {verdict}")
    return "\n".join(lines), ok
