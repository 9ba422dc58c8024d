"""End-to-end benchmark: publish-to-effect through a real daprd and Redis,
side by side in one run, for the todo app's task-created handler as

  - wasmsub (the task-created component), bulk subscribe off and on;
  - a native Rust subscriber with no WebAssembly (bench/native-subscriber);
  - the background document's Python FastAPI subscriber on the official
    Dapr Python SDK (bench/e2e/python_subscriber.py).

For each:

  - throughput: N events published by 8 concurrent publishers, timed until
    every task's state exists (checked in Redis directly, one pipelined
    EXISTS per 50 pending keys every 5 ms, so the check itself adds no
    load to daprd and is subtracted from Redis's figures);
  - draining a backlog: N more events appended straight to the topic's
    Redis stream at once (as daprd's publish would), timed until every
    task exists: the subscriber's own pace, with no publisher in the loop
    (publishing through the same daprd bounds the throughput figure above
    for every subscriber that keeps up);
  - latency: events published one at a time, each timed until its state is
    visible through Dapr's state API (polled every millisecond);
  - the cost model, over the throughput phase only (after the warm-up has
    fully taken effect, until every event has and Redis is quiet):
      * CPU per event of the subscriber (its process and any children),
        of daprd and of Redis: utime + stime from /proc/<pid>/stat;
      * Redis commands per event (INFO commandstats), without the
        benchmark's own EXISTS and INFO;
      * sidecar calls per event: the app's calls to daprd's HTTP and gRPC
        APIs, from daprd's Prometheus metrics (dapr_http_server_request_count
        and dapr_grpc_io_server_completed_rpcs), without health checks and
        without the benchmark's own publishes;
      * deliveries per event: daprd's HTTP calls to the app
        (dapr_http_client_completed_count), which bulk subscribe batches.
    The daprd and Redis columns include accepting the benchmark's publish
    (one per event); a "publishing alone" line measures that share.

--repeat N runs the whole comparison N times (variant order rotated each
time) and prints every run's table, then the median of each cell and the
median of each run's ratios. --details adds each subscriber's pids, its
calls by route and its Redis commands by name. CPU comes in clock ticks
(10 ms), so quote figures from the default 2000 events, not from a short
run. Run through scripts/bench-e2e.sh, which prepares the binaries and the
Python environment.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PUBLISHERS = 8


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


def start_redis(procs, work, repo, concurrency=None):
    """A Redis for the run, and the repository's Dapr components pointed at
    it (in work/components). Returns (redis port, components directory);
    the Redis process is procs.redis."""
    redis_port = free_port()
    procs.redis = procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_until(lambda: subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True).stdout.strip() == b"PONG", "redis")
    components = os.path.join(work, "components")
    os.makedirs(components)
    for name in ("pubsub.yaml", "statestore.yaml", "resiliency.yaml"):
        text = open(os.path.join(repo, "components", name)).read().replace("localhost:6379", f"127.0.0.1:{redis_port}")
        if name == "pubsub.yaml" and concurrency:
            text, n = re.subn(r'(- name: concurrency\n\s+value: )"\d+"', rf'\g<1>"{concurrency}"', text)
            assert n == 1, "components/pubsub.yaml sets no concurrency to replace"
        open(os.path.join(components, name), "w").write(text)
    return redis_port, components


# ---------------------------------------------------------------- measuring

class Redis:
    """A minimal RESP2 client over one socket, counting what it sends (by
    command name) so the benchmark can take its own commands out of Redis's
    statistics."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.sent = collections.Counter()

    def pipeline(self, commands):
        out = bytearray()
        for command in commands:
            self.sent[str(command[0]).lower()] += 1
            out += b"*%d\r\n" % len(command)
            for arg in command:
                arg = arg if isinstance(arg, bytes) else str(arg).encode()
                out += b"$%d\r\n%s\r\n" % (len(arg), arg)
        self.sock.sendall(out)
        return [self._read() for _ in commands]

    def __call__(self, *command):
        return self.pipeline([command])[0]

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"redis: unexpected reply {line!r}")

    def commandstats(self):
        """{command: (calls, usec)} from INFO commandstats."""
        stats = {}
        for line in self("INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line[len("cmdstat_"):].split(":", 1)
                values = dict(field.split("=", 1) for field in fields.split(","))
                stats[name] = (int(values["calls"]), int(values["usec"]))
        return stats


def process_tree(pid):
    """pid and its live descendants (through /proc/<pid>/task/*/children)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return tree


def cpu_ticks(pid):
    """utime + stime (+ cutime + cstime: descendants that exited and were
    reaped) of pid and its live descendants, in clock ticks."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total


def describe_process(pid):
    def comm(p):
        try:
            return open(f"/proc/{p}/comm").read().strip()
        except FileNotFoundError:
            return "?"
    return ", ".join(f"{p} ({comm(p)}, {len(os.listdir(f'/proc/{p}/task'))} threads)" for p in process_tree(pid))


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SIDECAR_METRICS = {
    # The app's calls to daprd's HTTP API, by method and (normalised) path.
    "dapr_http_server_request_count": ("http", ("method", "path")),
    # The app's calls to daprd's gRPC API (the Python SDK's transport).
    "dapr_grpc_io_server_completed_rpcs": ("grpc", ("grpc_server_method",)),
    # daprd's HTTP calls to the app: event deliveries.
    "dapr_http_client_completed_count": ("to-app", ("method", "path")),
}


def daprd_metrics(url):
    """{(kind, label...): count} for SIDECAR_METRICS, summed over status."""
    status, body = http("GET", url)
    if status != 200:
        raise SystemExit(f"daprd metrics at {url}: HTTP {status}")
    counts = collections.Counter()
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if name not in SIDECAR_METRICS:
            continue
        labels_text, _, value = rest.rpartition("}")
        labels = dict(LABEL.findall(labels_text))
        kind, keys = SIDECAR_METRICS[name]
        counts[(kind, *(labels.get(k, "") for k in keys))] += float(value)
    return counts


def is_health_check(key):
    return "healthz" in key[-1].lower() or "grpc.health" in key[-1].lower()


class Snapshot:
    """CPU ticks, Redis commands and daprd's call counters at one moment.
    A window's opening snapshot reads the CPU last and its closing one reads
    it first, so the window's CPU leaves out the metrics scrapes."""

    def __init__(self, pids, redis, metrics_url, opening):
        if not opening:
            self.ticks = {name: cpu_ticks(pid) for name, pid in pids.items()}
        self.calls = daprd_metrics(metrics_url) if metrics_url else collections.Counter()
        self.sent = redis.sent.copy()  # before INFO: Redis counts the opening INFO in the window
        self.commands = redis.commandstats()
        if opening:
            self.ticks = {name: cpu_ticks(pid) for name, pid in pids.items()}
        self.time = time.monotonic()


def cost(before, after, events, redis, publish_key):
    """The cost model over [before, after], per event."""
    mine = after.sent - before.sent  # the benchmark's own commands, INFO before included
    commands, usec_mine = collections.Counter(), 0
    for name, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(name, (0, 0))
        commands[name] = calls - calls0
        if mine[name] and calls > calls0:
            usec_mine += (usec - usec0) * min(1.0, mine[name] / (calls - calls0))
    commands -= mine
    calls = after.calls.copy()
    calls.subtract(before.calls)
    calls = collections.Counter({k: v for k, v in calls.items() if v})
    own_publishes = calls.pop(publish_key, 0)
    health = sum(calls.pop(k) for k in [k for k in calls if is_health_check(k)])
    to_app = sum(v for k, v in calls.items() if k[0] == "to-app")
    to_sidecar = sum(v for k, v in calls.items() if k[0] != "to-app")
    us = lambda name: (after.ticks[name] - before.ticks[name]) * 1e6 / CLK_TCK
    return {
        "sub_us": us("subscriber") / events,
        "daprd_us": us("daprd") / events,
        "redis_us": max(0.0, us("redis") - usec_mine) / events,
        "redis_cmds": sum(commands.values()) / events,
        "calls": to_sidecar / events,
        "deliveries": to_app / events,
        "own_publishes": own_publishes,
        "health_checks": health,
        "calls_by_route": {k: v / events for k, v in calls.items()},
        "commands_by_name": {k: v / events for k, v in commands.items() if v},
        "window_s": after.time - before.time,
    }


def quiesce(redis, limit=3.0):
    """Waits until Redis has seen no command but the benchmark's own INFO for
    150 ms (the last events' follow-up publishes, acknowledgements, lock
    releases have landed), at most `limit` seconds. Cheaper for daprd than
    watching its metrics, which would cost it a scrape every few ms."""
    deadline = time.monotonic() + limit
    total = lambda: int(re.search(rb"total_commands_processed:(\d+)", redis("INFO", "stats")).group(1))
    last = total()
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = total()
        if now - last <= 1:
            return
        last = now


def wait_for_keys(redis, keys, limit, what):
    """Polls Redis until every key exists: one pipelined round of EXISTS
    over chunks of 50 pending keys every 5 ms, dropping a chunk once all
    of it exists."""
    chunks = [keys[i:i + 50] for i in range(0, len(keys), 50)]
    deadline = time.monotonic() + limit
    while chunks:
        found = redis.pipeline([("EXISTS", *chunk) for chunk in chunks])
        chunks = [chunk for chunk, n in zip(chunks, found) if n != len(chunk)]
        if not chunks:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {sum(map(len, chunks))} events never took effect")
        time.sleep(0.005)


# Where Dapr's Redis Streams component keeps a topic's messages, and the
# field it reads the payload from (components-contrib pubsub/redis).
TOPIC_STREAM = "task-created"
BACKLOG_FIRST_TASK = 30_000_000


def drain_backlog(redis, events, redis_key, what):
    """Appends `events` CloudEvents to the topic's stream at once (XADD, as
    daprd's publish does, pipelined: a few milliseconds) and times until
    every task exists: the subscriber drains a backlog as fast as it can,
    with no publisher in the loop. Returns events/s."""
    ids = range(BACKLOG_FIRST_TASK, BACKLOG_FIRST_TASK + events)
    started = time.monotonic()
    for first in range(0, events, 500):
        chunk = ids[first:first + 500]
        redis.pipeline([("XADD", TOPIC_STREAM, "*", "data", cloud_event(f"d-{i}", i)) for i in chunk])
    wait_for_keys(redis, [redis_key(i) for i in ids], 300, f"{what} backlog")
    return events / (time.monotonic() - started)


# ---------------------------------------------------------------- variants

class Variant:
    def __init__(self, name, state_key, start):
        self.name, self.state_key, self.start = name, state_key, start


# daprd's configuration: only the HTTP metrics' path labels differ from the
# defaults. By default daprd labels every state call "/v1.0/state/<store>"
# (save, bulk get and transaction alike); these patterns tell them apart.
# Paths matching none (publish) keep their default label, topic included.
DAPRD_CONFIG = """apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: bench
spec:
  metric:
    enabled: true
    http:
      pathMatching:
        - /v1.0/state/{store}
        - /v1.0/state/{store}/bulk
        - /v1.0/state/{store}/transaction
        - /v1.0/state/{store}/{key}
"""


def start_daprd(args, procs, name, app_port, components):
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    app = ["--app-port", str(app_port), "--app-protocol", "http"] if app_port else []
    daprd = procs.start(f"daprd-{name}", [
        args.daprd, "--app-id", "bench", *app,
        "--dapr-http-port", str(http_port), "--dapr-grpc-port", str(grpc_port),
        "--dapr-internal-grpc-port", str(free_port()), "--metrics-port", str(metrics_port),
        "--resources-path", components, "--config", args.daprd_config, "--log-level", "warn",
    ])
    base = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: http("GET", f"{base}/v1.0/healthz/outbound")[0] == 204, "daprd")
    return daprd, base, grpc_port, f"http://127.0.0.1:{metrics_port}/metrics"


