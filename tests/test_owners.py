"""One owner per concern: every environment switch is declared in ``visiontune.settings`` and
read through it; the task names and their check live in ``visiontune.tasks`` alone; a model
folder's record is named, read and written by ``visiontune.model_folder`` alone; a model ready to
predict is ``visiontune.inference``'s, a request's images ``visiontune.serving.payload``'s and the
apply_ort step ``visiontune.training.apply_ort``'s. No module imports itself back, and imports
are at the top of each module but where a named rule allows."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visiontune import settings
from visiontune.errors import UserError
from visiontune.tasks import MULTICLASS, MULTILABEL, check_task, task_of

SOURCE = Path(__file__).resolve().parents[1] / "src" / "visiontune"


def test_every_switch_in_the_source_is_declared_once():
    named = {name for path in SOURCE.rglob("*.py")
             for name in re.findall(r"\"(VISIONTUNE_[A-Z0-9_]+)\"", path.read_text(encoding="utf-8"))}
    assert named == set(settings.SETTINGS)


def test_no_module_reads_a_switch_past_the_settings():
    for path in SOURCE.rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        constants = re.findall(r"(?m)^(\w+) = \"VISIONTUNE_", text)  # names for a switch
        for name in ['"VISIONTUNE_', *constants]:
            assert not re.search(rf"os\.(environ\.get|environ\[|getenv)\(?{name}", text), (path, name)


def test_flags_numbers_and_texts_fall_back_to_their_declared_defaults(monkeypatch):
    monkeypatch.delenv("VISIONTUNE_TF32", raising=False)
    assert settings.flag("VISIONTUNE_TF32") is True
    for value, want in (("0", False), ("false", False), ("1", True), ("maybe", True)):
        monkeypatch.setenv("VISIONTUNE_TF32", value)
        assert settings.flag("VISIONTUNE_TF32") is want, value
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_MAX_GB", "2.5")
    assert settings.number("VISIONTUNE_IMAGE_CACHE_MAX_GB") == 2.5
    monkeypatch.setenv("VISIONTUNE_IMAGE_CACHE_MAX_GB", "lots")
    assert settings.number("VISIONTUNE_IMAGE_CACHE_MAX_GB") == 20.0
    monkeypatch.delenv("VISIONTUNE_CPU_BF16", raising=False)
    assert not settings.is_set("VISIONTUNE_CPU_BF16")
    assert settings.flag("VISIONTUNE_CPU_BF16", default=True) is True  # the code decides
    with pytest.raises(KeyError, match="not a declared setting"):
        settings.flag("VISIONTUNE_NOT_A_SWITCH")


def test_one_check_of_a_task_name_everywhere():
    from visiontune.data.split import stratified_split
    from visiontune.metrics import compute_metrics
    from visiontune.models.loading import load_for_finetune

    assert check_task(MULTILABEL) == MULTILABEL
    assert task_of("multi_label_classification") == MULTILABEL and task_of(None) == MULTICLASS
    for call in (lambda: check_task("segmentation"),
                 lambda: compute_metrics(None, None, "segmentation"),
                 lambda: load_for_finetune(".", ["a"], "segmentation"),
                 lambda: stratified_split([], 0.2, 0, "segmentation")):
        with pytest.raises(UserError, match="task_name: unknown task 'segmentation'"):
            call()


def test_the_model_folders_record_is_named_in_one_module():
    named = [path.name for path in SOURCE.rglob("*.py")
             if '"model_selector_args.json"' in path.read_text(encoding="utf-8")]
    assert named == ["model_folder.py"]


def test_the_record_reads_as_empty_when_absent_and_refuses_what_is_not_an_object(tmp_path):
    from visiontune.model_folder import METADATA_FILE, ModelFolder

    assert ModelFolder(tmp_path).metadata() == {}
    ModelFolder(tmp_path).write_metadata({"multilabel_threshold": 0.4})
    assert ModelFolder(tmp_path).metadata() == {"multilabel_threshold": 0.4}
    assert sorted(p.name for p in tmp_path.iterdir()) == [METADATA_FILE]  # no temporary left
    (tmp_path / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        ModelFolder(tmp_path).metadata()
    (tmp_path / METADATA_FILE).write_text("{broken")
    with pytest.raises(UserError, match="is not valid JSON"):
        ModelFolder(tmp_path).metadata()


# ---------------------------------------------------------------------------------------------
# Using a fine-tuned model; imports without a cycle
# ---------------------------------------------------------------------------------------------
# Where each part of using a model is defined, and nowhere else.
MODEL_USE_OWNERS = {
    "class ClassifierBase": "inference/classifier.py",
    "class Classifier": "inference/classifier.py",
    "def check_threshold": "inference/classifier.py",
    "class OnnxClassifier": "inference/onnx_runtime.py",
    "def find_export": "inference/onnx_runtime.py",
    "def open_model": "inference/scoring.py",
    "def score_images": "inference/scoring.py",
    "class PayloadError": "serving/payload.py",
    "def payload_bytes": "serving/payload.py",
    "def decode_payload_bytes": "serving/payload.py",
    "def export_metadata": "onnx_export.py",
    "def check_apply_ort": "training/apply_ort.py",
    "def export_and_validate": "training/apply_ort.py",
}
MODEL_USERS = ("visiontune.inference", "visiontune.serving", "visiontune.prediction",
               "visiontune.evaluation", "visiontune.onnx_export", "visiontune.training.apply_ort")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _load_time_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module that run when it is imported (all but the functions' bodies)."""
    nodes, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            pending.extend(ast.iter_child_nodes(node))
    return nodes


