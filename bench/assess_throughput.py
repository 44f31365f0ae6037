"""AssessCoils throughput and latency on real Mosquitto and PostgreSQL (issue 3's benchmark).

(a) compute limit: the serving ensemble's batched inference in one process, coils/s, measured before and
    after (b) (the machine's speed drifts; (c) uses their mean);
(b) end to end: coils published on MQTT, assessed by a running ``coilguard assess``, committed to
    PostgreSQL and announced: sustained coils/s (closed loop, at most ``--window`` coils outstanding
    so that the broker's queue never overflows), and publish→decision latency p50/p95/p99 at a fixed
    offered rate (open loop);
(c) the ratio (b)/(a).
With ``--workers N``, N workers share the stream, and (a') and (c') repeat (a) and (c) for N processes
voting at once.
(d) CPU per coil: the workers' processes during (b) against the processes of (a') (of (a) with one worker),
    and how busy the machine's cores were during (b), the workers apart from everything else;
(e) their ratio: the share of the compute limit the workers' own overheads leave, i.e. what (c') would be
    with the cores to themselves (broker, database and the benchmark's clients on other machines, as in a
    plant). An estimate from CPU time, not a run on such a machine.

    .venv/bin/python bench/assess_throughput.py                      # CNN-only ensemble
    .venv/bin/python bench/assess_throughput.py --ensemble cnn,yolo,effnet,siamese
    .venv/bin/python bench/assess_throughput.py --ensemble cnn,yolo,effnet,siamese --workers 2   # as on k8s

Everything runs on this machine: publisher, worker, PostgreSQL and Mosquitto share its cores, as
they would on a single-box install.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import psutil
import torch
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import func, select

from bench.common import LOCAL_MQTT, own_mosquitto, percentiles, provenance, scratch_database, write_section
from ml.assessors.base import AssessBatch
from ml.assessors.registry import create
from ml.ensemble import Ensemble, share_threads
from ml.sim import LineConfig, LineSimulator
from services.config import Settings
from services.db.engine import make_engine
from services.db.models import Coil, Worker
from services.db.repositories import SqlModelRegistry
from services.mqtt.client import Inbound, MqttClient, forget_session
from workflows.assess import EnsembleLoader
from workflows.messages import encode_coil_message
from workflows.topics import Topics
from workflows.training import register

console = Console()

# Small training runs: the weights do not matter for speed, the network sizes do (default settings).
QUICK_TRAINING = {"cnn": {"epochs": 1}, "yolo": {"epochs": 1}, "effnet": {"epochs": 1}, "siamese": {"epochs": 1}}


def build_registry(database_url: str, model_dir: Path, kinds: list[str]) -> None:
    data = LineSimulator(LineConfig(seed=3, id_prefix="BENCHTRAIN")).dataset(600)
    registry = SqlModelRegistry(make_engine(database_url))
    for kind in kinds:
        assessor = create(kind, QUICK_TRAINING.get(kind, {}))
        console.print(f"training a throw-away {kind} (default network size) …")
        assessor.fit(data, device="cpu")
        register(assessor, registry, model_dir, status="active")


@dataclass(frozen=True)
class Limit:
    """A compute limit: coils/s, and the CPU seconds its process(es) spent per coil, every thread counted."""

    rate: float
    cpu_per_coil: float


def compute_limit(database_url: str, model_dir: Path, matrices: np.ndarray, batch_size: int, shards: int) -> Limit:
    shards = share_threads(shards)  # as the worker does, so that (a) and (b) run the same inference
    serving = EnsembleLoader(SqlModelRegistry(make_engine(database_url)), model_dir, shards=shards).load()
    ensemble = serving.ensemble
    ensemble.predict_arrays(AssessBatch(matrices[:batch_size]))  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    vote_all(ensemble, matrices, batch_size)
    return Limit(len(matrices) / (time.perf_counter() - started), (time.process_time() - cpu) / len(matrices))


def vote_all(ensemble: Ensemble, matrices: np.ndarray, batch_size: int) -> None:
    for first in range(0, len(matrices), batch_size):
        ensemble.predict_arrays(AssessBatch(matrices[first : first + batch_size]))


def threads_per_worker(workers: int) -> int:
    """The cores shared out among ``workers`` processes, as ``--workers`` runs them."""
    return max(1, (os.cpu_count() or 1) // workers)


def _limit_share(
    database_url: str, model_dir: Path, matrices: np.ndarray, batch_size: int, threads: int, start: Any, out: Any
) -> None:
    """One process's share of :func:`parallel_compute_limit`: load, warm up, wait for the others, vote."""
    torch.set_num_threads(threads)
    ensemble = EnsembleLoader(SqlModelRegistry(make_engine(database_url)), model_dir).load().ensemble
    ensemble.predict_arrays(AssessBatch(matrices[:batch_size]))  # warm-up
    start.wait()
    cpu = time.process_time()
    vote_all(ensemble, matrices, batch_size)
    out.put((time.time(), time.process_time() - cpu))