def publish_in_parallel(publish, ids, prefix):
    with concurrent.futures.ThreadPoolExecutor(PUBLISHERS) as pool:
        list(pool.map(lambda i: publish(f"{prefix}-{i}", i), ids))


def measure_publish_alone(args, procs, redis, components, tag):
    """What accepting a publish costs daprd and Redis, with no subscriber:
    the share of the daprd and Redis columns that is the benchmark's own
    publishing. Uses a topic nothing subscribes to."""
    daprd, base, _, metrics_url = start_daprd(args, procs, f"publish-alone-{tag}", None, components)

    def publish(event_id, task_id):
        status, body = http("POST", f"{base}/v1.0/publish/pubsub/bench-publish-alone", cloud_event(event_id, task_id), "application/cloudevents+json")
        assert status == 204, body

    publish_in_parallel(publish, range(50), "warm")
    pids = {"subscriber": os.getpid(), "daprd": daprd.pid, "redis": procs.redis.pid}
    before = Snapshot(pids, redis, metrics_url, opening=True)
    publish_in_parallel(publish, range(args.events), "p")
    after = Snapshot(pids, redis, metrics_url, opening=False)
    procs.stop(daprd)
    redis("DEL", "bench-publish-alone")
    result = cost(before, after, args.events, redis, ("http", "POST", "/v1.0/publish/pubsub/bench-publish-alone"))
    result["events_per_s"] = args.events / result["window_s"]
    return result


