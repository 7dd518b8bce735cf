"""The components as Azure ML runs them, and model folders exchanged with Azure's components.

Fast tests (default suite): the emulator's command line (tests/azure_job.py), and the model
import layouts both ways: visiontune's finetune reads Azure's import output (the model in
``model/``, ``model_selector_args.json`` naming it), and Azure's finetune, which joins
``pytorch_model_path`` to the folder, reads visiontune's import output.

Slow tests (``-m slow``): each component run as an Azure job by the emulator: the command built
from the spec, the code folder as working directory, an environment built from the component's
own ``environment`` section only (built once and reused by every test run: minutes and GBs the
first time), read-only inputs, each output a tmpfs mount point, Azure's job variables and one
process per rank for distributed jobs.
"""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from tests import azure_job as AJ
from tests.helpers import subset
from visiontune import components as C
from visiontune import inputs as I
from visiontune.config import resolve
from visiontune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components"
FINETUNE, IMPORT, EVALUATE, PIPELINE = (COMPONENTS / f"{n}.yaml" for n in
                                        ("finetune", "model_import", "evaluate", "pipeline"))
MC, ML = I.MULTICLASS, I.MULTILABEL
# Small and quick: 32x32 inputs, one epoch, the tiny ViT.
QUICK = {"number_of_epochs": 1, "image_height": 32, "image_width": 32, "learning_rate": 0.001,
         "training_batch_size": 8, "validation_batch_size": 8}
JOB_ENV = {"OMP_NUM_THREADS": "1"}  # the job's own environment variables: 2 shared cores here
# A job test's limit includes its fixtures: the first one builds the environment (about 5 min
# here, more on a slow registry).
JOB_TIMEOUT = pytest.mark.timeout(3600)


# ---------------------------------------------------------------------------------------------
# The emulator's command line (fast)
# ---------------------------------------------------------------------------------------------
def test_command_drops_unset_optional_parts_and_applies_defaults():
    spec = AJ.load_spec(FINETUNE)
    values = AJ.resolve_inputs(spec, {"model_path": "/in/model", "training_data": "/in/train",
                                      "task_name": MC, "number_of_epochs": 2})
    command = AJ.build_command(spec["command"], values, {"output_dir_pytorch": "/out/pt",
                                                         "output_dir_mlflow": "/out/mlflow"})
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "visiontune", "finetune"]
    options = dict(zip(argv[4::2], argv[5::2]))
    assert options["--number_of_epochs"] == "2"
    # Declared defaults are applied as Azure applies them...
    assert options["--number_of_workers"] == "8" and options["--precision"] == "32"
    assert options["--apply_augmentations"] == "True" and options["--save_total_limit"] == "-1"
    # ... and optional inputs without a value (or with the empty default) are left out.
    for name in ("--validation_data", "--learning_rate", "--extra_optim_args", "--deepspeed_config"):
        assert name not in options
    assert options["--output_dir_pytorch"] == "/out/pt"
    # What the CLI makes of it.
    from visiontune.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "config")}
    resolved = resolve(I.FINETUNE_INPUTS, given)
    assert resolved.number_of_workers == 8 and resolved.precision == 32


def test_a_required_input_without_value_or_an_unknown_input_is_refused():
    spec = AJ.load_spec(FINETUNE)
    with pytest.raises(AJ.JobSpecError, match="training_data"):
        AJ.resolve_inputs(spec, {"model_path": "/m", "task_name": MC})
    with pytest.raises(AJ.JobSpecError, match="unknown input"):
        AJ.resolve_inputs(spec, {"model_path": "/m", "training_data": "/d", "task_name": MC,
                                 "epochs": 3})


def test_the_command_components_share_one_environment_and_its_key_follows_the_section():
    specs = [AJ.load_spec(p) for p in (FINETUNE, IMPORT, EVALUATE)]
    keys = {AJ.environment_key(s) for s in specs}
    assert len(keys) == 1
    python, requirements = AJ.environment_requirements(specs[0])
    assert python == C.PYTHON and requirements == C.requirements(C.ENVIRONMENT_EXTRAS)
    assert any(r.startswith("deepspeed") for r in requirements)  # apply_deepspeed's
    assert {"onnx", "onnxruntime", "onnxscript"} <= {r.split(">")[0] for r in requirements}
    changed = {**specs[0], "environment": {**specs[0]["environment"], "image": "other:latest"}}
    assert AJ.environment_key(changed) not in keys


