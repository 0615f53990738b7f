"""`--max-memory` and `--timeout`: stop a run cleanly when it outgrows its budget.

A watchdog thread samples the process's resident memory and the clock. When a limit is
passed it signals the main thread (SIGUSR1), whose handler raises `LimitExceeded`: the run
unwinds like any other error, atomic writes remove their temporary files, and the CLI
prints one line and exits 2. Code that sits in one long C call (an onnxruntime session,
a TVM build) cannot be interrupted from Python; if the main thread has not stopped
`GRACE_SECONDS` after the signal, or memory reaches `HARD_FACTOR` times the limit first,
the watchdog removes the temporary paths registered with `discard_on_abort`, prints the
same line and ends the process with exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dsopt.errors import ExitCode, UsageError

__all__ = [
    "GRACE_SECONDS",
    "HARD_FACTOR",
    "LimitExceeded",
    "discard_on_abort",
    "parse_size",
    "resident_bytes",
    "resource_limits",
]

#: Seconds the main thread gets to unwind after the signal before the process ends.
GRACE_SECONDS = 10.0
#: Resident memory, as a multiple of --max-memory, at which the process ends at once.
HARD_FACTOR = 1.25
_POLL_SECONDS = 0.02
_RESIGNAL_SECONDS = 0.5
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_pending: set[Path] = set()
_pending_lock = threading.Lock()


class LimitExceeded(BaseException):
    """The run passed `--max-memory` or `--timeout`; nothing was written.

    Like KeyboardInterrupt it is a BaseException, so no `except Exception` on the way out
    turns it into another error; the CLI prints `message` and `hint` and exits 2.
    """

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes in `text`: `512MB`, `4GB`, `1.5GiB` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(
            f"{option} {text!r} is not a size", hint="write it like 512MB, 4GB or 1.5GiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def resident_bytes() -> int:
    """This process's resident set size now (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


@contextlib.contextmanager
def discard_on_abort(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Registers a temporary file or folder the watchdog deletes if it must end the process."""
    path = Path(path)
    with _pending_lock:
        _pending.add(path)
    try:
        yield path
    finally:
        with _pending_lock:
            _pending.discard(path)


def _size_text(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


class _Watchdog(threading.Thread):
    def __init__(self, max_memory: int | None, timeout: float | None, what: str) -> None:
        super().__init__(name="dsopt-limits", daemon=True)
        self.max_memory, self.timeout, self.what = max_memory, timeout, what
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.reason: str | None = None
        self.signalled_at: float | None = None
        self.last_signal = 0.0
        self.peak = 0

    def run(self) -> None:
        while not self.stop.wait(_POLL_SECONDS):
            rss = resident_bytes()
            self.peak = max(self.peak, rss)
            elapsed = time.monotonic() - self.started
            if self.reason is None:
                self.reason = self._passed(rss, elapsed)
                if self.reason is not None:
                    self.signalled_at = time.monotonic()
                    self._signal()
            elif self._must_end(rss):
                self._end()
            elif time.monotonic() - self.last_signal > _RESIGNAL_SECONDS:
                self._signal()  # code that caught the first LimitExceeded gets another

    def _signal(self) -> None:
        self.last_signal = time.monotonic()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _passed(self, rss: int, elapsed: float) -> str | None:
        if self.max_memory is not None and rss > self.max_memory:
            return (
                f"{self.what}: stopped at {_size_text(rss)} resident memory, over --max-memory "
                f"{_size_text(self.max_memory)}; nothing was written"
            )
        if self.timeout is not None and elapsed > self.timeout:
            return (
                f"{self.what}: stopped after {elapsed:.1f}s, over --timeout {self.timeout:g}s; "
                "nothing was written"
            )
        return None

    def _must_end(self, rss: int) -> bool:
        late = time.monotonic() - (self.signalled_at or 0.0) > GRACE_SECONDS
        huge = self.max_memory is not None and rss > HARD_FACTOR * self.max_memory
        return late or huge

    def _end(self) -> None:
        with _pending_lock:
            for path in list(_pending):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        sys.stderr.write(f"dsopt: error: {self.reason}\n  hint: {_HINT}\n")
        sys.stderr.flush()
        os._exit(int(ExitCode.USAGE_ERROR))


_HINT = "raise --max-memory / --timeout, or lower the work (--samples, fewer passes)"


@contextlib.contextmanager
def resource_limits(
    max_memory: int | None = None, timeout: float | None = None, *, what: str = "dsopt"
) -> Iterator[None]:
    """Runs the body under a resident-memory and wall-clock budget (main thread only).

    Raises:
        LimitExceeded: when either budget is passed; the message names `what` and the limit.
        UsageError: for a non-positive limit or when called off the main thread.
    """
    if max_memory is None and timeout is None:
        yield
        return
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} must be positive", hint="give seconds, e.g. 600")
    if threading.current_thread() is not threading.main_thread():
        raise UsageError("--max-memory/--timeout work only on the main thread")
    if max_memory is not None and resident_bytes() > max_memory:
        raise LimitExceeded(
            f"{what}: dsopt itself already uses {_size_text(resident_bytes())}, over --max-memory "
            f"{_size_text(max_memory)}",
            hint=_HINT,
        )
    watchdog = _Watchdog(max_memory, timeout, what)

    def on_signal(signum: int, frame: object) -> None:
        if watchdog.reason is not None and not watchdog.stop.is_set():
            raise LimitExceeded(watchdog.reason, hint=_HINT)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.stop.set()
        watchdog.join()
        signal.signal(signal.SIGUSR1, previous)