def run_variant(args, procs, redis, variant, components, work):
    app_port = free_port()
    redis("FLUSHALL")
    daprd, base, grpc_port, metrics_url = start_daprd(args, procs, variant.name, app_port, components)
    http_port = int(base.rsplit(":", 1)[1])
    app = variant.start(procs, app_port, http_port, grpc_port, work)
    redis_key = lambda task_id: f"bench||{variant.state_key(task_id)}"

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
    if redis("EXISTS", redis_key(10_000_000 + counter[0])) != 1:
        raise SystemExit(f"{variant.name}: the task is visible through Dapr but not as Redis key {redis_key(10_000_000 + counter[0])!r}")
    publish_in_parallel(publish, range(20_000_000, 20_000_050), "warm-more")
    wait_for_keys(redis, [redis_key(i) for i in range(20_000_000, 20_000_050)], 120, f"{variant.name} warm-up")
    quiesce(redis)

    # Throughput, and the cost model over it.
    if app.poll() is not None:
        raise SystemExit(f"{variant.name}: the subscriber exited ({app.returncode}); see {work}")
    pids = {"subscriber": app.pid, "daprd": daprd.pid, "redis": procs.redis.pid}
    processes = {name: describe_process(pid) for name, pid in pids.items()}
    before = Snapshot(pids, redis, metrics_url, opening=True)
    publish_in_parallel(publish, range(args.events), "t")
    wait_for_keys(redis, [redis_key(i) for i in range(args.events)], 300, variant.name)
    throughput = args.events / (time.monotonic() - before.time)
    quiesce(redis)
    after = Snapshot(pids, redis, metrics_url, opening=False)
    result = cost(before, after, args.events, redis, ("http", "POST", "/v1.0/publish/pubsub/task-created"))
    if result["own_publishes"] != args.events:
        print(f"warning: {variant.name}: daprd counted {result['own_publishes']:.0f} publishes to task-created, "
              f"the benchmark made {args.events}", file=sys.stderr)

    # Draining a backlog: the events appended straight to the stream, so the
    # rate is the subscriber's (through its daprd), not the publishers'.
    drained = drain_backlog(redis, args.events, redis_key, variant.name)
    quiesce(redis)

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
        **result,
        "variant": variant.name,
        "events_per_s": throughput,
        "drain_per_s": drained,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "processes": processes,
    }


