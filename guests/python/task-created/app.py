"""`task-created` in Python: the todo app's handler for new tasks.

A port of guests/task-created (Rust), built with componentize-py by
scripts/build-polyglot-guests.sh. It validates the task JSON, stores it under
`task:{id}` in the tenant's state and publishes a `task-audit` event. Like
the Rust handler it keeps no idempotency record: the host runs it at most
once per event id and applies its effects only when it answers `success`.

One addition for tests: a task titled exactly "raise" makes it raise an
uncaught exception after its state write. componentize-py prints the
traceback to stderr and traps, so the host discards the write, retries the
event, and its trap reason carries the Python traceback.

The `wit_world` package is generated from wit/ at build time (never
committed); `componentize-py -d wit -w handler bindings DIR` writes a copy
for an editor.
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
            task_id, task_json, title = parse_task(event.data)
        except ValueError as why:
            # Bad data never gets better by retrying.
            return Disposition_Drop(f"invalid task: {why}")

        key = f"task:{task_id}"
        try:
            state.set(key, task_json.encode())
        except Err as why:
            return Disposition_Retry(f"state set {key}: {why.value}")

        if title == "raise":
            # Deliberately uncaught (test fixture): a trap half-way through
            # the attempt, after a buffered write the host must discard.
            raise RuntimeError("task-created: title 'raise' asked for a crash")

        audit = to_json({"action": "created", "task_id": task_id, "event_id": event.id})
        try:
            publisher.publish("task-audit", audit.encode(), "application/json")
        except Err as why:
            return Disposition_Retry(f"publish task-audit: {why.value}")

        log.write(log.Level.INFO, f"stored {key}")
        return Disposition_Success()


def parse_task(data: bytes) -> tuple[str, str, str]:
    """A task is a JSON object with an `id` (a non-empty string or a number)
    and a non-empty `title`. Returns (id, the task's JSON, title); raises
    ValueError saying what is wrong."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        value = {}
    task_id = value.get("id")
    if isinstance(task_id, str) and task_id:
        pass
    elif isinstance(task_id, (int, float)) and not isinstance(task_id, bool):
        task_id = to_json(task_id)
    else:
        raise ValueError("missing `id` (a non-empty string or a number)")
    title = value.get("title")
    if not (isinstance(title, str) and title.strip()):
        raise ValueError("missing `title` (a non-empty string)")
    return task_id, to_json(value), title


def to_json(value) -> str:
    """Compact JSON with sorted keys: the same text serde_json writes for the
    Rust handler (for integers, strings and plain floats)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def reject_constant(name: str):
    """`NaN` and `Infinity` are not JSON, though Python's parser accepts them."""
    raise ValueError(f"{name} is not a JSON value")
