"""Stop requests: the first asks for a graceful stop, a second Ctrl-C ends the process at once.

Each case runs in a child process that signals itself: the handler under test ends that process, and a
signal sent inside pytest's own would end the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from services.signals import AT_ONCE, INTERRUPTED


def _child(body: str) -> subprocess.CompletedProcess[str]:
    script = "import os, signal\nfrom services import signals\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])
def test_a_second_ctrl_c_during_a_graceful_stop_ends_the_process_at_once(first: str) -> None:
    done = _child(f"""
        stop = signals.StopSignals().install()
        os.kill(os.getpid(), signal.{first})
        print("requested", stop.requested, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # the person does not want to wait for the shutdown
        print("still running", flush=True)
    """)
    assert done.returncode == INTERRUPTED, done.stderr
    assert done.stdout.splitlines() == ["requested True"]
    assert AT_ONCE.decode() in done.stderr


def test_a_second_sigterm_stays_a_request() -> None:
    """An orchestrator's signal: it follows with SIGKILL when it wants the process gone; the stop stays graceful."""
    done = _child("""
        stop = signals.StopSignals().install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still running", stop.requested, flush=True)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["still running True"]


def test_once_a_shutdown_is_under_way_ctrl_c_ends_it_at_once() -> None:
    """What ``coilguard up`` installs once its API server has stopped and the slower parts wind down."""
    done = _child("""
        signals.exit_at_once_on_interrupt()
        os.kill(os.getpid(), signal.SIGINT)
        print("still running", flush=True)
    """)
    assert done.returncode == INTERRUPTED, done.stderr
    assert done.stdout == "" and AT_ONCE.decode() in done.stderr


def test_the_second_ctrl_c_ends_the_process_even_when_stderr_is_a_broken_pipe() -> None:
    """``coilguard up 2>&1 | tee up.log``: the first Ctrl-C ends ``tee`` too, and the handler's message cannot be
    written; the exit must not depend on it."""
    done = _child("""
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 2)  # what stderr is once the reader has gone
        stop = signals.StopSignals().install()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        print("still running", flush=True)
    """)
    assert done.returncode == INTERRUPTED and done.stdout == ""


def test_the_second_ctrl_c_ends_the_process_even_when_stderr_is_a_full_pipe() -> None:
    """``coilguard up 2>&1 | less`` with the pager paused: the pipe is full and a plain write would wait."""
    done = _child("""
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            while True:
                os.write(write, b"x" * 4096)
        except BlockingIOError:
            pass
        os.set_blocking(write, True)
        os.dup2(write, 2)  # the reader is alive and reads nothing
        stop = signals.StopSignals().install()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        print("still running", flush=True)
    """)
    assert done.returncode == INTERRUPTED and done.stdout == ""
