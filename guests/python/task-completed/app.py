"""`task-completed` in Python: marks a stored task done.

Built with componentize-py by scripts/build-polyglot-guests.sh. The event's
data names the task, `{"id": ...}` (a non-empty string or a number). The
handler reads `task:{id}` from the tenant's state (stored by task-created);
if it is not there yet it answers `retry` (the task-created event may still
be on its way), otherwise it sets `"done": true`, writes the task back and
publishes `{"action":"completed",...}` to `task-audit`.

It reads before it writes, so it exercises the host's optimistic isolation:
a concurrent change to the task makes the host run it again with fresh reads.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, publisher, state
from wit_world.imports.types import (
    Disposition,
    Disposition_Drop,
    Disposition_Retry,
    Disposition_Success,
    Event,
)


class WitWorld(wit_world.WitWorld):
    def handle(self, event: Event) -> Disposition:
        try:
            task_id = parse_task_id(event.data)
        except ValueError as why:
            return Disposition_Drop(f"invalid completion: {why}")

        key = f"task:{task_id}"
        try:
            stored = state.get(key)
        except Err as why:
            return Disposition_Retry(f"state get {key}: {why.value}")
        if stored is None:
            # Not an error in the data: task-created may not have run yet.
            return Disposition_Retry(f"task {task_id} not found yet")

        try:
            task = json.loads(stored.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            task = None
        if not isinstance(task, dict):
            # Retrying cannot repair what is stored.
            return Disposition_Drop(f"stored {key} is not a JSON object")
        task["done"] = True

        try:
            state.set(key, to_json(task).encode())
        except Err as why:
            return Disposition_Retry(f"state set {key}: {why.value}")

        audit = to_json({"action": "completed", "task_id": task_id, "event_id": event.id})
        try:
            publisher.publish("task-audit", audit.encode(), "application/json")
        except Err as why:
            return Disposition_Retry(f"publish task-audit: {why.value}")

        log.write(log.Level.INFO, f"completed {key}")
        return Disposition_Success()


def parse_task_id(data: bytes) -> str:
    """The `id` of a JSON object: a non-empty string, or a number (as text)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    task_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(task_id, str) and task_id:
        return task_id
    if isinstance(task_id, (int, float)) and not isinstance(task_id, bool):
        return to_json(task_id)
    raise ValueError("missing `id` (a non-empty string or a number)")


def to_json(value) -> str:
    """Compact JSON with sorted keys, as serde_json writes it."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def reject_constant(name: str):
    """`NaN` and `Infinity` are not JSON, though Python's parser accepts them."""
    raise ValueError(f"{name} is not a JSON value")
