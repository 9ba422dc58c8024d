// `task-created` in JavaScript: the todo app's handler for new tasks.
//
// A port of guests/task-created (Rust), built with componentize-js by
// guests/js/build.mjs (run by scripts/build-polyglot-guests.sh). It validates
// the task JSON, stores it under `task:{id}` in the tenant's state and
// publishes a `task-audit` event. Like the Rust handler it keeps no
// idempotency record: the host runs it at most once per event id and
// applies its effects only when it answers `success`.
//
// One addition for tests: a task titled exactly "raise" makes it throw an
// uncaught Error after its state write. componentize-js prints the error and
// its stack to stderr and traps, so the host discards the write, retries the
// event, and its trap reason carries the JavaScript error.
//
// Bindings follow the jco conventions: the world's `handle` export is an
// exported function; a `result<_, string>` import returns normally or
// throws; `list<u8>` is a Uint8Array; a variant is `{ tag, val }`.

import { write as log } from 'wasmsub:handler/log@0.1.0';
import { set as stateSet } from 'wasmsub:handler/state@0.1.0';
import { publish } from 'wasmsub:handler/publisher@0.1.0';

export function handle(event) {
    let task;
    try {
        task = parseTask(event.data);
    } catch (why) {
        // Bad data never gets better by retrying.
        return { tag: 'drop', val: `invalid task: ${why.message}` };
    }

    const key = `task:${task.id}`;
    try {
        stateSet(key, utf8(task.json));
    } catch (why) {
        return { tag: 'retry', val: `state set ${key}: ${refusal(why)}` };
    }

    if (task.title === 'raise') {
        // Deliberately uncaught (test fixture): a trap half-way through the
        // attempt, after a buffered write the host must discard.
        throw new Error("task-created: title 'raise' asked for a crash");
    }

    const audit = toJson({ action: 'created', task_id: task.id, event_id: event.id });
    try {
        publish('task-audit', utf8(audit), 'application/json');
    } catch (why) {
        return { tag: 'retry', val: `publish task-audit: ${refusal(why)}` };
    }

    log('info', `stored ${key}`);
    return { tag: 'success' };
}

// A task is a JSON object with an `id` (a non-empty string or a number) and a
// non-empty `title`. Throws an Error saying what is wrong.
function parseTask(data) {
    let value;
    try {
        value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(data));
    } catch (e) {
        throw new Error(`not JSON: ${e.message}`);
    }
    const object = value !== null && typeof value === 'object' && !Array.isArray(value) ? value : {};
    let id = object.id;
    if (typeof id === 'number') {
        id = String(id);
    } else if (typeof id !== 'string' || id === '') {
        throw new Error('missing `id` (a non-empty string or a number)');
    }
    const title = object.title;
    if (typeof title !== 'string' || title.trim() === '') {
        throw new Error('missing `title` (a non-empty string)');
    }
    return { id, title, json: toJson(value) };
}

// Compact JSON with object keys sorted: the same text serde_json writes for
// the Rust handler (for integers and strings). Written out by hand because a
// JS object lists integer-like keys first, whatever order they were added in.
function toJson(value) {
    if (value === null || typeof value !== 'object') return JSON.stringify(value);
    if (Array.isArray(value)) return `[${value.map(toJson).join(',')}]`;
    const fields = Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${toJson(value[k])}`);
    return `{${fields.join(',')}}`;
}

function utf8(text) {
    return new TextEncoder().encode(text);
}

// The host's reason for refusing a call: a `result` import's `err` payload
// (componentize-js throws it, or an Error carrying it).
function refusal(why) {
    if (typeof why === 'string') return why;
    return why?.payload ?? why?.val ?? why?.message ?? String(why);
}