# ---------------------------------------------------------------------------------------------
# Model import layouts, both ways (fast)
# ---------------------------------------------------------------------------------------------
def _azure_import_output(root: Path, model_folder: Path, key: str = "pytorch_model_path",
                         sub: str = "model") -> Path:
    """A folder as Azure's model import writes it: the model copied into ``sub``, and
    model_selector_args.json naming it relative to the folder."""
    root.mkdir(parents=True)
    shutil.copytree(model_folder, root / sub)
    args = {"model_name": "tiny-vit", "pytorch_model_path": None, "mlflow_model_path": None,
            "model_metadata": {"base_model_name": "tiny-vit"}}
    args[key] = sub
    (root / "model_selector_args.json").write_text(json.dumps(args))
    return root


def test_finetune_reads_azure_s_import_output(tiny_vit, demo_dir, tmp_path):
    from visiontune.model_folder import ModelFolder
    from visiontune.training.finetune import finetune

    imported = _azure_import_output(tmp_path / "azure_import", tiny_vit)
    assert ModelFolder.open(imported, "--model_path").path == (imported / "model").resolve()
    train = subset(demo_dir / "digits" / "train", tmp_path / "train.jsonl", 3, per_class=True)
    val = subset(demo_dir / "digits" / "validation", tmp_path / "val.jsonl", 2, per_class=True)
    out = tmp_path / "out"
    result = finetune(resolve(I.FINETUNE_INPUTS, {
        "model_path": str(imported), "training_data": str(train), "validation_data": str(val),
        "task_name": MC, "output_dir_pytorch": str(out), "save_as_mlflow_model": False,
        "number_of_workers": 0, **QUICK}))
    assert (result.output_dir_pytorch / "model.safetensors").is_file()
    assert result.classes == [str(d) for d in range(10)]


def test_finetune_reads_azure_s_import_of_an_mlflow_model(tiny_vit, tmp_path):
    """Azure copies an MLflow model's files flat into the folder mlflow_model_path names."""
    from visiontune.model_folder import ModelFolder

    imported = _azure_import_output(tmp_path / "azure_import", tiny_vit, "mlflow_model_path",
                                    "mlflow_model_folder")
    assert ModelFolder.open(imported, "--model_path").path == (imported / "mlflow_model_folder").resolve()
    # Not flattened: the Hugging Face folder somewhere below.
    nested = tmp_path / "nested"
    nested.mkdir()
    shutil.copytree(tiny_vit, nested / "mlflow" / "data" / "model")
    (nested / "model_selector_args.json").write_text(json.dumps({"mlflow_model_path": "mlflow"}))
    assert ModelFolder.open(nested, "--model_path").path == (nested / "mlflow" / "data" / "model").resolve()


def test_an_import_output_without_model_files_says_what_to_do(tmp_path):
    from visiontune.model_folder import ModelFolder

    hub_only = tmp_path / "hub_only"
    hub_only.mkdir()
    (hub_only / "model_selector_args.json").write_text(json.dumps(
        {"model_name": "google/vit-base-patch16-224", "pytorch_model_path": None,
         "mlflow_model_path": None}))
    with pytest.raises(UserError, match="names the model 'google/vit-base-patch16-224' but holds "
                                        "no model files"):
        ModelFolder.open(hub_only, "--model_path")
    (hub_only / "model_selector_args.json").write_text(json.dumps({"pytorch_model_path": "model"}))
    with pytest.raises(UserError, match="holds no config.json there"):
        ModelFolder.open(hub_only, "--model_path")
    (hub_only / "model_selector_args.json").write_text(json.dumps({"pytorch_model_path": "../x"}))
    with pytest.raises(UserError, match="points outside"):
        ModelFolder.open(hub_only, "--model_path")


def _azure_finetune_model_path(model_path: Path) -> str:
    """How Azure's finetune finds the model in its model_path input (azure-behaviour.md):
    ``pytorch_model_path`` (else ``mlflow_model_path``) from model_selector_args.json, joined
    to the folder; with neither, the model_name (a hub download)."""
    args = json.loads((model_path / "model_selector_args.json").read_text())
    if args.get("pytorch_model_path"):
        return os.path.join(str(model_path), args["pytorch_model_path"])
    if args.get("mlflow_model_path"):
        return os.path.join(str(model_path), args["mlflow_model_path"])
    return args["model_name"]


