"""Progress of the slow steps the Python API takes: capture, planning, conversion, first loads.

Capturing and planning a 12B model take tens of seconds inside the first call, while a
pipeline's own progress bar sits at 0%. A step that runs longer than :data:`SHOW_AFTER_S` shows
a tqdm line on stderr (its name, elapsed time, and a count where the step has one) until it
ends; quicker steps show nothing. tqdm is optional (the ``progress`` extra); without it steps
are only logged, at debug level, with their duration.

Silenced by ``VRAMFX_PROGRESS=0``, by the switches other libraries' bars honour
(``HF_HUB_DISABLE_PROGRESS_BARS=1``, ``TQDM_DISABLE=1``), and by setting the ``vramfx`` logger
above ``WARNING`` (``logging.getLogger("vramfx").setLevel(logging.ERROR)``). ``VRAMFX_PROGRESS=1``
shows them even where those say otherwise.

Examples
--------
>>> with step("planning", total=3) as advance:
...     for _ in range(3):
...         advance()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

#: Steps quicker than this show nothing.
SHOW_AFTER_S = 2.0
#: How often a shown step's elapsed time is redrawn.
REDRAW_S = 0.5

_TRUE = {"1", "true", "yes", "on"}


def enabled() -> bool:
    """Whether slow steps show progress now (the switches in the module docstring)."""
    own = os.environ.get("VRAMFX_PROGRESS")
    if own is not None:
        return own.strip().lower() in _TRUE
    for switch in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        if os.environ.get(switch, "").strip().lower() in _TRUE:
            return False
    return logging.getLogger("vramfx").getEffectiveLevel() <= logging.WARNING


@contextlib.contextmanager
def step(text: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Run a block as one named step; yields ``advance(n=1)`` for steps with a ``total`` count.

    The step's line appears once it has run :data:`SHOW_AFTER_S` and goes when it ends; its
    duration is logged at debug level either way.
    """
    start = time.perf_counter()
    shown = _Shown(text, total) if enabled() else None
    try:
        yield shown.advance if shown is not None else _ignore
    finally:
        if shown is not None:
            shown.close()
        log.debug("%s: %.2f s", text, time.perf_counter() - start)


def _ignore(n: int = 1) -> None:
    pass


class _Shown:
    """A tqdm line drawn by a timer thread once the step is slow, redrawn until closed."""

    def __init__(self, text: str, total: int | None) -> None:
        self._text, self._total = text, total
        self._done = 0
        self._bar = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vramfx-progress", daemon=True)
        self._thread.start()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _run(self) -> None:
        if self._closed.wait(SHOW_AFTER_S):
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            log.info("%s… (pip install tqdm to see progress)", self._text)
            return
        with self._lock:
            fmt = None if self._total is not None else "{desc}… {elapsed}"
            self._bar = tqdm(total=self._total, desc=f"vramfx: {self._text}", file=sys.stderr, leave=False,
                             bar_format=fmt, initial=self._done, disable=False)
            self._bar.start_t -= SHOW_AFTER_S  # elapsed counts from the step's start
            self._bar.refresh()
        while not self._closed.wait(REDRAW_S):
            with self._lock:
                self._bar.refresh()
        with self._lock:
            self._bar.close()
            self._bar = None
