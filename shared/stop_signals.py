"""SIGTERM and SIGINT as a request to stop, from a service process's first line to its exit.

A stop signal's default action ends the process by the signal (exit status -15), so a
service installs this module's handler before it imports anything slow (its
`__main__`), and the handler stays until the process ends: a signal during start-up,
a second one while stopping, or one after the event loop has closed only notes the
request; `ignore()` keeps the ones that arrive while the process exits from killing it. `ServiceProcess` starts its children with both signals blocked, so a signal
sent before the interpreter reaches `install()` waits for it instead of killing it.

Only the standard library is imported here, so installing costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []
_listeners: list[Callable[[], None]] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    for listener in list(_listeners):
        listener()


def install() -> None:
    """Handles SIGTERM and SIGINT from now on (idempotent); call it from the main thread."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    # Inherited blocked from ServiceProcess: a signal already sent is handled from here on.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore() -> None:
    """Ignores both signals for the rest of the process: call it when done, just before exit.

    At exit the interpreter hands every signal with a Python handler back to its default
    action (but leaves ignored ones ignored) and then still runs for a while (threads,
    finalisers): a signal then would end the process by that signal instead of 0.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def requested() -> bool:
    """Whether a stop signal has arrived since `install()`."""
    return bool(_received)


@contextlib.contextmanager
def setting(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    """While inside, a stop signal (or one received before) sets `stop` on `loop`.

    This does what loop.add_signal_handler does (a wake-up socket, so a signal caught on
    another thread still wakes the loop) without handing the signals back to their
    default action when the loop closes, which would let a late second signal kill the
    process.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    loop.add_reader(reader.fileno(), _drain, reader)

    def listener() -> None:
        loop.call_soon_threadsafe(stop.set)

    _listeners.append(listener)
    if _received:
        stop.set()
    try:
        yield
    finally:
        _listeners.remove(listener)
        signal.set_wakeup_fd(previous)
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def _drain(reader: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while reader.recv(64):
            pass
