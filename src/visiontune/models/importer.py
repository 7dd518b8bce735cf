"""The model import component: one model in, one Hugging Face model folder out.

Sources (Azure semantics: a folder input wins over ``model_name``):
- ``model_name``: a built-in name (``efficientnet-lite0``), a local Hugging Face model folder,
  or a hub id (downloaded when the hub is reachable);
- ``pytorch_model``: a folder from an earlier fine-tune or import (continual fine-tuning);
- ``mlflow_model``: an MLflow model folder; the Hugging Face model inside it is used.

The output folder holds the model at its top level (config.json, weights as safetensors,
preprocessor_config.json), so ``from_pretrained(output_dir)`` works directly, and
``model_selector_args.json`` describing where it came from. It is assembled in a staging
folder inside ``output_dir`` (``outputs.staged``: the folder may be a mount point) and moved in
with the metadata file last, so an import that fails never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
import torch
import yaml
from huggingface_hub.errors import (
    GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
from transformers.utils import logging as hf_logging

from visiontune import __version__
from visiontune.errors import UserError, first_line
from visiontune.model_folder import METADATA_FILE, ModelFolder, shallowest_first, under_checkpoint
from visiontune.models.builtin import BUILTIN_MODELS, PROCESSOR_FILE, write_timm_processor_config
from visiontune.models.loading import checkpoint_labels, load_config, load_image_processor
from visiontune.outputs import LOCK_FILE, check_folder, staged
from visiontune.tasks import PROBLEM_TYPES, task_of

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files besides config and weights that travel with a model (model_defaults.json feeds the
# training defaults chain).
EXTRA_FILES = (PROCESSOR_FILE, "model_defaults.json")
_WRITTEN = (CONFIG_FILE, SAFE_WEIGHTS, SAFE_INDEX, METADATA_FILE, *EXTRA_FILES)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def _mlmodel_metadata(mlflow_dir: Path) -> dict:
    try:
        data = yaml.safe_load((mlflow_dir / "MLmodel").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"--mlflow_model: cannot read {mlflow_dir / 'MLmodel'}: {exc}") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------
# Finding the Hugging Face model in a folder
# ---------------------------------------------------------------------------------------------
def _is_model_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architecture" in data)


def _find_model_folder(root: Path, option: str) -> Path:
    """The folder under ``root`` holding the model's config.json: ``root`` itself, the folder
    named by an earlier import's metadata, or the one shallowest folder that has one
    (``checkpoint-*`` folders only when nothing else has a model)."""
    if (root / CONFIG_FILE).is_file():
        if not _is_model_config(root / CONFIG_FILE):
            raise UserError(f"{option}: {root / CONFIG_FILE} is not a Hugging Face model config")
        return root
    sub = ModelFolder(root).metadata().get("pytorch_model_path")
    if isinstance(sub, str) and sub not in ("", ".") and (root / sub / CONFIG_FILE).is_file():
        return root / sub
    found = shallowest_first((p.parent for p in root.rglob(CONFIG_FILE) if _is_model_config(p)), root)
    final = [p for p in found if not under_checkpoint(p, root)]
    if final:
        found = final
    elif found:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise UserError(
            f"{option}: {root} has no final model, only training checkpoints ({names}); "
            "pass the checkpoint folder you want"
        )
    if not found:
        raise UserError(
            f"{option}: no Hugging Face model in {root} (no config.json); expected a folder "
            "written by save_pretrained or by visiontune"
        )
    depth = len(found[0].relative_to(root).parts)
    same_depth = [p for p in found if len(p.relative_to(root).parts) == depth]
    if len(same_depth) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in same_depth)
        raise UserError(f"{option}: {root} holds several models ({names}); pass the one to import")
    return found[0]


def _find_processor(model_dir: Path, root: Path) -> Path | None:
    """preprocessor_config.json beside the model, else the shallowest one under ``root``
    (MLflow keeps it apart, under components/image_processor)."""
    if (model_dir / PROCESSOR_FILE).is_file():
        return model_dir / PROCESSOR_FILE
    found = shallowest_first(root.rglob(PROCESSOR_FILE), root)
    found = [p for p in found if not under_checkpoint(p, root)] or found
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Copying a model folder
# ---------------------------------------------------------------------------------------------
def _bin_to_safetensors(files: list[Path], target: Path) -> None:
    """Merge pytorch_model*.bin into one model.safetensors (safetensors cannot load code)."""
    tensors: dict[str, Any] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickles that are not plain tensors are refused here
            raise UserError(f"cannot read weights {file}: {first_line(exc)}") from None
        tensors.update(state.get("state_dict", state) if isinstance(state, dict) else {})
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        if not hasattr(tensor, "data_ptr"):
            continue
        tensor = tensor.contiguous()
        # Shared storage (tied weights) cannot be written twice by save_file: copy it.
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    if not out:
        raise UserError(f"no tensors in {', '.join(str(f) for f in files)}")
    save_file(out, str(target), metadata={"format": "pt"})


def _index_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{index} is not a valid weights index") from None
    return sorted(set(weight_map.values()))


def _copy_weights(src: Path, dst: Path, option: str) -> None:
    if (src / SAFE_WEIGHTS).is_file():
        shutil.copy2(src / SAFE_WEIGHTS, dst / SAFE_WEIGHTS)
    elif (src / SAFE_INDEX).is_file():
        shutil.copy2(src / SAFE_INDEX, dst / SAFE_INDEX)
        for name in _index_files(src / SAFE_INDEX):
            if not (src / name).is_file():
                raise UserError(f"{option}: weights shard {src / name} is missing")
            shutil.copy2(src / name, dst / name)
    elif (src / BIN_WEIGHTS).is_file():
        log.info("converting %s to %s", BIN_WEIGHTS, SAFE_WEIGHTS)
        _bin_to_safetensors([src / BIN_WEIGHTS], dst / SAFE_WEIGHTS)
    elif (src / BIN_INDEX).is_file():
        log.info("converting sharded %s to one %s", BIN_WEIGHTS, SAFE_WEIGHTS)
        _bin_to_safetensors([src / n for n in _index_files(src / BIN_INDEX)], dst / SAFE_WEIGHTS)
    else:
        raise UserError(
            f"{option}: no PyTorch weights in {src} (expected {SAFE_WEIGHTS} or {BIN_WEIGHTS})"
        )


def _copy_model_folder(model_dir: Path, root: Path, dst: Path, option: str) -> None:
    """Copy config, weights, image processor and defaults of a Hugging Face folder into ``dst``."""
    config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    is_timm = "pretrained_cfg" in config
    names = config.get("label_names")
    if is_timm and isinstance(names, list) and config.get("num_classes") not in (None, len(names)):
        # A fine-tune that set new labels without updating label_names saves a stale list.
        log.warning("%s: config.json lists %d label_names for %d classes; transformers will call "
                    "the classes LABEL_0, LABEL_1, ...", option, len(names), config["num_classes"])
    model_args = config.get("model_args")
    if is_timm and isinstance(model_args, dict) and "num_classes" in model_args:
        # timm's save_for_hf writes it; the wrapper passes num_classes itself and then fails.
        log.info("dropping model_args.num_classes from the timm config (num_labels is used)")
        config["model_args"] = {k: v for k, v in model_args.items() if k != "num_classes"} or None
        (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    else:
        shutil.copy2(model_dir / CONFIG_FILE, dst / CONFIG_FILE)
    _copy_weights(model_dir, dst, option)
    if (model_dir / "model_defaults.json").is_file():
        shutil.copy2(model_dir / "model_defaults.json", dst / "model_defaults.json")
    if is_timm:
        # transformers reads a timm folder's preprocessing from config.json; keep the two equal.
        write_timm_processor_config(dst)
        return
    processor = _find_processor(model_dir, root)
    if processor is None:
        raise UserError(
            f"{option}: no image processor in {root} ({PROCESSOR_FILE}); save it beside the model "
            "with image_processor.save_pretrained(folder)"
        )
    shutil.copy2(processor, dst / PROCESSOR_FILE)


def _check_config(model_dir: Path, option: str) -> None:
    """Refuse what transformers cannot load as an image classifier, before copying anything."""
    try:
        config = load_config(model_dir)
    except UserError as exc:
        raise UserError(f"{option}: {exc}") from None
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise UserError(
            f"{option}: model type {config.model_type!r} is not an image-classification model "
            "transformers can fine-tune"
        )
    if config.model_type == "timm_wrapper":
        if not timm.is_model(config.architecture):
            raise UserError(
                f"{option}: timm {timm.__version__} does not know the architecture {config.architecture!r}"
            )


def _check_weights(model_dir: Path, option: str) -> None:
    """Refuse safetensors weights that are damaged or cut short (their header must describe
    the whole file), before copying them. Reads the headers only."""
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{option}: {path} cannot be read as weights ({first_line(exc)})") from None


def _check_processor(folder: Path, option: str) -> None:
    try:
        load_image_processor(folder)
    except UserError as exc:
        raise UserError(f"{option}: {exc}") from None


@contextmanager
def _quiet_transformers():
    """Keep transformers' notices and progress bars out of the component's output; what matters
    is reported by our own log lines or as a UserError."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------------------------