@pytest.mark.parametrize("kind", ["vit", "timm"])
def test_azure_s_finetune_reads_visiontune_s_import_output(kind, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from tests.tiny_models import save_tiny_model
    from visiontune.models.importer import import_model

    source = save_tiny_model(kind, tmp_path / "source", num_labels=3, image_size=32)
    out = import_model(pytorch_model=source, output_dir=tmp_path / "imported")
    args = json.loads((out / "model_selector_args.json").read_text())
    assert args["pytorch_model_path"] and not os.path.isabs(args["pytorch_model_path"])
    assert args["mlflow_model_path"] is None
    path = _azure_finetune_model_path(out)
    assert os.path.isfile(os.path.join(path, "config.json"))
    for folder in (path, str(out)):  # Azure's join, and from_pretrained(output_dir) itself
        model = AutoModelForImageClassification.from_pretrained(folder)
        assert model.config.num_labels == 3
        AutoImageProcessor.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# Jobs (slow)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def can_mount():
    reason = AJ.mount_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def environment(can_mount) -> Path:
    """The components' environment, built from their ``environment`` section (cached)."""
    try:
        return AJ.build_environment(FINETUNE)
    except AJ.EnvironmentBuildFailed as exc:
        pytest.fail(f"the components' environment cannot be built:\n{exc}", pytrace=False)


PROBE_COMMAND = """
touch ${{inputs.data}}/new 2>/dev/null && echo INPUT-WRITABLE || echo INPUT-READ-ONLY;
cat ${{inputs.data}}/rows.txt;
echo $[[${{inputs.note}}]] > ${{outputs.out}}/note.txt;
rmdir ${{outputs.out}} 2>/dev/null || echo OUTPUT-NOT-REMOVABLE;
echo x > $TMPDIR/f && python3 -c "import os, sys; os.replace(sys.argv[1], sys.argv[2])" $TMPDIR/f ${{outputs.out}}/f 2>&1 | grep -o 'Errno 18' || echo REPLACED;
mountpoint -q ${{outputs.out}} && mountpoint -q ${{outputs.other}} && echo OUTPUTS-MOUNTED;
echo ENV $MLFLOW_TRACKING_URI $AZUREML_RUN_ID RANK=${RANK-unset}; pwd
"""


def test_the_emulated_job_has_read_only_inputs_and_mounted_outputs(can_mount, tmp_path):
    """The emulator itself, with a probe component (bash only, no Python environment)."""
    code = tmp_path / "code"
    code.mkdir()
    spec = {"$schema": C.SCHEMA, "type": "command", "name": "probe", "version": "1",
            "code": "./code", "environment": {"image": "x", "conda_file": {"dependencies": []}},
            "inputs": {"data": {"type": "uri_folder"},
                       "note": {"type": "string", "optional": True, "default": "hello"}},
            "outputs": {"out": {"type": "uri_folder"}, "other": {"type": "uri_folder"}},
            "command": PROBE_COMMAND}
    import yaml

    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(spec))
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.txt").write_text("ROWS\n")
    result = AJ.run_command_job(tmp_path / "probe.yaml", {"data": data}, work_dir=tmp_path / "job",
                                environment=tmp_path / "no-venv")
    assert result.returncode == 0, result.why()
    log = result.log
    for expected in ("INPUT-READ-ONLY", "ROWS", "OUTPUT-NOT-REMOVABLE", "Errno 18",
                     "OUTPUTS-MOUNTED", "ENV azureml://", "RANK=unset", str(tmp_path / "job" / "code-node0")):
        assert expected in log, (expected, log)
    assert (result.outputs["out"] / "note.txt").read_text() == "hello\n"  # the declared default
    assert not (data / "new").exists()
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]