# ---------------------------------------------------------------- reporting

COLUMNS = [
    # (key, header, width, format)
    ("events_per_s", "events/s", 9, "{:.0f}"),
    ("drain_per_s", "drain ev/s", 10, "{:.0f}"),
    ("p50_ms", "p50 ms", 7, "{:.2f}"),
    ("p99_ms", "p99 ms", 7, "{:.2f}"),
    ("sub_us", "app µs/ev", 9, "{:.0f}"),
    ("daprd_us", "daprd µs/ev", 11, "{:.0f}"),
    ("redis_us", "Redis µs/ev", 11, "{:.0f}"),
    ("redis_cmds", "Redis cmds/ev", 13, "{:.2f}"),
    ("calls", "sidecar calls/ev", 16, "{:.2f}"),
    ("deliveries", "deliveries/ev", 13, "{:.3f}"),
]


def print_table(title, rows):
    print(f"\n{title}\n")
    print(f"| {'subscriber':<28} | " + " | ".join(f"{h:>{w}}" for _, h, w, _ in COLUMNS) + " |")
    print(f"|{'-' * 30}|" + "|".join("-" * (w + 2) for _, _, w, _ in COLUMNS) + "|")
    for row in rows:
        print(f"| {row['variant']:<28} | " + " | ".join(f"{f.format(row[k]):>{w}}" for k, _, w, f in COLUMNS) + " |")


