"""Label Studio's webhook events, read and checked: what an event asks the loop to do.

Payloads (Label Studio 1.23, ``webhooks/models.py``): ANNOTATION_CREATED and ANNOTATION_UPDATED
carry ``annotation`` (with ``id``, ``result``, ``updated_at``) and its ``task`` (``id``, ``data``);
ANNOTATIONS_CREATED carries lists of both; ANNOTATIONS_DELETED carries ``annotations`` (ids only);
all carry ``project`` (``id``). START_TRAINING is Label Studio's "Start training" button.
TASKS_CREATED (an import) carries ``tasks``: the pool grows by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Label Studio actions that change what the model should learn or score; everything else is ignored
FEEDBACK_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                              "ANNOTATION_DELETED", "START_TRAINING", "TASKS_CREATED"})


class InvalidEvent(ValueError):
    """A payload that is not what its action promises."""


@dataclass
class LabelEvent:
    action: str
    kind: Literal["annotations", "deleted", "train", "tasks"]
    project: int | None
    annotations: list[tuple[dict, dict]] = field(default_factory=list)  # (annotation, its task)
    deleted: list[str] = field(default_factory=list)  # annotation ids
    tasks: list[int] = field(default_factory=list)  # ids of imported tasks

    def identity(self) -> str | None:
        """What makes two deliveries the same event (Label Studio retries, a webhook sent twice): the
        action and each annotation's id and ``updated_at``; None for START_TRAINING (every press counts)."""
        if self.kind == "train":
            return None
        if self.kind == "deleted":
            return f"{self.action}:{self.project}:{','.join(sorted(self.deleted))}"
        if self.kind == "tasks":
            return f"{self.action}:{self.project}:{','.join(map(str, sorted(self.tasks)))}"
        parts = sorted(f"{a['id']}@{a.get('updated_at') or a.get('created_at') or ''}" for a, _ in self.annotations)
        return f"{self.action}:{self.project}:{','.join(parts)}"


def _project(body: dict) -> int | None:
    project = body.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool):
        return None
    if isinstance(project, str) and "." in project:  # the ML backend protocol's uid: "<id>.<created>"
        project = project.split(".", 1)[0]
    try:
        return int(project)
    except (TypeError, ValueError):
        raise InvalidEvent(f"project {project!r} is not an id") from None


def _annotation(ann: object, task: object) -> tuple[dict, dict]:
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
        raise InvalidEvent("an annotation is an object with an integer `id`")
    if not isinstance(ann.get("result", []), list):
        raise InvalidEvent(f"annotation {ann['id']}: `result` is not a list")
    if isinstance(task, int):  # only the id: the loop fetches the task
        task = {"id": task}
    if not isinstance(task, dict) or not isinstance(task.get("id"), int):
        raise InvalidEvent(f"annotation {ann['id']}: no task with an integer `id`")
    if not isinstance(task.get("data", {}), dict):
        raise InvalidEvent(f"annotation {ann['id']}: the task's `data` is not an object")
    return ann, task


def _task_id(ann: object) -> object:
    return ann.get("task") if isinstance(ann, dict) else None


def parse_event(body: object) -> LabelEvent:
    """The event in a webhook body; InvalidEvent says what is wrong with it."""
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise InvalidEvent("a webhook payload is a JSON object with an `action`")
    action = body["action"]
    if action not in FEEDBACK_ACTIONS:
        raise InvalidEvent(f"action {action!r} is not one the loop acts on")
    project = _project(body)
    if action == "START_TRAINING":
        return LabelEvent(action, "train", project)
    if action == "TASKS_CREATED":
        items = body.get("tasks")
        if not isinstance(items, list) or not items or not all(isinstance(t, dict) and isinstance(t.get("id"), int)
                                                               and not isinstance(t["id"], bool) for t in items):
            raise InvalidEvent(f"{action}: `tasks` must list objects with an integer `id`")
        return LabelEvent(action, "tasks", project, tasks=[t["id"] for t in items])
    if action in ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED"):
        items = body.get("annotations", body.get("annotation"))
        items = items if isinstance(items, list) else [items]
        if not items or not all(isinstance(a, dict) and isinstance(a.get("id"), int) for a in items):
            raise InvalidEvent(f"{action}: `annotations` must list objects with an integer `id`")
        return LabelEvent(action, "deleted", project, deleted=[str(a["id"]) for a in items])
    anns, tasks = body.get("annotation"), body.get("task")
    if isinstance(anns, list):  # ANNOTATIONS_CREATED: lists, each annotation's task found by its id
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)} if isinstance(tasks, list) else {}
        pairs = [_annotation(a, by_id.get(_task_id(a), _task_id(a))) for a in anns]
    else:
        pairs = [_annotation(anns, tasks if tasks is not None else _task_id(anns))]
    if not pairs:
        raise InvalidEvent(f"{action}: no annotation")
    return LabelEvent(action, "annotations", project, annotations=pairs)