def parallel_compute_limit(
    database_url: str, model_dir: Path, matrices: np.ndarray, batch_size: int, processes: int
) -> Limit:
    """The compute limit of ``processes`` processes voting at once, the cores shared out among them as the
    workers of ``--workers`` share them: what those workers could reach with nothing else to do."""
    threads = threads_per_worker(processes)
    context = multiprocessing.get_context("spawn")  # a fresh torch in each, not a fork of this one's threads
    start, out = context.Barrier(processes + 1), context.Queue()
    parts = np.array_split(matrices, processes)
    children = [
        context.Process(target=_limit_share, args=(database_url, model_dir, part, batch_size, threads, start, out))
        for part in parts
    ]
    for child in children:
        child.start()
    start.wait(timeout=300)
    started = time.time()
    finished, cpu = zip(*(out.get(timeout=600) for _ in children), strict=True)
    for child in children:
        child.join()
    return Limit(len(matrices) / (max(finished) - started), sum(cpu) / len(matrices))


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the workers' processes (all their threads) and by the whole machine."""

    workers: float
    machine: float

    @classmethod
    def take(cls, pids: list[int]) -> CpuSample:
        workers = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)  # user + system
        t = psutil.cpu_times()
        # work done on the cores; idle, I/O wait and time the hypervisor stole are not (guest is inside user)
        busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return cls(workers, busy)

    def until(self, later: CpuSample) -> CpuSample:
        return CpuSample(later.workers - self.workers, later.machine - self.machine)


class DecisionClock:
    """Subscribed to the decision topic: records when each coil's decision arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.changed = threading.Condition()

    def on_message(self, message: Inbound) -> None:
        now = time.perf_counter()
        coil_id = orjson.loads(message.payload)["coil_id"]
        with self.changed:
            self.arrived.setdefault(coil_id, now)
            self.changed.notify_all()

    def count(self) -> int:
        return len(self.arrived)

    def wait_for(self, count: int, timeout: float) -> bool:
        """Until ``count`` decisions have arrived. The publisher sleeps here rather than polling: on two cores
        its polling took CPU from the workers it was measuring."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.arrived) >= count, timeout)


def compute_limits(
    args: argparse.Namespace, database_url: str, model_dir: Path, matrices: np.ndarray
) -> tuple[Limit, Limit | None]:
    """(a), and with several workers (a') too (None without)."""
    limit = compute_limit(database_url, model_dir, matrices, args.batch_size, args.shards)
    console.print(f"(a) compute limit: {limit.rate:.0f} coils/s, {limit.cpu_per_coil * 1e3:.2f} ms of CPU a coil")
    if args.workers == 1:
        return limit, None
    parallel = parallel_compute_limit(database_url, model_dir, matrices, args.batch_size, args.workers)
    console.print(
        f"(a') compute limit of {args.workers} processes at once: {parallel.rate:.0f} coils/s, "
        f"{parallel.cpu_per_coil * 1e3:.2f} ms of CPU a coil"
    )
    return limit, parallel


