"""The two tasks, named once: Azure's task names, each one's problem type in transformers, and
the one check of a task string."""

from __future__ import annotations

from visiontune.errors import UserError

MULTICLASS = "image-classification"
MULTILABEL = "image-classification-multilabel"
TASKS = (MULTICLASS, MULTILABEL)

# transformers' ``config.problem_type``, which chooses the loss: cross-entropy or BCE-with-logits
PROBLEM_TYPES = {MULTICLASS: "single_label_classification", MULTILABEL: "multi_label_classification"}


def check_task(task: str) -> str:
    """``task`` when it is one of TASKS; a UserError naming the input otherwise."""
    if task not in TASKS:
        raise UserError(f"task_name: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def task_of(problem_type: str | None) -> str:
    """The task of a model by its config's problem type (multi-class unless it says multi-label)."""
    return MULTILABEL if problem_type == PROBLEM_TYPES[MULTILABEL] else MULTICLASS
