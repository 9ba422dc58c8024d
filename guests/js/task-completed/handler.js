// `task-completed` in JavaScript: marks a stored task done.
//
// Built with componentize-js by guests/js/build.mjs (run by
// scripts/build-polyglot-guests.sh). The event's data names the task,
// `{"id": ...}` (a non-empty string or a number). The handler reads
// `task:{id}` from the tenant's state (stored by task-created); if it is not
// there yet it answers `retry` (the task-created event may still be on its
// way), otherwise it sets `"done": true`, writes the task back and publishes
// `{"action":"completed",...}` to `task-audit`.
//
// It reads before it writes, so it exercises the host's optimistic
// isolation: a concurrent change to the task makes the host run it again
// with fresh reads.

import { write as log } from 'wasmsub:handler/log@0.1.0';
import { get as stateGet, set as stateSet } from 'wasmsub:handler/state@0.1.0';
import { publish } from 'wasmsub:handler/publisher@0.1.0';

export function handle(event) {
    let id;
    try {
        id = parseTaskId(event.data);
    } catch (why) {
        return { tag: 'drop', val: `invalid completion: ${why.message}` };
    }

    const key = `task:${id}`;
    let stored;
    try {
        stored = stateGet(key);
    } catch (why) {
        return { tag: 'retry', val: `state get ${key}: ${refusal(why)}` };
    }
    if (stored === undefined || stored === null) {
        // Not an error in the data: task-created may not have run yet.
        return { tag: 'retry', val: `task ${id} not found yet` };
    }

    let task;
    try {
        task = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(stored));
    } catch {
        task = null;
    }
    if (task === null || typeof task !== 'object' || Array.isArray(task)) {
        // Retrying cannot repair what is stored.
        return { tag: 'drop', val: `stored ${key} is not a JSON object` };
    }
    task.done = true;

    try {
        stateSet(key, utf8(toJson(task)));
    } catch (why) {
        return { tag: 'retry', val: `state set ${key}: ${refusal(why)}` };
    }

    const audit = toJson({ action: 'completed', task_id: id, event_id: event.id });
    try {
        publish('task-audit', utf8(audit), 'application/json');
    } catch (why) {
        return { tag: 'retry', val: `publish task-audit: ${refusal(why)}` };
    }

    log('info', `completed ${key}`);
    return { tag: 'success' };
}

// The `id` of a JSON object: a non-empty string, or a number (as text).
function parseTaskId(data) {
    let value;
    try {
        value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(data));
    } catch (e) {
        throw new Error(`not JSON: ${e.message}`);
    }
    const id = value !== null && typeof value === 'object' && !Array.isArray(value) ? value.id : undefined;
    if (typeof id === 'number') return String(id);
    if (typeof id === 'string' && id !== '') return id;
    throw new Error('missing `id` (a non-empty string or a number)');
}

// Compact JSON with object keys sorted, as serde_json writes it (by hand:
// a JS object lists integer-like keys first).
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