NAMES = {"wasmsub": "wasmsub", "bulk": "wasmsub, bulk subscribe", "native": "native Rust subscriber", "python": "Python FastAPI + Dapr SDK"}
BASELINE = {"wasmsub": "wasmsub, --baseline build", "bulk": "bulk, --baseline build"}


def present(rows):
    """The variants in this run, by key (wasmsub, bulk, native, python)."""
    names = {row["variant"] for row in rows}
    return {key: next(r for r in rows if r["variant"] == name) for key, name in NAMES.items() if name in names}


def pairs(by):
    return [(a, b) for a in ("wasmsub", "bulk") for b in ("native", "python") if a in by and b in by]


def ratios(rows):
    by = present(rows)
    total = lambda r: r["sub_us"] + r["daprd_us"] + r["redis_us"]
    out = {}
    for a, b in pairs(by):
        out[f"events/s {a} / {b}"] = by[a]["events_per_s"] / by[b]["events_per_s"]
        out[f"drain ev/s {a} / {b}"] = by[a]["drain_per_s"] / by[b]["drain_per_s"]
        out[f"app CPU/ev {a} / {b}"] = by[a]["sub_us"] / by[b]["sub_us"] if by[b]["sub_us"] else float("nan")
        out[f"total CPU/ev {a} / {b}"] = total(by[a]) / total(by[b]) if total(by[b]) else float("nan")
    for key, name in BASELINE.items():
        baseline = next((r for r in rows if r["variant"] == name), None)
        if baseline and key in by:
            for what, column in (("events/s", "events_per_s"), ("drain ev/s", "drain_per_s"), ("app CPU/ev", "sub_us"), ("calls/ev", "calls")):
                out[f"{what} {key} / baseline"] = by[key][column] / baseline[column] if baseline[column] else float("nan")
    return out


def print_ratios(rows, ratio):
    by = present(rows)
    total = lambda r: r["sub_us"] + r["daprd_us"] + r["redis_us"]
    line = lambda what: "   ".join(f"{a} ÷ {b} {ratio[f'{what} {a} / {b}']:.2f}x" for a, b in pairs(by))
    if pairs(by):
        print(f"\n  events/s:                            {line('events/s')}")
        print(f"  draining a backlog, events/s:        {line('drain ev/s')}")
        print(f"  app CPU/event:                       {line('app CPU/ev')}")
        print(f"  total CPU/event (app+daprd+Redis):   {line('total CPU/ev')}")
    print("\n  total CPU µs/event:                  " + "   ".join(f"{k} {total(by[k]):.0f}" for k in by))
    print("  sidecar calls / Redis cmds per event: " + "   ".join(f"{k} {by[k]['calls']:.2f} / {by[k]['redis_cmds']:.2f}" for k in by))
    for key in BASELINE:
        if f"events/s {key} / baseline" in ratio:
            print(f"  this build ÷ --baseline build, {key + ':':<9}  events/s {ratio[f'events/s {key} / baseline']:.2f}x   "
                  f"draining {ratio[f'drain ev/s {key} / baseline']:.2f}x   "
                  f"app CPU/event {ratio[f'app CPU/ev {key} / baseline']:.2f}x   sidecar calls/event {ratio[f'calls/ev {key} / baseline']:.2f}x")


