"""Run an Azure ML component the way Azure ML runs a job, on this machine (for tests).

What a command job meets inside Azure ML, as far as one machine can show it:

- the command line built from the spec's ``command:``: ``${{inputs.x}}`` and ``${{outputs.y}}``
  replaced by values and paths, each ``$[[...]]`` part dropped when an input in it has no value,
  an input left unset taking its declared default (booleans as ``True``/``False``), run by bash;
- the component's ``code`` folder (a copy per node) as the working directory;
- a Python environment built from the component's own ``environment`` section only: a fresh
  virtual environment holding the ``pip`` dependencies of its ``conda_file``, nothing of the
  test's environment. It is built once and cached in a folder named by the hash of that section
  (``VISIONTUNE_AZURE_ENV_CACHE``, default ``~/.cache/visiontune/azure-envs``); a build that fails
  raises ``EnvironmentBuildFailed`` with pip's output;
- inputs read-only (``ro_mount``): copies on a tmpfs remounted read-only;
- each output its own tmpfs mount point (``rw_mount``): writable, but the folder itself cannot be
  removed or renamed, and ``os.replace`` from another filesystem fails (EXDEV). Their contents
  are copied out when the job ends. Mounting needs the permission to mount
  (``mount_unavailable()`` says why not);
- the job's variables: ``MLFLOW_TRACKING_URI=azureml://...``, ``MLFLOW_RUN_ID``, ``AZUREML_*``;
  for ``distribution: pytorch`` one process per rank (process_count_per_instance x
  instance_count) with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``,
  ``MASTER_PORT`` and ``NODE_RANK``; ``LOCAL_WORLD_SIZE`` is not set, as on Azure.

A pipeline component runs job by job (``run_pipeline_job``): each job's ``${{parent.inputs.x}}``
and ``${{parent.jobs.j.outputs.o}}`` bindings resolved, its distribution and resources read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import free_port

ENV_CACHE_VAR = "VISIONTUNE_AZURE_ENV_CACHE"
DEFAULT_ENV_CACHE = Path.home() / ".cache" / "visiontune" / "azure-envs"
PATH_TYPES = {"uri_folder", "uri_file", "mltable", "custom_model", "mlflow_model"}
TMPFS_SIZE = "4g"  # an upper bound; tmpfs uses the memory its files take
COMPLETE = ".complete"
SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE, REGION = (
    "00000000-0000-0000-0000-000000000000", "visiontune-rg", "visiontune-ws", "westeurope")


class EnvironmentBuildFailed(RuntimeError):
    """The component's environment could not be built; the message holds pip's output."""


class MountUnavailable(RuntimeError):
    """This machine does not let the test mount a tmpfs."""


class JobSpecError(ValueError):
    """The inputs do not fit the component (unknown input, required input missing)."""


# ---------------------------------------------------------------------------------------------
# Specs and the command line
# ---------------------------------------------------------------------------------------------
def load_spec(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def resolve_inputs(spec: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Every declared input's value: the given one, else its declared default, else None."""
    declared = spec.get("inputs") or {}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise JobSpecError(f"{spec.get('name')}: unknown input(s) {', '.join(unknown)}")
    values = {}
    for name, item in declared.items():
        value = given.get(name)
        if _unset(value) and "default" in item:
            value = item["default"]
        if _unset(value) and not item.get("optional", False):
            raise JobSpecError(f"{spec.get('name')}: required input {name!r} has no value")
        values[name] = value
    return values


def render_value(value: Any) -> str:
    """A value as Azure writes it into a command line."""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


_PLACEHOLDER = re.compile(r"\$\{\{(inputs|outputs)\.(\w+)\}\}")


def build_command(command: str, values: dict[str, Any], outputs: dict[str, str | Path]) -> str:
    """The command line of a job: optional parts with an unset input dropped, placeholders
    replaced. Whitespace is folded as YAML's ``>-`` already did."""

    def optional_part(match: re.Match) -> str:
        body = match.group(1)
        names = [n for kind, n in _PLACEHOLDER.findall(body) if kind == "inputs"]
        return "" if any(_unset(values.get(n)) for n in names) else body

    command = re.sub(r"\$\[\[(.*?)\]\]", optional_part, command, flags=re.S)

    def placeholder(match: re.Match) -> str:
        kind, name = match.groups()
        if kind == "outputs":
            return str(outputs[name])
        if _unset(values.get(name)):
            raise JobSpecError(f"input {name!r} is unset but used outside $[[...]]")
        return render_value(values[name])

    return " ".join(_PLACEHOLDER.sub(placeholder, command).split())


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
def _conda_file(spec: dict[str, Any], spec_dir: Path) -> dict[str, Any]:
    env = spec.get("environment")
    if not isinstance(env, dict) or "conda_file" not in env:
        raise EnvironmentBuildFailed(f"{spec.get('name')}: the environment is not an inline "
                                     "image + conda_file section; nothing to build it from")
    conda = env["conda_file"]
    if isinstance(conda, str):
        conda = yaml.safe_load((spec_dir / conda).read_text(encoding="utf-8"))
    return conda


