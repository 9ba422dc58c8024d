"""End-to-end benchmark: publish-to-effect through a real daprd and Redis,
side by side in one run, for the todo app's task-created handler as

  - wasmsub (the task-created component), bulk subscribe off and on;
  - a native Rust subscriber with no WebAssembly (bench/native-subscriber);
  - the background document's Python FastAPI subscriber on the official
    Dapr Python SDK (bench/e2e/python_subscriber.py).

For each: throughput (N events published by 8 concurrent publishers, timed
until every task's state is visible through Dapr) and latency (events
published one at a time, each timed until its state is visible, polled
every millisecond). Run through scripts/bench-e2e.sh, which prepares the
binaries and the Python environment.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, content_type="application/json"):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def wait_until(predicate, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class Processes:
    """Starts children and stops exactly them (by pid)."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.children = []

    def start(self, name, argv, env=None, cwd=None):
        log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        self.children.append(child)
        return child

    def stop(self, child):
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self.children.remove(child)

    def stop_all(self):
        for child in list(self.children):
            self.stop(child)


def cloud_event(event_id, task_id):
    return json.dumps({
        "specversion": "1.0", "id": event_id, "source": "bench", "type": "task.created",
        "time": "2026-11-26T12:00:00Z", "datacontenttype": "application/json",
        "data": {"id": task_id, "title": f"task {task_id}"},
    })


def start_redis(procs, work, repo):
    """A Redis for the run, and the repository's Dapr components pointed at
    it (in work/components). Returns (redis port, components directory)."""
    redis_port = free_port()
    procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_until(lambda: subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True).stdout.strip() == b"PONG", "redis")
    components = os.path.join(work, "components")
    os.makedirs(components)
    for name in ("pubsub.yaml", "statestore.yaml", "resiliency.yaml"):
        text = open(os.path.join(repo, "components", name)).read().replace("localhost:6379", f"127.0.0.1:{redis_port}")
        open(os.path.join(components, name), "w").write(text)
    return redis_port, components


class Variant:
    def __init__(self, name, state_key, start):
        self.name, self.state_key, self.start = name, state_key, start


def run_variant(args, procs, variant, redis_port, components, work):
    http_port, grpc_port, app_port = free_port(), free_port(), free_port()
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
    daprd = procs.start(f"daprd-{variant.name}", [
        args.daprd, "--app-id", "bench", "--app-port", str(app_port), "--app-protocol", "http",
        "--dapr-http-port", str(http_port), "--dapr-grpc-port", str(grpc_port),
        "--dapr-internal-grpc-port", str(free_port()), "--metrics-port", str(free_port()),
        "--resources-path", components, "--log-level", "warn",
    ])
    base = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: http("GET", f"{base}/v1.0/healthz/outbound")[0] == 204, "daprd")
    app = variant.start(procs, app_port, http_port, grpc_port, work)

    def has_effect(task_id):
        status, _ = http("GET", f"{base}/v1.0/state/statestore/{urllib.request.quote(variant.state_key(task_id), safe='')}")
        return status == 200

    def publish(event_id, task_id):
        status, body = http("POST", f"{base}/v1.0/publish/pubsub/task-created", cloud_event(event_id, task_id), "application/cloudevents+json")
        assert status == 204, body

    # Warm up until the subscription is live and the handler is hot.
    counter = [0]

    def warm():
        counter[0] += 1
        publish(f"warm-{counter[0]}", 10_000_000 + counter[0])
        time.sleep(0.2)
        return has_effect(10_000_000 + counter[0])

    wait_until(warm, f"{variant.name} to handle an event")
    for i in range(50):
        publish(f"warm-more-{i}", 20_000_000 + i)

    # Throughput.
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: publish(f"t-{i}", i), range(args.events)))
    pending = set(range(args.events))
    while pending:
        pending = {i for i in pending if not has_effect(i)}
        if time.monotonic() - started > 300:
            raise SystemExit(f"{variant.name}: {len(pending)} events never took effect")
    throughput = args.events / (time.monotonic() - started)

    # Latency, one event at a time.
    latencies = []
    for i in range(args.latency_events):
        task_id = 1_000_000 + i
        t0 = time.perf_counter()
        publish(f"l-{i}", task_id)
        while not has_effect(task_id):
            time.sleep(0.001)
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    procs.stop(app)
    procs.stop(daprd)
    return {
        "variant": variant.name,
        "events_per_s": throughput,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daprd", required=True)
    parser.add_argument("--wasmsub", required=True, help="the wasmsub binary (release build)")
    parser.add_argument("--native", required=True, help="the native-subscriber binary")
    parser.add_argument("--component", required=True, help="task_created.wasm")
    parser.add_argument("--python", required=True, help="python with dapr, dapr-ext-fastapi, uvicorn")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--latency-events", type=int, default=200)
    parser.add_argument("--repo", required=True)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="wasmsub-bench-")
    procs = Processes(work)
    try:
        redis_port, components = start_redis(procs, work, args.repo)

        def wasmsub(bulk):
            def start(procs, app_port, http_port, grpc_port, work):
                manifest = os.path.join(work, f"wasmsub-{bulk}.toml")
                extra = "bulk = { max_messages = 100, max_await_ms = 5 }\n" if bulk else ""
                open(manifest, "w").write(
                    '[[tenant]]\nname = "todo"\nlimits = { max_concurrency = 32, publish_topics = ["task-audit"] }\n'
                    f'[[tenant.handler]]\nname = "task-created"\ncomponent = "{args.component}"\ntopic = "task-created"\n{extra}'
                )
                return procs.start(f"wasmsub-bulk-{bulk}", [args.wasmsub, "run", "--manifest", manifest],
                                   env={"DAPR_HTTP_PORT": str(http_port), "APP_PORT": str(app_port), "RUST_LOG": "warn",
                                        "WASMSUB_LISTEN": f"127.0.0.1:{app_port}"})
            return start

        def native(procs, app_port, http_port, grpc_port, work):
            return procs.start("native", [args.native, str(app_port), str(http_port)])

        def python(procs, app_port, http_port, grpc_port, work):
            return procs.start("python", [args.python, "-m", "uvicorn", "python_subscriber:app", "--port", str(app_port), "--log-level", "warning"],
                               env={"DAPR_GRPC_PORT": str(grpc_port), "DAPR_HTTP_PORT": str(http_port)},
                               cwd=os.path.dirname(os.path.abspath(__file__)))

        variants = [
            Variant("wasmsub", lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(False)),
            Variant("wasmsub, bulk subscribe", lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(True)),
            Variant("native Rust subscriber", lambda i: f"task:{i}", native),
            Variant("Python FastAPI + Dapr SDK", lambda i: f"task:{i}", python),
        ]
        rows = [run_variant(args, procs, v, redis_port, components, work) for v in variants]
    finally:
        procs.stop_all()
    print(f"\ntask-created through daprd + Redis: {args.events} events for throughput, {args.latency_events} one at a time for latency\n")
    print(f"| {'subscriber':<28} | {'events/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
    for row in rows:
        print(f"| {row['variant']:<28} | {row['events_per_s']:>9.0f} | {row['p50_ms']:>7.2f} | {row['p99_ms']:>7.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
