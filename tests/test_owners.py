"""One owner per concern: every environment switch is declared in ``visiontune.settings`` and
read through it; the task names and their check live in ``visiontune.tasks`` alone; a model
folder's record is named, read and written by ``visiontune.model_folder`` alone."""

import re
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
    from visiontune.model_folder import METADATA_FILE, read_metadata, write_metadata

    assert read_metadata(tmp_path) == {}
    write_metadata(tmp_path, {"multilabel_threshold": 0.4})
    assert read_metadata(tmp_path) == {"multilabel_threshold": 0.4}
    assert sorted(p.name for p in tmp_path.iterdir()) == [METADATA_FILE]  # no temporary left
    (tmp_path / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{broken")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_metadata(tmp_path)
