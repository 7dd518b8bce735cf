"""What a user sees: visiontune's lines and real warnings; third-party noise only in the debug
log; plain progress lines when the output is a log file."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import subset
from visiontune import console

ANSI = re.compile(r"\x1b\[")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")


def _record(name, level, message, module="x"):
    record = logging.LogRecord(name, level, f"{module}.py", 1, message, None, None)
    record.module = module
    return record


@pytest.mark.parametrize("name, level, message, module, noise", [
    ("transformers.modeling_utils", logging.WARNING, "\x1b[1mViTForImageClassification LOAD REPORT\x1b[0m", "x", True),
    ("transformers.trainer", logging.WARNING, "a real warning", "x", False),
    ("transformers.configuration_utils", logging.WARNING,
     "You passed `num_labels=2` which is incompatible to the `id2label` map of length `3`.", "x", True),
    ("transformers.trainer", logging.INFO, "***** Running training *****", "x", True),
    ("mlflow.pyfunc", logging.WARNING, "Passing a Python object as `python_model` ...", "x", True),
    ("mlflow.store", logging.ERROR, "cannot reach the server", "x", False),
    ("DeepSpeed", logging.WARNING, "Setting accelerator to CPU.", "real_accelerator", True),
    ("DeepSpeed", logging.WARNING, "ZeRO stage 3 ...", "engine", False),
    ("visiontune.training", logging.INFO, "step 1/2", "x", False),
    ("visiontune.data.prepare", logging.DEBUG, "details", "x", False),
])
def test_what_is_noise(name, level, message, module, noise):
    assert console.is_noise(_record(name, level, message, module)) is noise


def test_noise_goes_to_the_debug_log_without_colour_codes():
    def shown(level):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(console._Formatter(stream, "%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(console._Route(level))
        for record in (_record("transformers.modeling_utils", logging.WARNING,
                               "\x1b[1mViTForImageClassification LOAD REPORT\x1b[0m from: x"),
                       _record("visiontune.finetune", logging.WARNING, "a warning of visiontune")):
            handler.handle(record)
        return stream.getvalue()

    assert shown(logging.INFO) == "WARNING visiontune.finetune: a warning of visiontune\n"
    debug = shown(logging.DEBUG)
    assert "DEBUG transformers.modeling_utils: ViTForImageClassification LOAD REPORT" in debug
    assert not ANSI.search(debug)


@pytest.fixture(scope="module")
def run(tiny_vit, demo_dir, tmp_path_factory):
    """The pipeline on 2 of the tiny model's 3 classes (a new head: transformers' load report),
    with an MLflow model (MLflow's warnings and download bars), its output a log file."""
    root = tmp_path_factory.mktemp("console")

    def two(split, n):
        return str(subset(demo_dir / "digits" / split, root / f"{split}.jsonl", n, per_class=True,
                          labels=("0", "1")))

    env = {k: v for k, v in os.environ.items()
           if k not in ("VISIONTUNE_LOG_LEVEL", "TRANSFORMERS_VERBOSITY", "MLFLOW_CONFIGURE_LOGGING",
                        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "PYTHONWARNINGS")}
    command = [sys.executable, "-m", "visiontune", "pipeline", "--pytorch_model", str(tiny_vit),
               "--training_data", two("train", 8), "--validation_data", two("validation", 4),
               "--test_data", two("test", 3), "--task_name", "image-classification",
               "--output_dir_pytorch", str(root / "out"), "--number_of_epochs", "2",
               "--logging_strategy", "steps", "--logging_steps", "1", "--training_batch_size", "8",
               "--image_height", "32", "--image_width", "32", "--number_of_workers", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_no_colour_codes_in_a_log_file(run):
    assert not ANSI.search(run.stdout) and not ANSI.search(run.stderr)


def test_every_log_line_is_visiontunes(run):
    for line in run.stderr.splitlines():
        if re.fullmatch(r"evaluate: \d+/\d+ images", line):
            continue  # evaluation's plain progress lines
        match = LOG_LINE.match(line)
        assert match, f"not a log line: {line!r}"  # raw prints, tables, bars, Python warnings
        assert match.group(2).startswith("visiontune"), line  # nothing else has news for this run


def test_no_third_party_noise(run):
    seen = run.stdout + run.stderr
    for noise in ("LOAD REPORT", "MISMATCH", "[transformers]", "Downloading artifacts",
                  "real_accelerator", "Setting accelerator", "UserWarning", "mlflow"):
        if noise == "mlflow":  # the MLflow model's folder may be named; MLflow itself says nothing
            assert not re.search(r"\bWARNING mlflow|mlflow/\w+.*\.py:\d+", seen), seen
        else:
            assert noise not in seen, noise


def test_plain_progress_lines_and_results(run):
    steps = re.findall(r"visiontune\.training: step (\d+)/(\d+) epoch [\d.]+: loss=", run.stderr)
    assert len(steps) >= 2 and steps[-1][0] == steps[-1][1]
    assert re.search(r"visiontune\.training: step \d+/\d+ epoch 2\.00: eval_loss=", run.stderr)
    assert re.search(r"^evaluate: 6/6 images$", run.stderr, re.M)
    assert "new classification head: 2 classes (checkpoint had 3)" in run.stderr
    for line in ("[3/4] fine-tuning", "validation metrics of the best model:", "evaluation report:"):
        assert line in run.stdout


def test_silenced_blocks_overlapping_in_threads_keep_the_loggers_silent_until_the_last_leaves():
    """Images are read in threads: one block leaving must not let another's records through."""
    import logging
    import threading

    from visiontune.console import silenced

    logger = logging.getLogger("azure.identity")
    first_in, second_left = threading.Event(), threading.Event()
    seen = []

    def first():
        with silenced(("azure",)):
            first_in.set()
            second_left.wait(10)
            seen.append(logger.isEnabledFor(logging.CRITICAL))

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    with silenced(("azure",)):
        pass
    second_left.set()
    thread.join(10)
    assert seen == [False]
    assert logging.getLogger("azure").level == logging.NOTSET and logger.isEnabledFor(logging.WARNING)
