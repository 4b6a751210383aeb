"""Running stages side by side: a decoder thread ahead of its consumer, and a job in its own process.

Threads serve work that waits on pipes or runs in C code that releases the GIL (ffmpeg pipes, OpenCV, mediapipe);
a process serves pure-CPU Python/C work that holds the GIL (pyworld's voice analysis), so it gets the other core.
Both stop cleanly when their consumer stops early or fails: nothing is left running.
"""

from __future__ import annotations

import contextlib
import contextvars
import multiprocessing as mp
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from lipsync_cli import progress

T = TypeVar("T")
_END = object()


class Prefetch(Generic[T]):
    """`with Prefetch(lambda: iter_frames(...), size) as frames: for f in frames: ...` - the source runs in a thread
    at most `size` items ahead (memory bounded); its errors are raised in the consumer; leaving the block stops it
    (a generator source is closed in its own thread, so an ffmpeg it started is killed)."""

    def __init__(self, make: Callable[[], Iterator[T]], size: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        # in the caller's context: --quiet and the progress listener are context variables, which a new thread
        # would otherwise start without (a decoder's note printed under --quiet)
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._run, make), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        try:
            it = make()
            try:
                for x in it:
                    if not self._put((x, None)):
                        return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer
            self._put((_END, e))

    def __iter__(self) -> Iterator[T]:
        while True:
            x, err = self._q.get()
            if x is _END:
                if err is not None:
                    raise err
                return
            yield x

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child(conn, fn: Callable, args: tuple, inbox=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides and kills us
    progress.set_quiet(True)  # the parent's bars own the terminal; warnings still print
    try:
        conn.send((True, fn(*args, inbox.recv) if inbox is not None else fn(*args)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            conn.send((False, e))
        except Exception:  # unpicklable: its text still goes
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """While a job starts, spawn sees no __main__ module: it would re-run the parent's script in the child (to find
    functions defined there), so a user's `lipsync.dub(...)` script without an `if __name__ == "__main__":` guard
    dubbed again in the child, which died. Jobs run lipsync_cli functions only; the child needs nothing from it."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


class Job:
    """`fn(*args)` in a fresh process (spawned: no fork of a parent running threads), started at once.
    `result()` waits and returns its value or raises its exception; `kill()` ends it (all idempotent).

    With `feed=True` the job starts before all its input exists: it is called as `fn(*args, receive)`, and each
    `receive()` returns the next value the parent gives `send()` (so a job can learn a voice while the parent is
    still synthesising the speech it will convert)."""

    def __init__(self, fn: Callable, *args: Any, feed: bool = False):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        inbox, self._outbox = ctx.Pipe(duplex=False) if feed else (None, None)
        self._proc = ctx.Process(target=_child, args=(child, fn, args, inbox), daemon=True)
        with _main_hidden():
            self._proc.start()
        child.close()
        if inbox is not None:
            inbox.close()
        self._senders: list[threading.Thread] = []
        self._done: tuple[bool, Any] | None = None

    def send(self, value: Any) -> None:
        """Give the job its next input, without waiting for it to read it (a pipe holds only 64 KB: the sending is
        done by a thread). A job that has already ended (an error, or no use for the input) is not an error here:
        `result()` tells what happened."""

        def put() -> None:
            with contextlib.suppress(OSError, ValueError):  # the job ended, or was killed, first
                self._outbox.send(value)

        t = threading.Thread(target=put, name="job-send", daemon=True)
        t.start()
        self._senders.append(t)

    def result(self) -> Any:
        if self._done is None:
            try:
                self._done = self._conn.recv()
            except EOFError:
                self._proc.join()
                self._done = (False, RuntimeError(f"background job died (exit code {self._proc.exitcode})"))
            finally:
                self._conn.close()
            self._proc.join()
        ok, value = self._done
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()
        for t in self._senders:  # the job is gone: a pending send fails at once (broken pipe)
            t.join()
        if self._outbox is not None:
            self._outbox.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
