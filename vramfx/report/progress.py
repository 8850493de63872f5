"""Stage-by-stage progress on a terminal, with rich or tqdm when installed, silent otherwise.

Neither library is a vramfx dependency. Progress goes to stderr and only when stderr is a
terminal, so piped or redirected output stays clean.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

log = logging.getLogger(__name__)


class Progress:
    """Shows the stage running now and how long it has run.

    Parameters
    ----------
    enabled:
        ``None`` means: when ``stream`` is a terminal.
    stream:
        Where to draw; stderr by default.

    Examples
    --------
    >>> progress = Progress(enabled=False)
    >>> with progress.stage("capturing"):
    ...     pass
    """

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None):
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self._stream, "isatty", lambda: False)())
        self._draw = _drawer(self._stream) if enabled else None  # None: draw nothing

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """Show ``text`` while the block runs; log its duration at debug level."""
        start = time.perf_counter()
        if self._draw is None:
            yield
        else:
            with self._draw(text):
                yield
        log.debug("%s: %.2f s", text, time.perf_counter() - start)


def _drawer(stream: TextIO) -> Any:
    """A context manager factory drawing one stage (a rich spinner, else a tqdm line), or None."""
    try:
        from rich.console import Console
        from rich.progress import Progress as RichProgress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        @contextlib.contextmanager
        def spinner(text: str) -> Iterator[None]:
            columns = (SpinnerColumn(), TextColumn(f"{text}…"), TimeElapsedColumn())
            with RichProgress(*columns, console=Console(file=stream), transient=True) as bar:
                bar.add_task(text, total=None)
                yield

        return spinner
    except ImportError:
        pass
    try:
        from tqdm import tqdm

        @contextlib.contextmanager
        def bar(text: str) -> Iterator[None]:
            with tqdm(total=None, desc=text, file=stream, leave=False, bar_format="{desc}… {elapsed}"):
                yield

        return bar
    except ImportError:
        return None