def _offline_hint(model_id: str) -> str:
    return (
        f"--model_name: cannot download {model_id!r}: the Hugging Face hub is unreachable "
        "(offline or HF_HUB_OFFLINE=1); download the model where the hub is reachable and pass "
        "its folder as --model_name /path/to/folder or --pytorch_model /path/to/folder "
        "(or use the built-in --model_name efficientnet-lite0)"
    )


def _download_from_hub(model_id: str) -> Path:
    """Download config, processor and weights of ``model_id``; the path of the snapshot."""
    try:
        path = Path(huggingface_hub.snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(huggingface_hub.snapshot_download(model_id, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except GatedRepoError:
        raise UserError(
            f"--model_name: {model_id!r} is gated on the Hugging Face hub; accept its terms and "
            "log in (HF_TOKEN), or pass a downloaded folder"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"--model_name: {model_id!r} is not present in the Hugging Face model repository "
            "(nor a local folder or a built-in model)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"--model_name: {model_id!r}: revision not found on the hub") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(_offline_hint(model_id)) from None
    except Exception as exc:  # network stack errors vary (httpx, requests, OSError)
        name = type(exc).__name__
        if any(w in name for w in ("Connect", "Timeout", "Network", "Offline")) or isinstance(exc, OSError):
            raise UserError(_offline_hint(model_id)) from None
        raise UserError(f"--model_name: cannot download {model_id!r} from the hub: {name}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return path


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
        or os.path.isabs(name)
    )


# ---------------------------------------------------------------------------------------------
# import_model
# ---------------------------------------------------------------------------------------------
def _folder(value: str | Path, option: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise UserError(f"{option}: folder not found: {value}")
    if not path.is_dir():
        raise UserError(f"{option}: {value} is a file; expected a folder")
    return path.resolve()


def _source_metadata(root: Path, model_dir: Path) -> dict:
    """What an earlier import, fine-tune or MLflow model says about itself, flattened."""
    out: dict[str, Any] = {}
    for folder in (root, model_dir):
        meta = ModelFolder(folder).metadata()
        if meta:
            out.update({k: v for k, v in (meta.get("model_metadata") or {}).items() if v is not None})
            if meta.get("model_name"):
                out.setdefault("model_name", meta["model_name"])
    if (root / "MLmodel").is_file():
        out.update({k: v for k, v in _mlmodel_metadata(root).items() if v is not None})
    return out


def _trained_here(root: Path, model_dir: Path) -> bool:
    """Files that only a training run leaves behind."""
    marks = ("trainer_state.json", "training_args.bin", "training_args.json")
    return any((d / m).exists() for d in (root, model_dir) for m in marks) or any(root.glob("checkpoint-*"))


def _earlier_import(folder: Path) -> bool:
    """Only an earlier import may be replaced: never a folder we did not write."""
    names = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
    return (folder / METADATA_FILE).is_file() and all(
        (folder / n).is_file()
        and (n in _WRITTEN or re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)) for n in names)


def _prepare_output(output_dir: Path, sources: list[Path]) -> None:
    for src in sources:
        if output_dir == src or src in output_dir.parents:
            raise UserError(f"--output_dir: {output_dir} must not be the input folder or inside it")
    check_folder(output_dir, "output_dir", replaceable=_earlier_import, create=False)


def import_model(*, model_name: str | None = None, pytorch_model: str | Path | None = None,
                 mlflow_model: str | Path | None = None, output_dir: str | Path) -> Path:
    """Import one model into ``output_dir`` and return that folder. See the module docstring."""
    model_name = str(model_name).strip() if model_name not in (None, "") else None
    pytorch_model = pytorch_model if pytorch_model not in (None, "") else None
    mlflow_model = mlflow_model if mlflow_model not in (None, "") else None
    if pytorch_model is not None and mlflow_model is not None:
        raise UserError("give either --pytorch_model or --mlflow_model, not both")
    if model_name is None and pytorch_model is None and mlflow_model is None:
        raise UserError(
            "no model given: pass --model_name (hub id, local folder or efficientnet-lite0), "
            "--pytorch_model DIR or --mlflow_model DIR"
        )
    if output_dir in (None, ""):
        raise UserError("--output_dir is required")
    output_dir = Path(str(output_dir)).expanduser().resolve()
    _prepare_output(output_dir, [])  # before a download that could not be used

    if pytorch_model is not None or mlflow_model is not None:
        option = "--pytorch_model" if pytorch_model is not None else "--mlflow_model"
        if model_name is not None:
            log.info("%s is given, so it is imported; --model_name %s is kept as the model's name",
                     option, model_name)
    elif model_name.lower() in BUILTIN_MODELS:
        option = "builtin"
    else:
        option = "--model_name"

    # Check every input before anything is written.
    if option == "builtin":
        source, root, model_dir = "builtin", None, None
    else:
        source, root = _resolve_source(model_name, pytorch_model, mlflow_model, option)
        model_dir = _find_model_folder(root, option)
        with _quiet_transformers():
            _check_config(model_dir, option)
        _check_weights(model_dir, option)
    _prepare_output(output_dir, [root] if root is not None and source != "hub" else [])

    # Assembled inside output_dir (which may be a mount point) and moved into place there.
    with staged(output_dir, complete_marker=METADATA_FILE) as tmp:
        with _quiet_transformers():
            if source == "builtin":
                metadata = _assemble_builtin(model_name.lower(), tmp)
            else:
                metadata = _assemble(model_name, source, root, model_dir, tmp, option)
        ModelFolder(tmp).write_metadata(metadata)
        for path in tmp.iterdir():  # save_pretrained writes 0600 files; make them readable
            path.chmod(0o644)
    log.info("imported %s (%s) into %s", metadata["model_name"], source, output_dir)
    return output_dir


def _assemble_builtin(key: str, tmp: Path) -> dict:
    BUILTIN_MODELS[key](tmp)
    _check_config(tmp, "--model_name")
    _check_processor(tmp, "--model_name")
    return _metadata(
        model_name=key, source="builtin", source_path=key,
        base_model_name=key, source_meta={}, finetuned=False, config_dir=tmp,
    )


def _assemble(model_name: str | None, source: str, root: Path, model_dir: Path, tmp: Path,
              option: str) -> dict:
    _copy_model_folder(model_dir, root, tmp, option)
    _check_config(tmp, option)  # the copy, as finetune will read it
    _check_processor(tmp, option)
    meta = _source_metadata(root, model_dir)
    finetuned = meta.get("is_finetuned_model")
    if isinstance(finetuned, str):  # MLmodel metadata written by hand or by other tools
        finetuned = finetuned.strip().lower() in ("true", "1", "yes")
    if finetuned is not True:
        # A copied metadata file can lag behind: training leftovers and a known task also count.
        finetuned = bool(meta.get("finetuning_task")) or _trained_here(root, model_dir) or (
            source in ("pytorch_model", "mlflow_model") and finetuned is None
        )
    # A hub snapshot folder is named by its commit: the id names the model better.
    fallback = model_name if source == "hub" else root.name
    base = meta.get("base_model_name") or meta.get("model_name") or fallback
    return _metadata(
        model_name=model_name or meta.get("model_name") or base, source=source,
        source_path=model_name if source == "hub" else str(root),
        base_model_name=base, source_meta=meta, finetuned=finetuned, config_dir=tmp,
    )


def _resolve_source(model_name, pytorch_model, mlflow_model, option) -> tuple[str, Path]:
    if pytorch_model is not None:
        return "pytorch_model", _folder(pytorch_model, option)
    if mlflow_model is not None:
        root = _folder(mlflow_model, option)
        if not (root / "MLmodel").is_file():
            raise UserError(f"--mlflow_model: {root} has no MLmodel file; is it an MLflow model folder?")
        return "mlflow_model", root
    local = Path(model_name).expanduser()
    if local.is_dir():
        return "local_folder", local.resolve()
    if local.exists():
        raise UserError(f"--model_name: {model_name} is a file; expected a model folder or a hub id")
    if _looks_like_path(model_name):
        raise UserError(f"--model_name: folder not found: {model_name}")
    if not _HUB_ID.match(model_name) or ".." in model_name:
        raise UserError(
            f"--model_name: {model_name!r} is neither a folder nor a Hugging Face hub id "
            f"(like google/vit-base-patch16-224) nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    return "hub", _download_from_hub(model_name)


def _metadata(*, model_name, source, source_path, base_model_name, source_meta, finetuned,
              config_dir) -> dict:
    model_metadata: dict[str, Any] = {
        "base_model_name": base_model_name,
        "finetuning_task": None,
        "id2label": None,
        "is_finetuned_model": bool(finetuned),
    }
    if finetuned:
        config = load_config(config_dir)
        labels = checkpoint_labels(config)
        model_metadata["id2label"] = {str(i): name for i, name in enumerate(labels)}
        problem_type = getattr(config, "problem_type", None)
        model_metadata["finetuning_task"] = source_meta.get("finetuning_task") or (
            task_of(problem_type) if problem_type in PROBLEM_TYPES.values() else None)
    return {
        "model_name": model_name,
        "source": source,
        "source_path": source_path,
        "pytorch_model_path": ".",
        "mlflow_model_path": None,
        "model_metadata": model_metadata,
        "visiontune_version": __version__,
    }