def _import_graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> the visiontune modules it imports: at load time (statements outside functions),
    or anywhere with ``lazy``. ``from a import b`` names ``a.b`` when that is a
    module, else ``a``; importing a submodule is not counted as importing its package."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = list(ast.walk(tree)) if lazy else _load_time_nodes(tree)
        named = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                named.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}: relative import"
                named.update(owner(f"{node.module}.{alias.name}") or owner(node.module)
                             for alias in node.names)
        graph[name] = {m for m in named if m and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated), or None."""
    done, path = set(), []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph.get(name, ())):
            found = visit(other)
            if found:
                return found
        path.pop()
        done.add(name)
        return None

    return next(filter(None, (visit(name) for name in sorted(graph))), None)


def test_each_part_of_using_a_model_is_defined_in_its_owner_alone():
    for definition, owner in MODEL_USE_OWNERS.items():
        pattern = re.compile(rf"(?m)^\s*{definition}\b[(:]")
        found = [str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
                 if pattern.search(path.read_text(encoding="utf-8"))]
        assert found == [owner], (definition, found)


def test_no_module_imports_itself_back_while_loading():
    graph = _import_graph(lazy=False)
    assert len(graph) > 50 and "visiontune.inference.scoring" in graph["visiontune.inference"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_modules_that_use_a_model_import_one_another_without_a_cycle_even_lazily():
    graph = _import_graph(lazy=True)
    users = {m for m in graph if m.startswith(MODEL_USERS)}
    assert {"visiontune.inference.onnx_runtime", "visiontune.serving.payload"} <= users
    among = {m: graph[m] & users for m in users}
    assert _cycle(among) is None, " -> ".join(_cycle(among))


# ---------------------------------------------------------------------------------------------
# Imports at the top of each module (docs/development.md)
# ---------------------------------------------------------------------------------------------
# An import inside a function is allowed only where one of these says why.
# 1. Command boundaries: each command loads its own modules when it runs.
COMMAND_BOUNDARIES = {
    "cli.py": "the CLI answers --help and bad input before a command loads torch",
    "api.py": "the commands as functions load what they run, as the CLI does",
    "__init__.py": "its lazy __getattr__ keeps `import visiontune` light",
}
# 2. Optional extras (pyproject's optional-dependencies; datasets only in the test and bench
#    extras): imported where they are used, which names what to install when they are missing.
OPTIONAL_PACKAGES = {"onnx", "onnxruntime", "onnxscript", "deepspeed", "azureml", "azure",
                     "s3fs", "adlfs", "gcsfs", "datasets"}
# 3. Light modules: imported where these packages must not load, they load them on use. A
#    visiontune module deferred there must load one of them itself.
LIGHT_MODULES = {
    "console.py": ({"transformers"}, "the CLI sets up its console before any command loads it"),
    "data/columnar.py": ({"pyarrow"}, "only Parquet and Arrow sources need it, not data check's others"),
    "data/images.py": ({"fsspec"}, "only azureml:// images need it, not data check or serving"),
    "data/storage.py": ({"fsspec"}, "only object-storage sources and images need it"),
    "inference/classifier.py": ({"torch", "transformers"},
                                "the inference package imports without torch (TORCH_FREE)"),
    "inference/onnx_runtime.py": ({"torch"}, "the same; its preprocessing runs on torch"),
    "inference/scoring.py": ({"torch"}, "the same"),
    "evaluation.py": ({"sklearn", "matplotlib"},
                      "the pipeline's ranks import it and train; rank 0 alone evaluates, after"),
    "training/finetune.py": ({"mlflow"}, "a training process loads MLflow only to save its model"),
    "training/tracking.py": ({"mlflow"}, "and to track a run, with MLFLOW_TRACKING_URI set"),
}
# What imports without torch: the CLI, config resolution, data check, the inference package
# (each of its modules) and serving's request decoding.
TORCH_FREE = ("visiontune", "visiontune.cli", "visiontune.config", "visiontune.data.check",
              "visiontune.inference", "visiontune.serving.payload")
HEAVY = {"torch", "transformers", "onnxruntime"}


def _local_imports() -> list[tuple[str, int, str]]:
    """(file relative to the package, line, module) of each import inside a function; a
    ``from a import b`` names ``a.b`` when that is a visiontune module."""
    modules = _modules()
    found = set()
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{path}: relative import"
                    names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                             else node.module for alias in node.names]
                else:
                    continue
                found.update((str(path.relative_to(SOURCE)), node.lineno, name) for name in names)
    return sorted(found)


def _loads_at_import() -> dict[str, set[str]]:
    """Module -> the top-level packages outside visiontune that importing it loads, through its
    own load-time imports, those of the visiontune modules they import and of their packages."""
    graph, modules = _import_graph(lazy=False), _modules()
    direct = {}
    for name, path in modules.items():
        nodes = _load_time_nodes(ast.parse(path.read_text(encoding="utf-8")))
        named = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        named |= {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        direct[name] = {n.split(".")[0] for n in named} - {"visiontune", "__future__"}

    def closure(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
                todo.extend(".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1))
        return set().union(*(direct.get(m, set()) for m in seen))

    return {name: closure(name) for name in modules}


def test_imports_are_at_the_top_of_each_module_but_where_a_rule_allows():
    loads = _loads_at_import()
    assert "torch" in loads["visiontune.models.loading"] and "torch" not in loads["visiontune.cli"]
    unexplained, used = [], {name: set() for name in LIGHT_MODULES}
    for file, line, name in _local_imports():
        top = name.split(".")[0]
        if file in COMMAND_BOUNDARIES or top in OPTIONAL_PACKAGES:
            continue
        deferred = LIGHT_MODULES.get(file, (set(),))[0]
        packages = loads[name] & deferred if top == "visiontune" else {top} & deferred
        if packages:
            used[file] |= packages
        else:
            unexplained.append(f"{file}:{line}: import {name}")
    assert not unexplained, "imports inside functions, allowed by no rule:\n" + "\n".join(unexplained)
    # Each light module defers what it declares, no more: the lists stay as small as the code.
    assert {file: LIGHT_MODULES[file][0] for file in used} == used


def test_each_module_that_uses_a_model_or_must_stay_light_loads_first_in_a_fresh_interpreter():
    """In a fresh interpreter each module comes first once, so a load-time cycle would fail one
    of them. What must import without torch does (the inference package and the request
    decoding leave torch and onnxruntime to the model), and each light module leaves the
    packages it defers unloaded."""
    light = {f"visiontune.{file[:-3].replace('/', '.')}": packages
             for file, (packages, _) in LIGHT_MODULES.items()}
    names = {name for name in _modules() if name.startswith(MODEL_USERS)} | set(TORCH_FREE) | set(light)
    check = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
             "loaded = set(json.loads(sys.argv[2])) & set(sys.modules); "
             "assert not loaded, f'loads {sorted(loaded)}'")
    runs = {}
    for name in sorted(names):
        torch_free = name in TORCH_FREE or name.startswith("visiontune.inference.")
        unloaded = sorted(light.get(name, set()) | (HEAVY if torch_free else set()))
        runs[name] = subprocess.Popen([sys.executable, "-c", check, name, json.dumps(unloaded)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
    failed = {name: seen[name][-1500:] for name, run in runs.items() if run.returncode}
    assert not failed, failed


def test_a_model_folder_opens_from_each_layout_a_user_may_pass(tiny_vit, tmp_path):
    from visiontune.model_folder import MLFLOW_MODEL_SUBDIR, MLMODEL_FILE, ModelFolder

    assert ModelFolder.open(tiny_vit, "--model").path == tiny_vit
    mlflow = tmp_path / "mlflow"
    shutil.copytree(tiny_vit, mlflow / MLFLOW_MODEL_SUBDIR)
    (mlflow / MLMODEL_FILE).write_text("flavors: {}\n")
    assert ModelFolder.open(mlflow, "--model").path == mlflow / MLFLOW_MODEL_SUBDIR
    empty = tmp_path / "empty"
    empty.mkdir()
    for given, said in [(tmp_path / "missing", "--model: folder not found"),
                        (mlflow / MLMODEL_FILE, "is a file; expected a model folder"),
                        (empty, "--model: no model in .*not a model folder .*; pass X")]:
        with pytest.raises(UserError, match=said):
            ModelFolder.open(given, "--model", "pass X")
    shutil.rmtree(mlflow / MLFLOW_MODEL_SUBDIR)
    with pytest.raises(UserError, match="--model: .* is an MLflow model folder, but .* holds no model"):
        ModelFolder.open(mlflow, "--model")


def test_a_record_update_keeps_the_other_fields(tmp_path):
    from visiontune.model_folder import ModelFolder

    folder = ModelFolder(tmp_path)
    folder.write_metadata({"model_name": "x", "multilabel_threshold": 0.5})
    folder.update_metadata(multilabel_threshold=[0.2, 0.7])
    assert folder.metadata() == {"model_name": "x", "multilabel_threshold": [0.2, 0.7]}