def _mltable(rows_file: Path, folder: Path) -> Path:
    """An Azure-style MLTable folder (MLTable + images.jsonl + images/, relative paths) of the
    rows of a JSON Lines file with absolute image paths."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, line in enumerate(rows_file.read_text().splitlines()):
        row = json.loads(line)
        name = f"{i:04d}{Path(row['image_url']).suffix}"
        shutil.copy2(row["image_url"], folder / "images" / name)
        lines.append(json.dumps({**row, "image_url": f"images/{name}"}))
    (folder / "images.jsonl").write_text("\n".join(lines) + "\n")
    from visiontune.demo import MLTABLE

    (folder / "MLTable").write_text(MLTABLE)
    return folder


@pytest.fixture(scope="module")
def data(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("azure_data")
    return {
        MC: (_mltable(subset(demo_dir / "digits" / "train", root / "mc_train.jsonl", 6, per_class=True),
                      root / "mc_train"),
             _mltable(subset(demo_dir / "digits" / "validation", root / "mc_val.jsonl", 2, per_class=True),
                      root / "mc_val"),
             demo_dir / "digits" / "test"),
        ML: (_mltable(subset(demo_dir / "mosaics" / "train", root / "ml_train.jsonl", 48), root / "ml_train"),
             _mltable(subset(demo_dir / "mosaics" / "validation", root / "ml_val.jsonl", 16), root / "ml_val"),
             None),
    }


def _ok(result):
    assert result.returncode == 0, result.why()
    return result


@pytest.fixture(scope="module")
def imported(environment, tiny_vit, tmp_path_factory) -> Path:
    """The tiny ViT imported by the model import job (model_name: a local folder)."""
    result = _ok(AJ.run_command_job(IMPORT, {"model_name": str(tiny_vit)}, environment=environment,
                                    work_dir=tmp_path_factory.mktemp("import_job"), extra_env=JOB_ENV))
    return result.outputs["output_dir"]


@pytest.fixture(scope="module")
def mc_job(environment, imported, data, tmp_path_factory):
    """A multi-class finetune job with Azure's defaults for everything not in QUICK."""
    train, val, _ = data[MC]
    return _ok(AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": train, "validation_data": val,
                   "task_name": MC, **QUICK},
        environment=environment, work_dir=tmp_path_factory.mktemp("mc_job"), extra_env=JOB_ENV))


def _steps(out: Path) -> int:
    """The global step of the newest checkpoint in a pytorch output folder."""
    states = [json.loads(p.read_text()) for p in out.glob("checkpoint-*/trainer_state.json")]
    return max(s["global_step"] for s in states)


@pytest.mark.slow
@JOB_TIMEOUT
def test_model_import_job_writes_a_model_folder(imported, tiny_vit):
    assert (imported / "config.json").is_file() and (imported / "model.safetensors").is_file()
    meta = json.loads((imported / "model_selector_args.json").read_text())
    assert meta["source"] == "local_folder" and meta["pytorch_model_path"] == "."


