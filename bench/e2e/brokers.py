"""Per-broker end-to-end figures: the todo app's task-created component on a
release wasmsub behind a real daprd, with Redis Streams, Kafka (a real 4.1
broker, KRaft, one node, 4 partitions) and AWS SNS/SQS (moto) as the
pub/sub, each with the repository's tested component YAMLs
(components/pubsub.yaml + resiliency.yaml, components/kafka/,
components/snssqs/). The state store is Redis for all three.

For each broker it runs bench/e2e/run.py's measurement unchanged
(run_variant): throughput (N events from 8 concurrent publishers, timed
until every task's state exists in Redis), latency (one event at a time,
until its state is visible through Dapr), and the CPU of the host, daprd
and the state store's Redis per event over the throughput phase. The
broker's own CPU (the Kafka JVM, moto) is not in the table.

What the figures are not: moto is a Python mock of the AWS APIs, so the
SNS/SQS row measures daprd's SNS/SQS component against moto, not AWS; and
Kafka runs on the same 2-core machine as everything else. Compare rows
for what the component and its settings cost (Kafka delivers a
partition's events one at a time; SQS is polled), not for the brokers'
own speed. Run through scripts/bench-brokers.sh.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the clone
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/e2e/run.py: the measurement, reused as is)

BROKERS = ("redis", "kafka", "snssqs")
TITLE = {"redis": "wasmsub on Redis Streams", "kafka": "wasmsub on Kafka", "snssqs": "wasmsub on SNS-SQS (moto)"}


def metadata_value(yaml, name, value):
    """yaml with metadata entry `name`'s value line replaced."""
    lines = yaml.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {name}")
    indent = lines[at + 1][: len(lines[at + 1]) - len(lines[at + 1].lstrip())]
    lines[at + 1] = f'{indent}value: "{value}"'
    return "\n".join(lines) + "\n"


def start_kafka(procs, work, kafka_lib):
    port, controller = run.free_port(), run.free_port()
    config = os.path.join(work, "kafka.properties")
    open(config, "w").write(
        "process.roles=broker,controller\nnode.id=1\n"
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n"
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n"
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\ninter.broker.listener.name=PLAINTEXT\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}\nlog.dirs={work}/kafka-data\nnum.partitions=4\n"
        "offsets.topic.replication.factor=1\noffsets.topic.num.partitions=1\ntransaction.state.log.replication.factor=1\n"
        "transaction.state.log.min.isr=1\nshare.coordinator.state.topic.replication.factor=1\n"
        "share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n")
    classpath = f"{kafka_lib}/*"
    tool = lambda *a: subprocess.run(["java", "-cp", classpath, "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", *a],
                                     check=True, capture_output=True, text=True).stdout.strip()
    cluster = tool("kafka.tools.StorageTool", "random-uuid")
    tool("kafka.tools.StorageTool", "format", "-t", cluster, "-c", config, "--standalone")
    procs.start("kafka", ["java", "-Xmx512m", "-cp", classpath, "kafka.Kafka", config])
    log = os.path.join(work, "kafka.log")
    run.wait_until(lambda: "Kafka Server started" in open(log).read(), "kafka", limit=120)
    return f"127.0.0.1:{port}"


def start_moto(procs, moto_server):
    port = run.free_port()
    procs.start("moto", [moto_server, "-H", "127.0.0.1", "-p", str(port)])
    run.wait_until(lambda: run.http("GET", f"http://127.0.0.1:{port}/moto-api/")[0] == 200, "moto")
    return f"http://127.0.0.1:{port}"


def components_for(broker, procs, work, args):
    """Redis (the state store) and the broker's YAMLs; returns (redis port,
    components directory)."""
    redis_port, components = run.start_redis(procs, work, args.repo)
    if broker == "redis":
        return redis_port, components
    os.remove(os.path.join(components, "resiliency.yaml"))
    yaml = open(os.path.join(args.repo, "components", broker, "pubsub.yaml")).read()
    if broker == "kafka":
        yaml = metadata_value(yaml, "brokers", start_kafka(procs, work, args.kafka_lib))
    else:
        yaml = yaml.rstrip() + (f'\n    - name: endpoint\n      value: "{start_moto(procs, args.moto_server)}"\n'
                                '    - name: accessKey\n      value: "bench"\n    - name: secretKey\n      value: "bench"\n')
    open(os.path.join(components, "pubsub.yaml"), "w").write(yaml)
    return redis_port, components


def wasmsub(args):
    def start(procs, app_port, http_port, grpc_port, work):
        manifest = os.path.join(work, "wasmsub.toml")
        open(manifest, "w").write(
            '[[tenant]]\nname = "todo"\nlimits = { max_concurrency = 32, publish_topics = ["task-audit"] }\n'
            f'[[tenant.handler]]\nname = "task-created"\ncomponent = "{args.component}"\ntopic = "task-created"\n')
        return procs.start("wasmsub", [args.wasmsub, "run", "--manifest", manifest],
                           env={"DAPR_HTTP_PORT": str(http_port), "APP_PORT": str(app_port), "RUST_LOG": "warn",
                                "WASMSUB_LISTEN": f"127.0.0.1:{app_port}", "WASMSUB_DATA_DIR": os.path.join(work, "wasmsub-data")})
    return start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--daprd", required=True)
    parser.add_argument("--wasmsub", required=True, help="the wasmsub binary (release build)")
    parser.add_argument("--component", required=True, help="task_created.wasm")
    parser.add_argument("--kafka-lib", required=True, help="Kafka's jars (scripts/get-kafka.sh)")
    parser.add_argument("--moto-server", required=True, help="moto_server (scripts/get-moto.sh)")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--latency-events", type=int, default=100)
    parser.add_argument("--brokers", default=",".join(BROKERS), help=f"comma-separated, of {', '.join(BROKERS)}")
    args = parser.parse_args()
    args.component = os.path.abspath(args.component)  # the manifest lives in a scratch directory
    brokers = args.brokers.split(",")
    if any(b not in BROKERS for b in brokers) or args.events < 1 or args.latency_events < 1:
        parser.error(f"--brokers takes {', '.join(BROKERS)}; --events and --latency-events at least 1")

    rows = []
    for broker in brokers:
        work = tempfile.mkdtemp(prefix=f"wasmsub-bench-{broker}-")
        procs = run.Processes(work)
        try:
            if hasattr(run, "DAPRD_CONFIG"):  # run.py starts daprd with its own configuration
                args.daprd_config = os.path.join(work, "daprd-config.yaml")
                open(args.daprd_config, "w").write(run.DAPRD_CONFIG)
            redis_port, components = components_for(broker, procs, work, args)
            variant = run.Variant(TITLE[broker], lambda i: f"wasmsub|state|4:todo|task:{i}", wasmsub(args))
            started = time.monotonic()
            rows.append(run.run_variant(args, procs, run.Redis(redis_port), variant, components, work))
            print(f"{TITLE[broker]}: measured in {time.monotonic() - started:.0f} s", file=sys.stderr)
        finally:
            procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    run.print_table(
        f"task-created through daprd, per broker (state store: Redis): {args.events} events for throughput "
        f"from 8 publishers, {args.latency_events} one at a time for latency; CPU per event over the throughput phase "
        f"(the broker's own CPU not included)", rows)


if __name__ == "__main__":
    sys.exit(main())
