"""Image references that are not image files: a named pipe, a device, a file over the size
limit. ``visiontune data check`` (run as the command, in a process of its own) and the data
preparation of ``finetune`` report each as a bad row with its reason, promptly, without a
traceback, and without reading them."""

import json
import os
import subprocess
import sys
import threading

import pytest
from PIL import Image

from visiontune.data.images import max_file_bytes
from visiontune.data.prepare import prepare_data
from visiontune.errors import DataError
from visiontune.inputs import MULTICLASS

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="named pipes and /dev/zero are POSIX")

COMMAND_TIMEOUT_S = 60
MEMORY_CAP = 2 << 30  # the command needs far less; a read of /dev/zero would hit it, not the machine


def _cap_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.fixture
def rows_with_unreadable_images(tmp_path):
    """A JSON Lines dataset: two good images, then a FIFO, /dev/zero and a sparse file one byte
    over the default limit (no disk spent). Returns (the file, the expected bad-row lines)."""
    for name, colour in (("a.png", (10, 20, 30)), ("b.png", (200, 100, 0))):
        Image.new("RGB", (8, 6), colour).save(tmp_path / name)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as out:
        out.truncate(max_file_bytes() + 1)
    rows = tmp_path / "rows.jsonl"
    images = [tmp_path / "a.png", tmp_path / "b.png", fifo, "/dev/zero", huge]
    rows.write_text("".join(json.dumps({"image_url": str(image), "label": label}) + "\n"
                            for image, label in zip(images, "ababa")))
    expected = [
        f"{rows}:3: image path is a named pipe (FIFO), not a regular file: {fifo}",
        f"{rows}:4: image path is a character device, not a regular file: /dev/zero",
        f"{rows}:5: image too large: {huge} is 256.0 MB, over the limit of 256.0 MB per image "
        "(the max_image_mb input raises it)",
    ]
    return rows, expected


def _data_check(rows, *extra):
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "visiontune", "data", "check", "--data", str(rows),
             "--task_name", MULTICLASS, *extra],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env,
            preexec_fn=_cap_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"visiontune data check did not finish in {COMMAND_TIMEOUT_S} s (a read blocked)")
    return proc


def test_data_check_reports_a_fifo_a_device_and_a_huge_file_as_bad_rows(rows_with_unreadable_images):
    rows, expected = rows_with_unreadable_images
    proc = _data_check(rows)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 1, output  # not usable as is: bad rows stop training
    bad = [line.strip() for line in proc.stdout.splitlines() if line.startswith(f"  {rows}:")]
    assert bad == expected, output
    assert "rows: 5 read, 2 usable, 3 bad" in proc.stdout

    proc = _data_check(rows, "--skip_bad_rows", "true")
    assert proc.returncode == 0 and "result: usable: 3 bad row(s) will be skipped" in proc.stdout


def test_finetune_data_preparation_reports_them_too(rows_with_unreadable_images, monkeypatch):
    """What finetune runs before training: the same bad rows, in its one-line summary. In a
    thread, and with a small limit, so that a read that blocks or never ends fails the test
    instead of hanging it or filling the memory."""
    rows, expected = rows_with_unreadable_images
    from visiontune.data import files

    monkeypatch.setitem(files._max_file, "bytes", 1 << 20)  # what --max_image_mb 1 sets
    expected[-1] = expected[-1].replace("the limit of 256.0 MB", "the limit of 1.0 MB")
    outcome = []

    def prepare():
        try:
            prepare_data(rows, rows, task=MULTICLASS)
        except DataError as exc:
            outcome.append(str(exc))
        outcome.append(prepare_data(rows, rows, task=MULTICLASS, skip_bad_rows=True))

    thread = threading.Thread(target=prepare, daemon=True)
    thread.start()
    thread.join(COMMAND_TIMEOUT_S / 2)
    assert len(outcome) == 2, "preparing the data did not finish (a read blocked)"
    summary, data = outcome
    for line in expected:
        assert line in summary, summary
    assert [record.image for record in data.train] == [str(rows.parent / "a.png"),
                                                       str(rows.parent / "b.png")]