def print_publish_alone(p, label="publishing alone"):
    print(f"\n  {label} (no subscriber; included in the daprd and Redis columns): "
          f"daprd {p['daprd_us']:.0f} µs/ev, Redis {p['redis_us']:.0f} µs/ev, {p['redis_cmds']:.2f} Redis cmds/ev")


def print_details(rows):
    for row in rows:
        print(f"\n  {row['variant']}: {row['window_s']:.2f} s measured; pids: "
              + "; ".join(f"{k} {v}" for k, v in row["processes"].items()))
        print(f"    benchmark publishes excluded: {row['own_publishes']:.0f}; health checks excluded: {row['health_checks']:.0f}")
        for key, per in sorted(row["calls_by_route"].items(), key=lambda kv: -kv[1]):
            print(f"    {per:8.3f}/ev  {' '.join(key)}")
        print("    Redis: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["commands_by_name"].items(), key=lambda kv: -kv[1])))


def median_rows(runs):
    rows = []
    for i, first in enumerate(runs[0]):
        rows.append({"variant": first["variant"], **{k: statistics.median(run[i][k] for run in runs) for k, _, _, _ in COLUMNS}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daprd", required=True)
    parser.add_argument("--wasmsub", required=True, help="the wasmsub binary (release build)")
    parser.add_argument("--native", required=True, help="the native-subscriber binary")
    parser.add_argument("--component", required=True, help="task_created.wasm")
    parser.add_argument("--python", required=True, help="python with dapr, dapr-ext-fastapi, uvicorn")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--latency-events", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="run the whole comparison N times; print each run and the medians")
    parser.add_argument("--details", action="store_true", help="also print, per subscriber, its pids and the calls and Redis commands per event by kind")
    parser.add_argument("--baseline", help="another wasmsub binary (e.g. the previous commit's) run as two more rows (single and bulk), for a before/after in one run")
    parser.add_argument("--bulk-max-messages", type=int, default=32,
                        help="wasmsub's bulk max_messages; Dapr fills a batch only up to the pub/sub component's concurrency "
                             "(32 in components/pubsub.yaml) and waits max_await_ms (5) for more (default: 32)")
    parser.add_argument("--only", default=",".join(NAMES),
                        help="the subscribers to run, comma-separated, of: " + ", ".join(NAMES) + " (default: all)")
    parser.add_argument("--pubsub-concurrency", type=int,
                        help="the Redis Streams component's concurrency (messages it hands Dapr at once) for every subscriber "
                             "(default: components/pubsub.yaml's)")
    parser.add_argument("--repo", required=True)
    args = parser.parse_args()
    if args.repeat < 1 or args.events < 1 or args.latency_events < 1:
        parser.error("--repeat, --events and --latency-events must be at least 1")
    only = [key.strip() for key in args.only.split(",") if key.strip()]
    if not only or any(key not in NAMES for key in only):
        parser.error(f"--only takes a comma-separated list of: {', '.join(NAMES)}")

    work = tempfile.mkdtemp(prefix="wasmsub-bench-")
    procs = Processes(work)
    runs, publish_alone = [], []
    title = (f"task-created through daprd + Redis: {args.events} events for throughput, {args.latency_events} one at a time for latency;\n"
             f"µs/ev: CPU time (utime+stime) per event of the app, daprd and Redis processes over the throughput phase (clock tick {1e6 / CLK_TCK:.0f} µs);\n"
             "Redis cmds, sidecar calls (app to daprd) and deliveries (daprd to app) per event over the same phase")
    try:
        redis_port, components = start_redis(procs, work, args.repo, args.pubsub_concurrency)
        redis = Redis(redis_port)
        args.daprd_config = os.path.join(work, "daprd-config.yaml")
        open(args.daprd_config, "w").write(DAPRD_CONFIG)

        def wasmsub(bulk, binary=args.wasmsub):
            def start(procs, app_port, http_port, grpc_port, work):
                manifest = os.path.join(work, f"wasmsub-{bulk}.toml")
                extra = f"bulk = {{ max_messages = {args.bulk_max_messages}, max_await_ms = 5 }}\n" if bulk else ""
                open(manifest, "w").write(
                    '[[tenant]]\nname = "todo"\nlimits = { max_concurrency = 32, publish_topics = ["task-audit"] }\n'
                    f'[[tenant.handler]]\nname = "task-created"\ncomponent = "{args.component}"\ntopic = "task-created"\n{extra}'
                )
                return procs.start(f"wasmsub-bulk-{bulk}", [binary, "run", "--manifest", manifest],
                                   env={"DAPR_HTTP_PORT": str(http_port), "APP_PORT": str(app_port), "RUST_LOG": "warn",
                                        "WASMSUB_LISTEN": f"127.0.0.1:{app_port}"})
            return start

        def native(procs, app_port, http_port, grpc_port, work):
            return procs.start("native", [args.native, str(app_port), str(http_port)])

        def python(procs, app_port, http_port, grpc_port, work):
            # The venv's python running uvicorn in-process (no --reload, no
            # --workers): the pid Popen returns is the server itself.
            return procs.start("python", [args.python, "-m", "uvicorn", "python_subscriber:app", "--port", str(app_port), "--log-level", "warning"],
                               env={"DAPR_GRPC_PORT": str(grpc_port), "DAPR_HTTP_PORT": str(http_port)},
                               cwd=os.path.dirname(os.path.abspath(__file__)))

        variants = [
            Variant(NAMES["wasmsub"], lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(False)),
            Variant(NAMES["bulk"], lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(True)),
            Variant(NAMES["native"], lambda i: f"task:{i}", native),
            Variant(NAMES["python"], lambda i: f"task:{i}", python),
        ]
        if args.baseline:
            variants.insert(1, Variant(BASELINE["wasmsub"], lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(False, args.baseline)))
            variants.insert(3, Variant(BASELINE["bulk"], lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(True, args.baseline)))
        wanted = {NAMES[key] for key in only} | {BASELINE[key] for key in only if key in BASELINE}
        variants = [v for v in variants if v.name in wanted]
        for run in range(args.repeat):
            publish_alone.append(measure_publish_alone(args, procs, redis, components, run))
            order = variants[run % len(variants):] + variants[:run % len(variants)]
            results = {v.name: run_variant(args, procs, redis, v, components, work) for v in order}
            rows = [results[v.name] for v in variants]
            runs.append(rows)
            label = f"run {run + 1} of {args.repeat} (order: {' -> '.join(v.name for v in order)})" if args.repeat > 1 else ""
            print_table(f"{title}\n{label}".rstrip(), rows)
            print_ratios(rows, ratios(rows))
            print_publish_alone(publish_alone[-1])
            if args.details:
                print_details(rows)
            sys.stdout.flush()
    finally:
        procs.stop_all()
    if args.repeat > 1:
        medians = median_rows(runs)
        print_table(f"median of {args.repeat} runs, each cell separately ({args.events} events for throughput, {args.latency_events} for latency)", medians)
        per_run = [ratios(rows) for rows in runs]
        print_ratios(medians, {k: statistics.median(r[k] for r in per_run) for k in per_run[0]})
        print("  (ratios: the median of each run's ratio; totals and calls: from the median table)")
        print_publish_alone({k: statistics.median(p[k] for p in publish_alone) for k in ("daprd_us", "redis_us", "redis_cmds")},
                            "publishing alone, median")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
