"""SIGTERM and SIGINT as a request the main thread polls for, never as work done inside the handler.

A Python signal handler runs on the main thread between two bytecodes, possibly while that thread holds a
lock. A handler that set a ``threading.Event`` takes the event's own lock (a plain, non-reentrant one),
which the interrupted thread holds for a moment in every ``wait``, ``set`` and ``clear``; one that shut a
scheduler down takes its locks and its thread pool's. Either can deadlock the process until SIGKILL (the
scheduler did, when the signal came as a job was being submitted).

A second Ctrl-C ends the process at once, as a person at a terminal expects when a graceful stop (a ReTrain
finishing its epoch, a database that no longer answers) takes longer than they will wait. With a broker of its
own (Mosquitto) nothing is lost by it: coils not yet acknowledged are redelivered, and the next ReTrain of a
model whose run was cut short marks that run abandoned (its lock died with the process) and starts over. The
embedded broker of ``coilguard up`` lives in the process and goes with it, and with it the coils it holds, as
at any stop of ``up``, and those the worker had taken but not yet stored. A second SIGTERM stays a request;
orchestrators follow theirs with SIGKILL anyway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Iterator

SIGNAL_POLL_S = 0.2  # how soon the main thread notices SIGTERM or Ctrl-C
INTERRUPTED = 130  # 128 + SIGINT: the status a shell gives a process ended by Ctrl-C
AT_ONCE = b"second Ctrl-C: stopping at once (an external broker redelivers the coils not yet acknowledged)\n"


def exit_at_once(*_: object) -> None:
    """The second Ctrl-C's handler. Only calls that take no lock: a raw write to stderr, then ``os._exit``
    (no atexit hooks, no joins: they are what the person is not willing to wait for). The exit does not depend
    on the write: under ``… | tee log`` the first Ctrl-C has already ended the reader, and stderr is a broken
    pipe; under a paused pager the pipe may be full."""
    try:
        if stat.S_ISFIFO(os.fstat(2).st_mode):  # a paused pager (`| less`) with the pipe full must not hold it up;
            os.set_blocking(2, False)  # a terminal is left as it is: the shell shares it and would inherit the mode
        os.write(2, AT_ONCE)
    except OSError:
        pass
    finally:
        os._exit(INTERRUPTED)


def exit_at_once_on_interrupt() -> None:
    """From now on Ctrl-C ends the process at once: for a shutdown already under way."""
    signal.signal(signal.SIGINT, exit_at_once)


class StopSignals:
    """Installs handlers for SIGTERM and SIGINT that only note the request."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)
        return self

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Installed for the block, the handlers before it put back after (Ctrl-C works again)."""
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self.install()
        finally:
            for sig, handler in before.items():
                if handler is not None:  # None: installed outside Python, nothing that can be put back from here
                    signal.signal(sig, handler)

    def _note(self, signum: int, _frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            exit_at_once()
        self.requested = True

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, less if a stop is requested; whether one is."""
        deadline = time.monotonic() + timeout
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, SIGNAL_POLL_S))
        return self.requested
