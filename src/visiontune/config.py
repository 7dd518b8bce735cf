"""One frozen dataclass per command, generated from the input table, and the resolver that
fills it.

``inputs.py`` declares every input once (name, kind, default, allowed values); the CLI, the
``--config`` files, the Azure ML component specs and the docs tables are built from that table,
and so are the configs here: ``FinetuneConfig`` has one typed field per row of
``FINETUNE_INPUTS``, with the row's default (the row itself is in the field's metadata under
``"input"``). Library code takes a config and reads it by attribute (``cfg.learning_rate``), so
a misspelt name fails at its first use, and never changes it: a step that decides a value (the
defaults chain, the worker count, an alignment of inputs) returns a new config with
``cfg.chosen(why, name=value)``.

Where an input goes: find its row in ``inputs.py``, then search the source for ``.<name>``
(every use is an attribute access on a config; ``training/arguments.py`` maps the training
inputs onto ``TrainingArguments``). Where a value came from: ``cfg.source(name)`` is one of
``command line``, ``config file``, ``keyword`` (the Python API), ``default`` (the declared
default) or ``auto`` (chosen after resolving; ``cfg.chosen_by(name)`` says by what: a layer of
the defaults chain such as ``task image-classification``, or the step's reason). Provenance
takes no part in equality.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Optional

from visiontune import inputs as I
from visiontune.errors import UserError

COMMAND_LINE, CONFIG_FILE, KEYWORD, DEFAULT, AUTO = (
    "command line", "config file", "keyword", "default", "auto")
GIVEN = frozenset({COMMAND_LINE, CONFIG_FILE, KEYWORD})  # what the user gave, by any route

# The Python type of each kind of input (paths are strings, as the command line gives them).
PYTHON_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "folder": str,
                "mltable": str, "file": str}


class Config:
    """Base of the generated configs: provenance and the inputs in the table's order."""

    INPUTS: ClassVar[tuple[I.Input, ...]] = ()
    _provenance: dict[str, tuple[str, str | None]]

    def __post_init__(self) -> None:
        # Built directly rather than by ``resolve``: a value other than the default was given.
        recorded = self._provenance
        missing = {spec.name: (DEFAULT if _same(getattr(self, spec.name), spec.default) else KEYWORD, None)
                   for spec in self.INPUTS if spec.name not in recorded}
        if missing:
            object.__setattr__(self, "_provenance", {**recorded, **missing})

    def source(self, name: str) -> str:
        """Where the value of ``name`` came from: command line, config file, keyword, default
        or auto."""
        return self._where(name)[0]

    def chosen_by(self, name: str) -> str | None:
        """What chose an ``auto`` value (a defaults-chain layer or a step's reason); None for
        a value given or declared."""
        return self._where(name)[1]

    def given(self, name: str) -> bool:
        return self.source(name) in GIVEN

    def chosen(self, why: str, **changes: Any) -> "Config":
        """A copy with ``changes``, each recorded as chosen (``auto``) by ``why``."""
        provenance = {**self._provenance, **{name: (AUTO, why) for name in changes}}
        return dataclasses.replace(self, **changes, _provenance=provenance)

    def as_dict(self) -> dict[str, Any]:
        """The values by input name, in the table's order."""
        return {spec.name: getattr(self, spec.name) for spec in self.INPUTS}

    def _where(self, name: str) -> tuple[str, str | None]:
        if name not in self._provenance:
            raise AttributeError(f"{type(self).__name__} has no input {name!r}")
        return self._provenance[name]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def field_type(spec: I.Input) -> Any:
    """The field's annotation: the kind's type, Optional where the value may be left unset."""
    kind = PYTHON_TYPES[spec.kind]
    return kind if spec.required or spec.default is not None else Optional[kind]


def _make(name: str, table: tuple[I.Input, ...], doc: str) -> type:
    fields: list[tuple[str, Any, Any]] = []
    for spec in table:
        meta = {"input": spec}
        fields.append((spec.name, field_type(spec),
                       dataclasses.field(metadata=meta) if spec.required
                       else dataclasses.field(default=spec.default, metadata=meta)))
    fields.append(("_provenance", dict, dataclasses.field(default_factory=dict, compare=False,
                                                          repr=False)))
    cls = dataclasses.make_dataclass(name, fields, bases=(Config,), frozen=True, kw_only=True,
                                     namespace={"INPUTS": table, "__doc__": doc})
    cls.__module__ = __name__
    return cls


