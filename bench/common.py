"""Shared pieces of the benchmarks: the machine, a scratch database, and writing figures to docs/benchmarks.md."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_MQTT = "mqtt://127.0.0.1:1883"


X86_FIELDS = ("cpu family", "model", "stepping")
ARM_FIELDS = ("CPU implementer", "CPU part", "CPU variant", "CPU revision")


def cpu_identity() -> str:
    """The CPU model behind the often generic model name, and ATen's vector dispatch level on it. The same seed
    trained a different network on another CPU model (docs/benchmarks.md, the tile section), most likely because
    the kernels sum in another order and 80 epochs carry the rounding apart; so a CPU figure names the model."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", *X86_FIELDS, *ARM_FIELDS):
                fields.setdefault(key.strip(), value.strip())
            elif not line.strip() and fields:
                break  # the first processor's block is enough
    name = fields.get("model name") or platform.processor() or platform.machine()
    for names in (X86_FIELDS, ARM_FIELDS):
        if names[0] in fields:
            name += ", " + " ".join(
                f"{k.removeprefix('CPU ').removeprefix('cpu ')} {fields.get(k, '?')}" for k in names
            )
    with contextlib.suppress(ImportError):
        import torch

        name += f", ATen dispatch {torch.backends.cpu.get_cpu_capability()}"
    return name


def machine() -> str:
    """One line naming the machine a figure was measured on."""
    try:
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
        torch_version = f", torch {torch.__version__}"
    except ImportError:
        gpu = torch_version = ""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu_identity()}), {mem_gib:.0f} GiB RAM{gpu}, "
        f"Python {platform.python_version()}{torch_version}"
    )


def command_line() -> str:
    return " ".join([".venv/bin/python", *[a if " " not in a else repr(a) for a in sys.argv]])


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def write_section(key: str, body: str) -> None:
    """Replace the section between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in docs/benchmarks.md
    (appending it when absent), so each benchmark owns its part and reruns overwrite their own figures."""
    BENCHMARKS_MD.parent.mkdir(exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"<!-- {key}:begin -->\n{body.strip()}\n<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(key)}:begin -->.*?<!-- {re.escape(key)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def code_version() -> str:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout
    return commit.strip() or "unknown"


def provenance() -> str:
    return f"Measured {today()} on {machine()}; code {code_version()}.\n\nCommand: `{command_line()}`"


def threads_label(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}"


def cpu_threads_note(threads: int) -> str:
    """Why the training times are what they are: no GPU here, and how many CPU threads torch had."""
    return (
        f"No GPU in this session: training times are CPU with {threads_label(threads)} "
        f"(`torch.set_num_threads({threads})`); other jobs on the machine make them upper bounds."
    )


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """The training benchmarks' ``--threads``; 1 keeps their figures comparable with the 2026-11-23 runs."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: as the 2026-11-23 figures)")


@contextlib.contextmanager
def scratch_database(admin_url: str = LOCAL_POSTGRES) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from services.db.migrate import upgrade

    name = f"coilguard_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[int, float]:
    import numpy as np

    if not values:
        return {p: float("nan") for p in points}
    return {p: float(np.percentile(values, p)) for p in points}


# What a broker needs from deploy/mosquitto/mosquitto.conf to carry coilguard's load: queue and in-flight
# limits, packet size, no Nagle. Authentication, ACLs and container paths are left out.
BROKER_TUNING = (
    "max_queued_messages",
    "max_queued_bytes",
    "max_inflight_messages",
    "max_packet_size",
    "set_tcp_nodelay",
)


@contextlib.contextmanager
def own_mosquitto() -> Iterator[str | None]:
    """A private Mosquitto with the deployment's tuning on a free port (None when mosquitto is missing).

    The machine's own broker runs with Mosquitto's defaults (20 messages in flight per client, Nagle
    on), which is not how coilguard is deployed; measuring against it would measure those defaults.
    """
    import shutil
    import socket
    import tempfile
    import time

    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if binary is None:
        yield None
        return
    deployed = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    tuning = [line for line in deployed if line.split(" ", 1)[0] in BROKER_TUNING]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true"]
        conf.write_text("\n".join([*lines, f"persistence_location {tmp}/", *tuning, ""]))
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                time.sleep(0.1)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)
