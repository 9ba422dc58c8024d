"""Contention benchmark: events/s and reruns per event when every event
read-modify-writes ONE key (the counter guest: get total, set total + 1)
versus a key of its own (the recorder guest: count:{id}), on the embedded
store and through a real daprd + Redis, side by side in one run.

With --baseline, the same rows for another wasmsub binary (an earlier
commit protocol) are measured in the same run. A hot-key row also reports
the final total: fewer than the events published means lost updates.

Run through scripts/bench-contention.sh, which builds what it needs.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

from run import Processes, free_port, http, start_redis, wait_until

TOKEN = "bench-admin-token"


def cloud_event(event_id):
    return json.dumps({"specversion": "1.0", "id": event_id, "source": "bench", "type": "tick",
                       "datacontenttype": "application/json", "data": {"key": event_id}})


def manifest(path, guest, concurrency):
    with open(path, "w") as f:
        f.write(f'[[tenant]]\nname = "acme"\nlimits = {{ max_concurrency = {concurrency}, max_state_keys = 10000000 }}\n'
                f'[[tenant.handler]]\nname = "h"\ncomponent = "{guest}"\ntopic = "ticks"\n'
                'retry = { max_attempts = 3, multiplier = 0.05, min = "50ms", max = "200ms" }\n')


def run_row(args, procs, work, binary, label, backend, keys, redis_port, components):
    guest = os.path.join(args.guests, "counter.wasm" if keys == "one hot key" else "recorder.wasm")
    tag = f"{label}-{backend}-{keys}".replace(" ", "_").replace(",", "")
    path = os.path.join(work, f"{tag}.toml")
    manifest(path, guest, args.concurrency)
    app_port = free_port()
    env = {"WASMSUB_LISTEN": f"127.0.0.1:{app_port}", "RUST_LOG": "warn", "WASMSUB_ADMIN_TOKEN": TOKEN,
           "WASMSUB_DATA_DIR": os.path.join(work, f"{tag}-data")}
    daprd = None
    if backend == "dapr":
        subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
        http_port = free_port()
        daprd = procs.start(f"daprd-{tag}", [
            args.daprd, "--app-id", "contention", "--app-port", str(app_port), "--app-protocol", "http",
            "--dapr-http-port", str(http_port), "--dapr-grpc-port", str(free_port()),
            "--dapr-internal-grpc-port", str(free_port()), "--metrics-port", str(free_port()),
            "--resources-path", components, "--log-level", "warn"])
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: http("GET", f"{base}/v1.0/healthz/outbound")[0] == 204, "daprd")
        env["DAPR_HTTP_PORT"] = str(http_port)
        env["APP_PORT"] = str(app_port)
    else:
        base = f"http://127.0.0.1:{app_port}"
    host = procs.start(f"wasmsub-{tag}", [binary, "run", "--manifest", path], env=env)
    app = f"http://127.0.0.1:{app_port}"

    def counts():
        status, body = http("GET", f"{app}/wasmsub/handlers")
        if status != 200:
            return {}
        return json.loads(body)["handlers"][0]["counts"]

    def publish(event_id):
        for _ in range(1000):
            status, _ = http("POST", f"{base}/v1.0/publish/pubsub/ticks", cloud_event(event_id), "application/cloudevents+json")
            if status in (200, 204):
                return
            time.sleep(0.05)
        raise SystemExit(f"{tag}: publish of {event_id} kept failing")

    warm = [0]

    def warmed():
        warm[0] += 1
        publish(f"warm-{warm[0]}")
        time.sleep(0.3)
        return counts().get("processed", 0) > 0

    wait_until(warmed, f"{tag} to handle an event", limit=120)
    wait_until(lambda: counts().get("processed", 0) >= warm[0], f"{tag} warm-up")
    before = counts()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: publish(f"e-{i}"), range(args.events)))
    done = lambda c: c.get("processed", 0) + c.get("dead_lettered", 0) - before.get("processed", 0) - before.get("dead_lettered", 0)
    while done(counts()) < args.events:
        if time.monotonic() - started > args.limit:
            raise SystemExit(f"{tag}: only {done(counts())} of {args.events} events done after {args.limit} s")
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    after = counts()
    reruns = after.get("reruns")
    total = "-"
    if keys == "one hot key":
        key = "wasmsub|state|4:acme|total"
        if backend == "dapr":
            status, body = http("GET", f"{base}/v1.0/state/statestore/{urllib.parse.quote(key, safe='')}")
            total = json.loads(body) if status == 200 else None
        else:
            req = f"{app}/admin/tenants/acme/state/total"
            out = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {TOKEN}", req], capture_output=True, text=True).stdout
            total = out.strip()
        total = f"{total} of {args.events + warm[0]}"
    procs.stop(host)
    if daprd:
        procs.stop(daprd)
    return {"label": label, "backend": backend, "keys": keys, "events_per_s": args.events / elapsed,
            "reruns": "n/a" if reruns is None else f"{(reruns - before.get('reruns', 0)) / args.events:.2f}",
            "deferred": after.get("deferred", 0) - before.get("deferred", 0), "total": total}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wasmsub", required=True)
    parser.add_argument("--baseline", help="another wasmsub binary to measure in the same run")
    parser.add_argument("--daprd", required=True)
    parser.add_argument("--guests", required=True, help="directory with counter.wasm and recorder.wasm")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--limit", type=float, default=600)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="wasmsub-contention-")
    procs = Processes(work)
    rows = []
    try:
        redis_port, components = start_redis(procs, work, args.repo)
        binaries = [("this build", args.wasmsub)] + ([("baseline", args.baseline)] if args.baseline else [])
        for backend in ("embedded", "dapr"):
            for keys in ("distinct keys", "one hot key"):
                for label, binary in binaries:
                    rows.append(run_row(args, procs, work, binary, label, backend, keys, redis_port, components))
                    print(rows[-1], file=sys.stderr)
    finally:
        procs.stop_all()
    print(f"\n{args.events} events, 8 publishers, max_concurrency = {args.concurrency}\n")
    print(f"| {'binary':<10} | {'store':<8} | {'keys':<13} | {'events/s':>8} | {'reruns/event':>12} | {'deferred':>8} | {'final total':<16} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 15}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 18}|")
    for r in rows:
        print(f"| {r['label']:<10} | {r['backend']:<8} | {r['keys']:<13} | {r['events_per_s']:>8.0f} | {r['reruns']:>12} | {r['deferred']:>8} | {str(r['total']):<16} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
