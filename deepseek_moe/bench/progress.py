"""Progress of a benchmark run on stderr: a rich bar on a terminal, plain flushed lines elsewhere (a log, a pipe,
CI), nothing with ``--no-progress``."""
from __future__ import annotations

import sys
from typing import Optional, TextIO


class Progress:
    """Counts the timed samples of a run and reports each one as it finishes.

    ``style``: "bar" (rich, transient), "lines" (``[3/12] fwdbwd T=2048 float32 deepseek-64x+2 [torch]: 0.123 s``
    per sample, flushed) or "off". Untimed work (warm-up calls, memory probes) moves the bar but prints no line.
    """

    def __init__(self, samples: int, steps: int, style: str, stream: Optional[TextIO] = None):
        self.samples, self.steps, self.style = samples, steps, style
        self.stream = stream or sys.stderr
        self.done = 0
        self._bar = self._task = None

    @classmethod
    def for_stream(cls, samples: int, steps: int, enabled: bool, stream: Optional[TextIO] = None) -> "Progress":
        """The bar when ``stream`` (default stderr) is a terminal and rich is installed, else lines; off unless
        ``enabled``."""
        stream = stream or sys.stderr
        if not enabled:
            return cls(samples, steps, "off", stream)
        if stream.isatty():
            try:
                import rich  # noqa: F401
                return cls(samples, steps, "bar", stream)
            except ImportError:
                pass
        return cls(samples, steps, "lines", stream)

    def __enter__(self) -> "Progress":
        if self.style == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
            self._bar = Bar(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True, console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task("benchmark", total=self.steps)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def note(self, text: str) -> None:
        """Untimed work under way: the bar's description, or a line."""
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        elif self.style == "lines":
            print(text, file=self.stream, flush=True)

    def advance(self, steps: int) -> None:
        """``steps`` of untimed work done (the bar only)."""
        if self._bar is not None:
            self._bar.update(self._task, advance=steps)

    def sample(self, what: str, seconds: float) -> None:
        """One timed sample of ``what`` done, ``seconds`` per call."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=what)
        elif self.style == "lines":
            print(f"[{self.done}/{self.samples}] {what}: {seconds:.4g} s", file=self.stream, flush=True)