def environment_requirements(spec: dict[str, Any], spec_dir: Path = Path(".")) -> tuple[str | None, list[str]]:
    """(the conda ``python=`` version, the pip requirements) of the spec's environment."""
    python, pip = None, []
    for dep in _conda_file(spec, spec_dir).get("dependencies") or []:
        if isinstance(dep, dict) and "pip" in dep:
            pip += [str(r) for r in dep["pip"]]
        elif isinstance(dep, str) and re.match(r"python\s*[=<>]", dep):
            python = re.sub(r"^python\s*=*\s*", "", dep)
    return python, pip


def environment_key(spec: dict[str, Any], spec_dir: Path = Path(".")) -> str:
    """The hash of the environment section, the conda file it names read in."""
    section = dict(spec["environment"])
    section["conda_file"] = _conda_file(spec, spec_dir)
    text = json.dumps(section, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def env_cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE_VAR) or DEFAULT_ENV_CACHE)


def build_environment(spec_path: str | Path, cache_root: Path | None = None,
                      timeout: float = 3600) -> Path:
    """The virtual environment of the component's ``environment`` section, built on first use
    (``python -m venv`` + ``pip install`` of the conda file's pip list) and reused while the
    section is unchanged. Raises EnvironmentBuildFailed with pip's output."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    python, requirements = environment_requirements(spec, spec_path.parent)
    if python and not f"{sys.version_info.major}.{sys.version_info.minor}".startswith(python.split("*")[0].rstrip(".")):
        raise EnvironmentBuildFailed(
            f"the environment asks for python {python}; this test runs Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, which the virtual environment "
            "would be built from")
    return build_venv(environment_key(spec, spec_path.parent), requirements,
                      f"environment section of {spec_path}:\n{yaml.safe_dump(spec['environment'])}",
                      cache_root, timeout)


def build_venv(key: str, requirements: list[str], description: str,
               cache_root: Path | None = None, timeout: float = 3600) -> Path:
    """A virtual environment holding ``requirements`` (pip arguments) and nothing else of this
    machine's packages, built once under ``key`` and reused. Raises EnvironmentBuildFailed with
    pip's output."""
    root = cache_root or env_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / key
    if (venv / COMPLETE).is_file():
        return venv
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if (venv / COMPLETE).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # an interrupted build
        log_path = root / f"{key}.build.log"
        with log_path.open("w") as log:
            log.write(f"{description}\n")
            log.flush()
            steps = [[sys.executable, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input",
                      *requirements]]
            for step in steps:
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                try:
                    proc = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT,
                                          timeout=timeout, env={**os.environ, "PYTHONNOUSERSITE": "1"})
                    code = proc.returncode
                except subprocess.TimeoutExpired:
                    code = f"timeout after {timeout:.0f} s"
                if code != 0:
                    log.close()
                    tail = log_path.read_text(errors="replace")[-6000:]
                    raise EnvironmentBuildFailed(
                        f"building the environment {key} failed ({code}) at "
                        f"`{' '.join(step[:4])} ...`; full log {log_path}; its end:\n{tail}")
        freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                                capture_output=True, text=True)
        (venv / "pip-freeze.txt").write_text(freeze.stdout)
        (venv / "environment.txt").write_text(description + "\n")
        (venv / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return venv


# ---------------------------------------------------------------------------------------------
# Mounts
# ---------------------------------------------------------------------------------------------
def _mount(args: list[str]) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountUnavailable(f"`mount {' '.join(args)}` failed: "
                               f"{(proc.stderr or proc.stdout).strip() or proc.returncode}")


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mount_tmpfs(path: Path, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0777", "tmpfs", str(path)])
    if read_only:
        _mount(["-o", "remount,ro", str(path)])


def mount_unavailable() -> str | None:
    """Why this machine cannot emulate Azure's mounts (None: it can)."""
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"visiontune-mount-probe-{os.getpid()}"
    try:
        mount_tmpfs(probe)
        (probe / "x").write_text("x")
        _mount(["-o", "remount,ro", str(probe)])
    except (MountUnavailable, OSError) as exc:
        return f"Azure's input/output mounts need `mount -t tmpfs`, not permitted here: {exc}"
    finally:
        _umount(probe)
        shutil.rmtree(probe, ignore_errors=True)
    return None


def _read_only_copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, symlinks=False)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for path in [target, *(target.rglob("*") if target.is_dir() else [])]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# ---------------------------------------------------------------------------------------------
# Command jobs
# ---------------------------------------------------------------------------------------------
@dataclass
class JobResult:
    name: str
    returncode: int
    command: str
    outputs: dict[str, Path]  # each output's contents, copied out of its mount
    logs: list[str]  # per process, in rank order
    env: list[dict[str, str]] = field(default_factory=list)  # per process
    inputs: dict[str, Any] = field(default_factory=dict)  # as the command received them

    @property
    def log(self) -> str:
        return "\n".join(self.logs)

    def why(self) -> str:
        return f"job {self.name} exited {self.returncode}; command:\n{self.command}\n" + "\n".join(
            f"--- process {i} (last lines) ---\n" + "\n".join(log.splitlines()[-40:])
            for i, log in enumerate(self.logs))


def job_variables(run_id: str, experiment: str) -> dict[str, str]:
    """What Azure ML sets in every job (placeholders for the workspace; no credentials)."""
    workspace = (f"subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
                 f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}")
    return {
        "MLFLOW_TRACKING_URI": f"azureml://{REGION}.api.azureml.ms/mlflow/v1.0/{workspace}",
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "AZUREML_RUN_ID": run_id,
        "AZUREML_ARM_SUBSCRIPTION": SUBSCRIPTION,
        "AZUREML_ARM_RESOURCEGROUP": RESOURCE_GROUP,
        "AZUREML_ARM_WORKSPACE_NAME": WORKSPACE,
        "AZUREML_ARM_PROJECT_NAME": experiment,
        "AZUREML_EXPERIMENT_ID": str(uuid.uuid5(uuid.NAMESPACE_URL, experiment)),
        "AZUREML_SERVICE_ENDPOINT": f"https://{REGION}.api.azureml.ms",
        "AZUREML_RUN_TOKEN_EXPIRY": str(int(time.time()) + 86400),
    }


def run_command_job(spec_path: str | Path, inputs: dict[str, Any], *, work_dir: Path,
                    environment: Path, instance_count: int = 1,
                    process_count_per_instance: int | None = None,
                    preload_outputs: dict[str, Path] | None = None,
                    extra_env: dict[str, str] | None = None, timeout: float = 900,
                    experiment: str = "visiontune-tests") -> JobResult:
    """Run one command component as an Azure ML job; see the module docstring.

    ``inputs``: values by input name (paths for the path types); unset ones take their default.
    ``preload_outputs``: an earlier job's output to find in an output folder (a job that writes
    to the same datastore path again). ``extra_env``: variables of the job's own ``environment_
    variables`` (e.g. OMP_NUM_THREADS)."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    if spec.get("type") != "command":
        raise JobSpecError(f"{spec_path.name} is a {spec.get('type')} component, not a command one")
    values = resolve_inputs(spec, {k: v for k, v in inputs.items() if v is not None})
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mounts: list[Path] = []
    procs: list[subprocess.Popen] = []
    try:
        # Inputs: read-only copies (ro_mount).
        input_root = work_dir / "inputs"
        mount_tmpfs(input_root)
        mounts.append(input_root)
        for name, item in spec.get("inputs", {}).items():
            value = values[name]
            if item["type"] in PATH_TYPES and not _unset(value):
                source = Path(str(value))
                if not source.exists():
                    raise JobSpecError(f"input {name}: {source} does not exist")
                target = input_root / name / source.name
                _read_only_copy(source, target)
                values[name] = str(target)
        _mount(["-o", "remount,ro", str(input_root)])

        # Outputs: one tmpfs mount point each (rw_mount), shared by every node.
        outputs = {}
        for name in spec.get("outputs", {}):
            path = work_dir / "outputs" / name
            mount_tmpfs(path)
            mounts.append(path)
            previous = (preload_outputs or {}).get(name)
            if previous is not None:
                shutil.copytree(previous, path, dirs_exist_ok=True)
            outputs[name] = path

        command = build_command(spec["command"], values, outputs)

        # Processes: one per rank for a pytorch distribution, else one.
        distributed = (spec.get("distribution") or {}).get("type") == "pytorch"
        per_node = (process_count_per_instance or (spec.get("distribution") or {}).get(
            "process_count_per_instance") or 1) if distributed else 1
        if not distributed and instance_count != 1:
            raise JobSpecError(f"{spec_path.name}: instance_count {instance_count} without a "
                               "distribution runs the command once per node; not emulated")
        world = per_node * instance_count
        run_id = f"{spec['name']}_{uuid.uuid4().hex[:10]}"
        home = work_dir / "home"
        home.mkdir(exist_ok=True)
        base_env = {
            "PATH": f"{environment / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "TMPDIR": str(_mkdir(work_dir / "tmp")), "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # nothing may reach a hub in tests
            **job_variables(run_id, experiment),
            "AZUREML_NODE_COUNT": str(instance_count),
            **(extra_env or {}),
        }
        port = free_port()
        code_src = (spec_path.parent / spec.get("code", ".")).resolve()
        envs, logs_paths = [], []
        for node in range(instance_count):
            code = work_dir / f"code-node{node}"  # each node has its own snapshot of the code
            shutil.copytree(code_src, code, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "*.pyc"), dirs_exist_ok=True)
            for local in range(per_node):
                env = dict(base_env)
                if distributed:
                    env.update(RANK=str(node * per_node + local), LOCAL_RANK=str(local),
                               WORLD_SIZE=str(world), NODE_RANK=str(node),
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                rank = node * per_node + local
                log_path = work_dir / f"process-{rank}.log"
                logs_paths.append(log_path)
                envs.append(env)
                procs.append(subprocess.Popen(
                    ["bash", "-c", command], cwd=code, env=env, stdout=log_path.open("w"),
                    stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(f"timeout after {timeout:.0f} s")
                break
        returncode = next((c for c in codes if c != 0), 0)
        if isinstance(returncode, str):
            returncode = 124
        logs = [p.read_text(errors="replace") for p in logs_paths]

        # The outputs' contents, copied out before the mounts go.
        kept = {}
        for name, path in outputs.items():
            dest = work_dir / "results" / name
            shutil.copytree(path, dest, symlinks=True)
            kept[name] = dest
        return JobResult(spec["name"], returncode, command, kept, logs, envs, values)
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the process group this job started
                except ProcessLookupError:
                    pass
                proc.wait()
        for path in reversed(mounts):
            _umount(path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Pipeline jobs
# ---------------------------------------------------------------------------------------------
@dataclass
class PipelineResult:
    jobs: dict[str, JobResult]
    outputs: dict[str, Path]

    @property
    def returncode(self) -> int:
        return next((j.returncode for j in self.jobs.values() if j.returncode), 0)

    def why(self) -> str:
        return "\n".join(j.why() for j in self.jobs.values() if j.returncode)


_BINDING = re.compile(r"\$\{\{parent\.(inputs|jobs)\.([\w.]+)\}\}")


def _bind(value: Any, inputs: dict[str, Any], job_outputs: dict[str, dict[str, Path]]) -> Any:
    if not isinstance(value, str):
        return value

    def lookup(kind: str, ref: str) -> Any:
        if kind == "inputs":
            return inputs[ref]
        job, _, output = ref.split(".")
        return job_outputs[job][output]

    whole = _BINDING.fullmatch(value)
    if whole:
        return lookup(*whole.groups())
    return _BINDING.sub(lambda m: render_value(lookup(*m.groups())), value)


def run_pipeline_job(spec_path: str | Path, inputs: dict[str, Any], *, work_dir: Path,
                     environment: Path, extra_env: dict[str, str] | None = None,
                     timeout: float = 900) -> PipelineResult:
    """Run a pipeline component job by job, each as ``run_command_job`` runs it."""
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    if spec.get("type") != "pipeline":
        raise JobSpecError(f"{spec_path.name} is not a pipeline component")
    values = resolve_inputs(spec, {k: v for k, v in inputs.items() if v is not None})
    job_outputs: dict[str, dict[str, Path]] = {}
    results: dict[str, JobResult] = {}
    pipeline_outputs: dict[str, Path] = {}
    for name, job in spec["jobs"].items():
        if job.get("type", "command") != "command":
            raise JobSpecError(f"job {name}: only command jobs are emulated")
        job_inputs = {k: _bind(v, values, job_outputs) for k, v in (job.get("inputs") or {}).items()}
        distribution = job.get("distribution") or {}
        resources = job.get("resources") or {}
        per_node = _bind(distribution.get("process_count_per_instance"), values, job_outputs)
        nodes = _bind(resources.get("instance_count", 1), values, job_outputs)
        result = run_command_job(
            spec_path.parent / job["component"], job_inputs, work_dir=Path(work_dir) / name,
            environment=environment, instance_count=int(nodes or 1),
            process_count_per_instance=int(per_node) if per_node not in (None, "") else None,
            extra_env=extra_env, timeout=timeout, experiment=spec["name"])
        results[name] = result
        if result.returncode:
            break
        job_outputs[name] = result.outputs
        for output, binding in (job.get("outputs") or {}).items():
            match = re.fullmatch(r"\$\{\{parent\.outputs\.(\w+)\}\}", str(binding))
            if match:
                pipeline_outputs[match.group(1)] = result.outputs[output]
    return PipelineResult(results, pipeline_outputs)