@pytest.mark.slow
@JOB_TIMEOUT
def test_model_import_job_from_a_cached_hub_id(environment, tiny_vit, tmp_path):
    """model_name a hub id, found in a hub-style cache folder (the hub itself is unreachable)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-vit"
    shutil.copytree(tiny_vit, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = _ok(AJ.run_command_job(
        IMPORT, {"model_name": "tiny-org/tiny-vit", "download_from_source": True},
        environment=environment, work_dir=tmp_path / "job",
        extra_env={**JOB_ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}))
    assert "--model_family HuggingFaceImage" in result.command
    assert "--download_from_source True" in result.command
    out = result.outputs["output_dir"]
    meta = json.loads((out / "model_selector_args.json").read_text())
    assert (meta["model_name"], meta["source"]) == ("tiny-org/tiny-vit", "hub")
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@JOB_TIMEOUT
@pytest.mark.parametrize("source", ["pytorch_model", "mlflow_model"])
def test_model_import_job_from_a_finetune_job_s_output(source, environment, mc_job, tmp_path):
    given = mc_job.outputs["output_dir_pytorch" if source == "pytorch_model" else "output_dir_mlflow"]
    result = _ok(AJ.run_command_job(IMPORT, {source: given}, environment=environment,
                                    work_dir=tmp_path / "job", extra_env=JOB_ENV))
    assert result.inputs[source].startswith(str(tmp_path / "job" / "inputs"))  # the read-only copy
    out = result.outputs["output_dir"]
    meta = json.loads((out / "model_selector_args.json").read_text())
    assert meta["source"] == source
    assert meta["model_metadata"]["is_finetuned_model"] is True
    assert list(meta["model_metadata"]["id2label"].values()) == [str(d) for d in range(10)]


@pytest.mark.slow
@JOB_TIMEOUT
def test_finetune_job_multiclass_with_azure_s_defaults(mc_job, imported):
    out, mlflow = mc_job.outputs["output_dir_pytorch"], mc_job.outputs["output_dir_mlflow"]
    assert (out / "model.safetensors").is_file() and (mlflow / "MLmodel").is_file()
    assert list(out.glob("checkpoint-*"))
    # Azure's defaults reached the CLI: number_of_workers 8 (then capped at the CPUs here).
    assert "--number_of_workers 8" in mc_job.command and "--precision 32" in mc_job.command
    args = json.loads((out / "finetune_args.json").read_text())
    assert args["values"]["number_of_workers"] <= (os.cpu_count() or 1)
    # The job's MLflow variables: the environment's azureml-mlflow takes the azureml:// URI;
    # the workspace cannot be reached from here, so one warning line, no credential chain, and
    # the run goes on.
    env = mc_job.env[0]
    assert env["MLFLOW_TRACKING_URI"].startswith("azureml://") and env["MLFLOW_RUN_ID"]
    assert "RANK" in env and env["WORLD_SIZE"] == "1" and "LOCAL_WORLD_SIZE" not in env
    assert "metrics go to MLflow tracking at azureml://westeurope.api.azureml.ms" in mc_job.log
    failed = [line for line in mc_job.log.splitlines() if "MLflow tracking failed" in line]
    assert len(failed) == 1, mc_job.log
    assert "Attempted credentials" not in mc_job.log and "get_token failed" not in mc_job.log
    # The input model was read where it was mounted, read-only.
    assert mc_job.inputs["model_path"] != str(imported)


@pytest.mark.slow
@JOB_TIMEOUT
def test_azureml_image_paths_are_read_through_azureml_fsspec(environment, imported, data, tmp_path):
    """An MLTable as Azure's notebooks write it, with azureml:// image paths: the environment's
    azureml-fsspec reads them with the job's identity. None can be had here, so each image is a
    bad row with the store's reason in one line, and the job stops before training."""
    train, val, _ = data[MC]
    store = (f"azureml://subscriptions/{AJ.SUBSCRIPTION}/resourcegroups/{AJ.RESOURCE_GROUP}/"
             f"workspaces/{AJ.WORKSPACE}/datastores/workspaceblobstore/paths/fridge")
    remote = tmp_path / "remote"
    remote.mkdir()
    rows = [json.loads(line) for line in (train / "images.jsonl").read_text().splitlines()]
    (remote / "images.jsonl").write_text("".join(
        json.dumps({**row, "image_url": f"{store}/{row['image_url']}"}) + "\n" for row in rows))
    (remote / "MLTable").write_text((train / "MLTable").read_text())
    result = AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": remote, "validation_data": val,
                   "task_name": MC, **QUICK},
        environment=environment, work_dir=tmp_path / "job", extra_env=JOB_ENV, timeout=600)
    assert result.returncode != 0
    assert f"cannot read {store}/images/0000" in result.log, result.log
    assert "Traceback" not in result.log and "Attempted credentials" not in result.log, result.log
    assert "pip install azureml-fsspec" not in result.log  # the package is there and was used
    assert not (result.outputs["output_dir_pytorch"] / "model.safetensors").exists()


@pytest.mark.slow
@JOB_TIMEOUT
def test_finetune_job_multilabel(environment, imported, data, tmp_path):
    train, val, _ = data[ML]
    result = _ok(AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": train, "validation_data": val,
                   "task_name": ML, "number_of_workers": 0, "multilabel_threshold": 0.4, **QUICK},
        environment=environment, work_dir=tmp_path / "job", extra_env=JOB_ENV))
    out = result.outputs["output_dir_pytorch"]
    meta = json.loads((out / "model_selector_args.json").read_text())
    assert meta["model_metadata"]["finetuning_task"] == ML and meta["multilabel_threshold"] == 0.4
    assert (result.outputs["output_dir_mlflow"] / "MLmodel").is_file()
    assert "iou" in json.dumps(json.loads((out / "eval_results.json").read_text()))


