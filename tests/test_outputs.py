"""Output folders: refused with one line before any data or model is loaded when they cannot
be used or hold what visiontune did not write; one run per folder; written in place, never
leaving a half-written folder that looks complete."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import subset
from visiontune.cli import main
from visiontune.errors import UserError
from visiontune.outputs import LOCK_FILE, STAGING_PREFIX, FolderLock, check_folder, staged


@pytest.fixture(scope="module")
def tiny_data(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("outdata")
    return subset(demo_dir / "digits" / "train", root / "train.jsonl", 2, per_class=True)


def _finetune(capsys, model, data, out, *extra):
    code = main(["finetune", "--model_path", str(model), "--training_data", str(data),
                 "--task_name", "image-classification", "--output_dir_pytorch", str(out),
                 "--image_height", "32", "--image_width", "32", "--max_steps", "1",
                 "--number_of_epochs", "1", *extra])
    return code, capsys.readouterr()


def _one_error_line(err: str, *words) -> str:
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_an_mlflow_folder_holding_the_users_files_is_refused_and_kept(capsys, tiny_vit, tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, seen = _finetune(capsys, tiny_vit, tiny_data, tmp_path / "out",
                           "--save_as_mlflow_model", "true", "--output_dir_mlflow", str(mine))
    assert code == 2
    _one_error_line(seen.err, "--output_dir_mlflow", str(mine), "notes.txt", "did not write")
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert "validating" not in seen.out and not (tmp_path / "out" / "config.json").exists()


def test_a_pytorch_folder_holding_the_users_files_is_refused(capsys, tiny_vit, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    code, seen = _finetune(capsys, tiny_vit, tiny_data, out)
    assert code == 2
    _one_error_line(seen.err, "--output_dir_pytorch", "thesis.pdf")
    assert sorted(os.listdir(out)) == ["thesis.pdf"]


def test_an_output_that_is_a_file_is_refused(capsys, tiny_vit, tiny_data, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    code, seen = _finetune(capsys, tiny_vit, tiny_data, target)
    assert code == 2
    _one_error_line(seen.err, "--output_dir_pytorch", "is a file")
    assert target.read_text() == "x"


def test_the_model_folder_is_not_an_output(capsys, tiny_vit, tiny_data):
    code, seen = _finetune(capsys, tiny_vit, tiny_data, tiny_vit)
    assert code == 2
    _one_error_line(seen.err, "--output_dir_pytorch", "--model_path")


def test_an_output_on_a_read_only_file_system_is_refused_before_loading(capsys, tiny_vit, tiny_data, tmpfs):
    read_only = tmpfs(read_only=True)
    for option in ("--output_dir_pytorch", "--output_dir_mlflow"):
        extra = ("--save_as_mlflow_model", "true", "--output_dir_mlflow", str(read_only / "m")) \
            if option == "--output_dir_mlflow" else ()
        out = read_only / "out" if option == "--output_dir_pytorch" else read_only.parent / "ok-out"
        code, seen = _finetune(capsys, tiny_vit, tiny_data, out, *extra)
        assert code == 2, option
        _one_error_line(seen.err, option, "Read-only file system")


def test_check_folder_accepts_empty_new_and_earlier_outputs(tmp_path):
    assert check_folder(tmp_path / "new" / "deep", "x").is_dir()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "ours.json").write_text("{}")
    check_folder(tmp_path / "earlier", "x", replaceable=lambda f: (f / "ours.json").exists())
    with pytest.raises(UserError, match="--x: .* holds files visiontune did not write"):
        check_folder(tmp_path / "earlier", "x", replaceable=lambda f: False)
    assert not (tmp_path / "later").exists() and check_folder(tmp_path / "later", "x", create=False)
    assert not (tmp_path / "later").exists()


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(capsys, tiny_vit, tiny_data, tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "output_dir_pytorch"):
        code, seen = _finetune(capsys, tiny_vit, tiny_data, out)
    assert code == 2
    _one_error_line(seen.err, "--output_dir_pytorch", "in use by another run", f"process {os.getpid()}")
    assert not out.exists()  # released: the lock file and the folder it was made for are gone


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from visiontune.outputs import FolderLock
        with FolderLock(Path({str(tmp_path)!r}), "output_dir_pytorch"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {holder.pid} on"):
            with FolderLock(tmp_path, "output_dir_pytorch"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    with FolderLock(tmp_path, "output_dir_pytorch"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def _fill(folder: Path, version: str) -> None:
    with staged(folder, complete_marker="MLmodel") as staging:
        (staging / "MLmodel").write_text(version)
        (staging / "artifacts").mkdir()
        (staging / "artifacts" / "weights").write_text(version)
        if version == "boom":
            raise RuntimeError("interrupted")


def test_staged_contents_replace_an_earlier_output_in_place(tmpfs):
    folder = tmpfs()  # a mount point: it cannot be removed or renamed, only filled
    _fill(folder, "one")
    inode = folder.stat().st_ino
    _fill(folder, "two")
    assert folder.stat().st_ino == inode and folder.is_mount()
    assert (folder / "MLmodel").read_text() == "two" and (folder / "artifacts" / "weights").read_text() == "two"
    assert sorted(p.name for p in folder.iterdir()) == ["MLmodel", "artifacts"]


def test_an_interrupted_write_leaves_the_old_output(tmp_path):
    _fill(tmp_path, "one")
    with pytest.raises(RuntimeError):
        _fill(tmp_path, "boom")
    assert (tmp_path / "MLmodel").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MLmodel", "artifacts"]


def test_a_write_killed_midway_leaves_no_complete_marker_and_its_staging_is_cleared(tmp_path):
    """SIGKILL while entries are being moved in: the marker is gone (removed first, moved last),
    and the next check removes the staging folder left behind."""
    _fill(tmp_path, "one")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from visiontune import outputs
        real = os.replace
        def replace(src, dst):
            if Path(dst).name == "artifacts":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        outputs.os.replace = replace
        with outputs.staged(Path({str(tmp_path)!r}), complete_marker="MLmodel") as staging:
            (staging / "MLmodel").write_text("two")
            (staging / "artifacts").mkdir()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "MLmodel").exists()
    assert any(p.name.startswith(STAGING_PREFIX) for p in tmp_path.iterdir())
    check_folder(tmp_path, "x")
    assert not any(p.name.startswith(STAGING_PREFIX) for p in tmp_path.iterdir())


@pytest.fixture
def corrupt_model(tiny_vit, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_vit, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_predict_with_damaged_weights_is_one_line(capsys, corrupt_model, tiny_data, tmp_path):
    code = main(["predict", "--model", str(corrupt_model), "--data", str(tiny_data),
                 "--output", str(tmp_path / "p.jsonl")])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--model", str(corrupt_model), "cannot load the model")
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_output_that_cannot_be_written_stops_before_scoring(capsys, tiny_vit, tiny_data, tmpfs, command):
    read_only = tmpfs(read_only=True)
    target = ["--output", str(read_only / "p.jsonl")] if command == "predict" else \
        ["--output_dir", str(read_only / "report"), "--test_data", str(tiny_data)]
    data = ["--data", str(tiny_data)] if command == "predict" else []
    code = main([command, "--model", str(tiny_vit), *data, *target])
    seen = capsys.readouterr()
    assert code == 2
    _one_error_line(seen.err, "--output", "Read-only file system")
    assert "predicted" not in seen.out and "accuracy" not in seen.out


def test_the_mlflow_model_fills_a_mount_point_and_replaces_an_earlier_one(capsys, tiny_vit, tiny_data, tmpfs,
                                                                           tmp_path):
    """Azure ML mounts each output: the MLflow model is written into the mounted folder (never
    removing or renaming it), a second run replaces the first's model there, and MLflow loads
    it."""
    import mlflow.pyfunc

    mount = tmpfs()
    for run in ("first", "second"):
        code, seen = _finetune(capsys, tiny_vit, tiny_data, tmp_path / run,
                               "--save_as_mlflow_model", "true", "--output_dir_mlflow", str(mount))
        assert code == 0, seen.err[-2000:]
        assert mount.is_mount() and (mount / "MLmodel").is_file()
        assert not [p.name for p in mount.iterdir() if p.name.startswith(".")]
    model = mlflow.pyfunc.load_model(str(mount))
    assert model.metadata.metadata["written_by"] == "visiontune"


def test_export_onnx_checks_its_output_and_the_weights_first(capsys, corrupt_model, tiny_vit, tmpfs, tmp_path):
    pytest.importorskip("onnxscript")
    code = main(["export-onnx", "--model", str(tiny_vit), "--output_dir", str(tmpfs(read_only=True) / "x")])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--output_dir", "Read-only file system")
    code = main(["export-onnx", "--model", str(corrupt_model), "--output_dir", str(tmp_path / "onnx")])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--model", "cannot load the model")
    assert not (tmp_path / "onnx").exists()


def test_the_staging_folder_of_a_run_still_writing_is_left_alone(tmp_path):
    """Only staging folders whose process is gone are cleared: a second run checking the same
    folder must not remove the one a live run is filling."""
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-abc"
    live.mkdir()
    check_folder(tmp_path, "x")
    assert live.is_dir()