def wait_until_serving(database_url: str, workers: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until every worker's heartbeat row is there: it writes it once subscribed with its models loaded, so
    that no worker joins the shared subscription halfway through the closed loop."""
    engine = make_engine(database_url)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is not None:
                raise RuntimeError("a worker exited:\n" + log.read_text()[-3000:])
        with engine.connect() as conn:
            serving = conn.execute(select(func.count()).select_from(Worker).where(Worker.kind == "assess")).scalar_one()
        if serving >= len(workers):
            return
        time.sleep(0.5)
    raise RuntimeError(f"only {serving} of {len(workers)} workers came up:\n" + logs[0].read_text()[-3000:])


def closed_loop(
    pub: MqttClient, topics: Topics, payloads: list[tuple[str, str, bytes]], clock: DecisionClock, window: int
) -> float:
    """Publish keeping at most ``window`` coils outstanding; coils/s between the 10 % and 90 % decisions."""
    base = clock.count()
    n = len(payloads)
    with Progress(transient=True) as progress:
        task = progress.add_task("end to end, closed loop", total=n)
        for i, (_, line, payload) in enumerate(payloads):
            if not clock.wait_for(base + i - window + 1, timeout=120):
                break  # the worker stopped deciding; reported below as coils not decided
            pub.publish(topics.sensors(line), payload)
            progress.update(task, completed=clock.count() - base)
        deadline = time.monotonic() + 120
        while clock.count() - base < n and time.monotonic() < deadline:
            time.sleep(0.01)
            progress.update(task, completed=clock.count() - base)
    times = sorted(clock.arrived[c] for c, _, _ in payloads if c in clock.arrived)
    if len(times) < n:
        raise RuntimeError(f"only {len(times)} of {n} coils were decided")
    lo, hi = int(0.1 * n), int(0.9 * n)
    return (hi - lo) / (times[hi] - times[lo])


def open_loop(
    pub: MqttClient, topics: Topics, payloads: list[tuple[str, str, bytes]], clock: DecisionClock, rate: float
) -> list[float]:
    sent: dict[str, float] = {}
    started = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task(f"latency at {rate:g} coils/s", total=len(payloads))
        for i, (coil_id, line, payload) in enumerate(payloads):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[coil_id] = time.perf_counter()
            pub.publish(topics.sensors(line), payload)
            progress.advance(task)
    deadline = time.monotonic() + 60
    while any(c not in clock.arrived for c in sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [1000 * (clock.arrived[c] - t) for c, t in sent.items() if c in clock.arrived]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", default="cnn", help="comma-separated assessor kinds")
    parser.add_argument("--coils", type=int, default=4000, help="coils for the throughput run")
    parser.add_argument("--latency-coils", type=int, default=1500, help="coils for the latency run")
    parser.add_argument("--rate", type=float, default=50.0, help="offered rate of the latency run, coils/s")
    parser.add_argument("--window", type=int, default=600, help="coils outstanding in the closed loop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--shards",
        type=int,
        default=Settings.model_fields["inference_shards"].default,
        help="threads each batch is split over, in the worker and in the compute limit alike (the worker's default)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the stream (MQTT shared subscription), the cores divided among them; "
        "with more than one, each votes its batches whole on its share of the cores",
    )
    parser.add_argument("--binary", action="store_true", help="publish thickness_b64 instead of nested lists")
    parser.add_argument(
        "--mqtt",
        default="own",
        help="broker URL, or 'own': a private Mosquitto with deploy/mosquitto/mosquitto.conf's tuning (default)",
    )
    parser.add_argument(
        "--profile",
        help="record the worker with py-spy into this file: collapsed stacks per thread, idle included "
        "(py-spy is not a dependency: `.venv/bin/pip install py-spy`)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        parser.error("--profile needs py-spy beside this Python: .venv/bin/pip install py-spy")
    with contextlib.ExitStack() as stack:
        if args.mqtt == "own":
            url = stack.enter_context(own_mosquitto())
            args.broker = "a private Mosquitto tuned as deploy/mosquitto/mosquitto.conf"
            args.mqtt = url or LOCAL_MQTT
            if url is None:
                args.broker = f"the broker at {LOCAL_MQTT} (no mosquitto binary to start a tuned one)"
        else:
            args.broker = f"the broker at {args.mqtt}"
        run(args)


def serving_setup(args: argparse.Namespace) -> str:
    if args.workers == 1:
        return f"One worker, batch size {args.batch_size}, split over {args.shards} inference thread(s)"
    threads = threads_per_worker(args.workers)
    return (
        f"{args.workers} workers sharing the stream, batch size {args.batch_size} each, voted whole on "
        f"{threads} inference thread(s) each (the compute limit: one process, split over {args.shards})"
    )


def run(args: argparse.Namespace) -> None:
    kinds = [k.strip() for k in args.ensemble.split(",") if k.strip()]

    sim = LineSimulator(LineConfig(seed=77, id_prefix=f"B{os.getpid()}"))
    coils = list(itertools.islice(sim.stream(), args.coils + args.latency_coils))
    payloads = [
        (
            c.coil_id,
            c.line,
            encode_coil_message(c.coil_id, c.line, c.produced_at, c.thickness, product=c.product, binary=args.binary),
        )
        for c in coils
    ]
    matrices = np.stack([c.thickness for c in coils[: args.coils]])

    with scratch_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "models"
        build_registry(database_url, model_dir, kinds)
        limits = [compute_limits(args, database_url, model_dir, matrices)]

        prefix = f"bench{os.getpid()}"
        client_ids = [f"bench-assess-{os.getpid()}-{i}" for i in range(args.workers)]
        env = {
            **os.environ,
            "COILGUARD_DATABASE_URL": database_url,
            "COILGUARD_MQTT_URL": args.mqtt,
            "COILGUARD_MQTT_TOPIC_PREFIX": prefix,
            "COILGUARD_MODEL_DIR": str(model_dir),
            "COILGUARD_BATCH_SIZE": str(args.batch_size),
            "COILGUARD_INFERENCE_SHARDS": str(args.shards),
            "COILGUARD_LOG_LEVEL": "WARNING",
        }
        if args.workers > 1:  # the cores shared out between processes instead of between shard threads
            env["COILGUARD_INFERENCE_SHARDS"] = "1"
            env["COILGUARD_TORCH_THREADS"] = str(threads_per_worker(args.workers))
        topics = Topics(prefix)
        clock = DecisionClock()
        logs = [Path(tmp) / f"assess-{i}.log" for i in range(args.workers)]
        workers = []
        for client_id, log in zip(client_ids, logs, strict=True):
            with open(log, "wb") as out:
                worker_env = {**env, "COILGUARD_MQTT_CLIENT_ID": client_id}
                workers.append(
                    subprocess.Popen([sys.executable, "-m", "services.cli", "assess"], env=worker_env, stderr=out)
                )
        try:
            with MqttClient(args.mqtt, on_message=clock.on_message) as sub, MqttClient(args.mqtt) as pub:
                sub.subscribe(topics.all_decisions)
                wait_until_serving(database_url, workers, logs)
                warm = payloads[-1]  # re-sent until decided: the worker's session exists only once it is up
                deadline = time.monotonic() + 120
                while warm[0] not in clock.arrived and time.monotonic() < deadline:
                    pub.publish(topics.sensors(warm[1]), warm[2])
                    time.sleep(1.0)
                if warm[0] not in clock.arrived:
                    raise RuntimeError("no decision came back:\n" + logs[0].read_text()[-3000:])
                if args.profile:  # sample the worker (all threads, idle too) while it is under load
                    py_spy = Path(sys.executable).parent / "py-spy"
                    profiler = subprocess.Popen(
                        [str(py_spy), "record", "--pid", str(workers[0].pid), "--duration", "10", "--nonblocking",
                         "--idle", "--threads", "-r", "200", "-f", "raw", "-o", args.profile],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                pids = [worker.pid for worker in workers]
                before, loop_started = CpuSample.take(pids), time.perf_counter()
                sustained = closed_loop(pub, topics, payloads[: args.coils], clock, args.window)
                loop_seconds = time.perf_counter() - loop_started
                used = before.until(CpuSample.take(pids))
                if args.profile:
                    profiler.wait(60)
                console.print(f"(b) end to end: {sustained:.0f} coils/s sustained")
                latencies = open_loop(pub, topics, payloads[args.coils : -1], clock, args.rate)
        finally:
            for worker in workers:
                worker.terminate()
            for worker, client_id in zip(workers, client_ids, strict=True):
                worker.wait(60)
                forget_session(args.mqtt, client_id)
        with make_engine(database_url).connect() as conn:
            stored = conn.execute(select(func.count(Coil.coil_id))).scalar_one()
        limits.append(compute_limits(args, database_url, model_dir, matrices))
    # the VM's speed drifts by a tenth within minutes: the limits bracket the end-to-end run, and (c) takes their mean
    limit = statistics.mean(one.rate for one, _ in limits)
    parallel = statistics.mean(many.rate for _, many in limits if many) if args.workers > 1 else None
    measured = " and ".join(f"{one.rate:.0f}" for one, _ in limits)
    lost = args.coils + args.latency_coils - int(stored)
    pct = percentiles(latencies)
    ratio = sustained / limit
    console.print(
        f"(b) latency at {args.rate:g} coils/s: p50 {pct[50]:.1f} ms, p95 {pct[95]:.1f} ms, p99 {pct[99]:.1f} ms"
    )
    console.print(
        f"(c) end to end / compute limit ({measured} before and after): {ratio:.0%}; coils not stored: {lost}"
    )
    parallel_rows = ""
    if parallel is not None:
        console.print(f"(c') end to end / compute limit of {args.workers} processes: {sustained / parallel:.0%}")
        parallel_rows = (
            f"| (a') compute limit, {args.workers} processes voting at once, likewise | {parallel:.0f} coils/s | |\n"
            f"| (c') end to end / (a') | {sustained / parallel:.0%} | |\n"
        )
    cpu_rows = cpu_figures(args, limits, used, loop_seconds)

    ensemble_name = "+".join(kinds)
    processes = "workers" if args.workers > 1 else "worker"
    workers_title = f", {args.workers} workers" if args.workers > 1 else ""
    payload_kind = "thickness_b64" if args.binary else "nested-list JSON"
    lat = f"{pct[50]:.1f} / {pct[95]:.1f} / {pct[99]:.1f} ms"
    body = f"""
### AssessCoils throughput, ensemble `{ensemble_name}`, {payload_kind}{workers_title}

| figure | value | target |
| --- | --- | --- |
| (a) compute limit, batched inference in one process, before and after (b) | {limit:.0f} coils/s ({measured}) | |
| (b) end to end, sustained (MQTT → worker → PostgreSQL → MQTT) | {sustained:.0f} coils/s | ≥ 500 coils/s (CNN-only) |
| (b) publish→decision latency at {args.rate:g} coils/s, p50 / p95 / p99 | {lat} | p99 ≤ 50 ms |
| (c) end to end / compute limit | {ratio:.0%} | ≥ 85 % (full ensemble) |
{parallel_rows}{cpu_rows}| coils published / stored | {args.coils + args.latency_coils} / {stored} | all |

{serving_setup(args)}; closed loop with {args.window}
coils outstanding, {args.coils} coils;
latency over {len(latencies)} coils offered at {args.rate:g}/s. Publisher, {processes}, PostgreSQL 15 and
Mosquitto 2.0 on the same machine; the broker is {args.broker}.

{provenance()}
"""
    if not args.no_write:
        workers_key = f"-{args.workers}workers" if args.workers > 1 else ""
        write_section(f"assess-throughput-{ensemble_name}-{'b64' if args.binary else 'json'}{workers_key}", body)
        console.print("written to docs/benchmarks.md")


def cpu_figures(
    args: argparse.Namespace, limits: list[tuple[Limit, Limit | None]], used: CpuSample, seconds: float
) -> str:
    """(d) and (e) as table rows: why (c) falls short, split into the workers' own overhead and the CPU that
    the broker, the database and the benchmark's clients take from them on a shared machine."""
    # the limit whose processes vote the way the workers do: (a') with several workers, (a) with one
    reference = statistics.mean((many if many is not None else one).cpu_per_coil for one, many in limits)
    label, share_label = ("(a')", "(c')") if args.workers > 1 else ("(a)", "(c)")
    per_coil = used.workers / args.coils
    share = reference / per_coil
    cores = os.cpu_count() or 1
    busy, rest = used.workers / seconds, (used.machine - used.workers) / seconds
    console.print(
        f"(d) CPU a coil: workers {per_coil * 1e3:.2f} ms, {label} {reference * 1e3:.2f} ms; during (b) the workers "
        f"kept {busy:.2f} and the rest {rest:.2f} of {cores} cores busy"
    )
    console.print(f"(e) the workers' own share of the compute limit: {share:.0%}")
    return (
        f"| (d) CPU a coil, every thread: the workers during (b) / the processes of {label} | "
        f"{per_coil * 1e3:.2f} / {reference * 1e3:.2f} ms | |\n"
        f"| (d) cores kept busy over the closed loop, ramp and drain included: the workers / everything else "
        f"(broker, database, the benchmark) | "
        f"{busy:.2f} / {rest:.2f} of {cores} | |\n"
        f"| (e) {label}'s CPU a coil / the workers': {share_label} with the cores to themselves, estimated "
        f"| {share:.0%} | |\n"
    )


if __name__ == "__main__":
    main()