@pytest.mark.slow
@JOB_TIMEOUT
def test_finetune_job_with_deepspeed_and_onnx_runtime(environment, imported, data, tmp_path):
    """apply_deepspeed and apply_ort in the component's own environment: DeepSpeed trains (its
    engine's checkpoints are in the output), and the ONNX export is validated and served."""
    train, val, _ = data[MC]
    result = _ok(AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": train, "validation_data": val,
                   "task_name": MC, "number_of_workers": 0, "apply_deepspeed": True,
                   "apply_ort": True, **QUICK},
        environment=environment, work_dir=tmp_path / "job", extra_env=JOB_ENV))
    out = result.outputs["output_dir_pytorch"]
    args = json.loads((out / "finetune_args.json").read_text())
    assert args["values"]["apply_deepspeed"] is True
    assert list(out.glob("checkpoint-*/global_step*"))  # DeepSpeed's own checkpoint layout
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "eval_results.json").is_file()
    mlmodel = yaml.safe_load((result.outputs["output_dir_mlflow"] / "MLmodel").read_text())
    assert mlmodel["metadata"]["inference_backend"] == "onnxruntime"


@pytest.mark.slow
@JOB_TIMEOUT
def test_finetune_job_on_two_instances_of_one_process(environment, imported, data, tmp_path):
    train, val, _ = data[MC]
    result = _ok(AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": train, "validation_data": val,
                   "task_name": MC, "number_of_workers": 0, **QUICK},
        environment=environment, work_dir=tmp_path / "job", instance_count=2,
        process_count_per_instance=1, extra_env=JOB_ENV))
    envs = result.env
    assert [(e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "0", "2"), ("1", "0", "1", "2")]
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and "LOCAL_WORLD_SIZE" not in e for e in envs)
    out = result.outputs["output_dir_pytorch"]
    assert _steps(out) == 4  # 60 rows, 8 per process x 2 processes: the data was split
    assert "pytorch model:" in result.logs[0] and "pytorch model:" not in result.logs[1]


@pytest.mark.slow
@JOB_TIMEOUT
def test_resume_from_checkpoint_on_the_previous_job_s_output(environment, imported, data, mc_job,
                                                             tmp_path):
    """The same outputs again (as when a job writes to the same datastore path), two epochs and
    resume_from_checkpoint true: training goes on from the first job's checkpoint."""
    train, val, _ = data[MC]
    first = mc_job.outputs["output_dir_pytorch"]
    steps = _steps(first)
    result = _ok(AJ.run_command_job(
        FINETUNE, {"model_path": imported, "training_data": train, "validation_data": val,
                   "task_name": MC, **{**QUICK, "number_of_epochs": 2},
                   "resume_from_checkpoint": True, "number_of_workers": 0},
        environment=environment, work_dir=tmp_path / "job", extra_env=JOB_ENV,
        preload_outputs=mc_job.outputs))
    assert re.search(r"resuming from \S*/checkpoint-%d\b" % steps, result.log), result.log[-3000:]
    assert _steps(result.outputs["output_dir_pytorch"]) == 2 * steps
    epochs = [json.loads(l).get("epoch") for l in
              (result.outputs["output_dir_pytorch"] / "metrics.jsonl").read_text().splitlines()]
    assert max(e for e in epochs if e is not None) == pytest.approx(2.0)


@pytest.mark.slow
@JOB_TIMEOUT
def test_pipeline_job_runs_job_by_job(environment, tiny_vit, data, tmp_path):
    train, val, test = data[MC]
    result = AJ.run_pipeline_job(PIPELINE, {
        "compute_model_import": "cpu-cluster", "compute_finetune": "cpu-cluster",
        "process_count_per_instance": 2, "model_name": str(tiny_vit), "training_data": train,
        "validation_data": val, "task_name": MC, "test_data": test, "number_of_workers": 0,
        **QUICK}, environment=environment, work_dir=tmp_path / "pipeline", extra_env=JOB_ENV)
    assert result.returncode == 0, result.why()
    assert list(result.jobs) == ["model_import", "finetune", "evaluate"]
    finetune = result.jobs["finetune"]
    assert "--save_total_limit 5" in finetune.command  # the pipeline's default
    assert [e["LOCAL_RANK"] for e in finetune.env] == ["0", "1"]
    assert (result.outputs["pytorch_model_folder"] / "model.safetensors").is_file()
    assert (result.outputs["mlflow_model_folder"] / "MLmodel").is_file()
    evaluate = result.jobs["evaluate"]
    assert "--batch_size 4" in evaluate.command  # test_batch_size
    report = evaluate.outputs["output_dir"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert "accuracy" in json.dumps(metrics)
    rows = (report / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == len((Path(test) / "images.jsonl").read_text().splitlines())