ImportConfig = _make("ImportConfig", I.IMPORT_INPUTS, "The inputs of ``import-model``.")
FinetuneConfig = _make("FinetuneConfig", I.FINETUNE_INPUTS, "The inputs of ``finetune``.")
PipelineConfig = _make("PipelineConfig", I.PIPELINE_INPUTS, "The inputs of ``pipeline``.")
EvaluateConfig = _make("EvaluateConfig", I.EVALUATE_INPUTS, "The inputs of ``evaluate``.")
PredictConfig = _make("PredictConfig", I.PREDICT_INPUTS, "The inputs of ``predict``.")
ExportOnnxConfig = _make("ExportOnnxConfig", I.EXPORT_ONNX_INPUTS, "The inputs of ``export-onnx``.")
DataCheckConfig = _make("DataCheckConfig", I.DATA_CHECK_INPUTS, "The inputs of ``data check``.")
DemoConfig = _make("DemoConfig", I.DEMO_INPUTS, "The inputs of ``demo-data``.")

CONFIGS: tuple[type, ...] = (ImportConfig, FinetuneConfig, PipelineConfig, EvaluateConfig,
                             PredictConfig, ExportOnnxConfig, DataCheckConfig, DemoConfig)
_BY_TABLE = {cls.INPUTS: cls for cls in CONFIGS}


def config_class(table: Iterable[I.Input]) -> type:
    """The config of a command's input table (``inputs.FINETUNE_INPUTS`` -> FinetuneConfig)."""
    try:
        return _BY_TABLE[tuple(table)]
    except KeyError:
        raise ValueError("not the input table of a command") from None


def input_fields(cls_or_config: Any) -> tuple[dataclasses.Field, ...]:
    """The fields that are inputs (every field but the provenance), in the table's order."""
    return tuple(f for f in dataclasses.fields(cls_or_config) if "input" in f.metadata)


def resolve(
    target: type | Iterable[I.Input], given: dict[str, Any], config: dict[str, Any] | None = None,
    config_name: str = "--config", *, given_as: str = COMMAND_LINE,
):
    """Merge ``given`` > the config file's mapping > the declared defaults into the config of
    ``target`` (a config class or a command's input table); every value converted and checked.

    Values left ``None`` are "not given"; ``auto`` inputs are filled in later by the defaults
    chain. Empty strings count as not given (Azure passes optional inputs that way).
    ``given_as``: the source recorded for the values of ``given``."""
    cls = target if isinstance(target, type) else config_class(target)
    specs = I.by_name(cls.INPUTS)
    config = dict(config or {})
    unknown = sorted(set(config) - set(specs))
    if unknown:
        raise UserError(
            f"{config_name}: unknown input(s) {', '.join(unknown)}; known inputs: "
            + ", ".join(specs)
        )
    values: dict[str, Any] = {}
    provenance: dict[str, tuple[str, str | None]] = {}
    for name, spec in specs.items():
        raw = given.get(name, config.get(name))
        if isinstance(raw, str) and raw.strip() == "":
            raw = None
        value = spec.convert(raw) if raw is not None else spec.default
        if spec.required and value is None:
            raise UserError(f"--{name} is required: {spec.help}")
        values[name] = value
        where = DEFAULT if raw is None else given_as if name in given else CONFIG_FILE
        provenance[name] = (where, None)
    return cls(**values, _provenance=provenance)


def config_from(cls: type, other: Config, why: str, **changes: Any):
    """A ``cls`` config from another command's: the inputs both have, with their provenance,
    and ``changes`` chosen by ``why`` (the pipeline's finetune and evaluation steps)."""
    names = {f.name for f in input_fields(cls)}
    values = {name: value for name, value in other.as_dict().items() if name in names}
    provenance = {name: other._where(name) for name in values}
    values.update(changes)
    provenance.update({name: (AUTO, why) for name in changes})
    return cls(**values, _provenance=provenance)
