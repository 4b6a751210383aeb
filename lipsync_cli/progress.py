"""One progress helper for every long loop, so bars look alike and `--quiet` silences them all.

Quiet mode and the progress listener (the web app's progress display) are context variables, not process
globals: `scope(quiet=..., listener=...)` sets them for one call (a thread, an API call) and restores them after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)
Listener = Callable[[str, float, float | None], None]  # (stage, done, total or None)
_quiet: ContextVar[bool] = ContextVar("lipsync_quiet", default=False)
_listener: ContextVar[Listener | None] = ContextVar("lipsync_progress_listener", default=None)


def set_quiet(quiet: bool) -> None:
    """Quiet from here on in the current context (the CLI: the whole command). Callers that return use `scope`."""
    _quiet.set(quiet)


def is_quiet() -> bool:
    return _quiet.get()


@contextmanager
def scope(quiet: bool | None = None, listener: Listener | None = None) -> Iterator[None]:
    """Quiet mode and/or a progress listener for the calls inside the block only."""
    tokens = []
    if quiet is not None:
        tokens.append((_quiet, _quiet.set(quiet)))
    if listener is not None:
        tokens.append((_listener, _listener.set(listener)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def log(msg: str) -> None:
    """A status line on stderr, unless quiet."""
    if not _quiet.get():
        console.print(msg, highlight=False)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=_quiet.get(),
        transient=False,
    )


@contextmanager
def task(description: str, total: float | None) -> Iterator:
    """`with task("decode", n) as advance: advance(1)` - a single bar."""
    listener = _listener.get()
    done = 0.0
    if listener is not None:
        listener(description, done, total)

    with make_progress() as prog:
        tid = prog.add_task(description, total=total)

        def advance(n: float = 1) -> None:
            nonlocal done
            prog.advance(tid, n)
            done += n
            if listener is not None:
                listener(description, done, total)

        yield advance


def track(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """Iterate with a progress bar (total taken from len() when possible)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as advance:
        for item in items:
            yield item
            advance(1)
