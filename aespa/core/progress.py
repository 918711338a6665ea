"""Where a quantization run is: a live progress line and one log line per finished loop.

The pipeline owns one :class:`ProgressLine` per run and hands it to every block's
:class:`~aespa.core.pipeline.BlockContext`. ``ctx.phase(name)`` moves it to a phase;
a method opens a task for each long loop, ``ctx.progress(phase, layer=..., total=steps)``,
and reports its steps with ``task.update(step, loss)``, where ``loss`` may be a function,
called only when the line is redrawn (about once a second, and at the first and last
step), so reporting every step costs nothing. The line reads

    block 2/4 · rounding · q k v o up down · step 812/2000 · loss 1.234e-02 · 0:41 · ETA 1:02

(block, phase, layer, step, current loss, elapsed time of the task, estimated time left).
On a terminal it sits under the pipeline's block bar and a background thread redraws it
every ``refresh_s`` seconds, so elapsed time and ETA move even inside a long step or a phase
without steps. Every task writes one line to the log (``logging``, logger
``aespa.progress``) when it ends, and a method may add its own (``task.log``: aespa writes
one per layer). With ``progress=false``, or when the output is not a terminal, there is no
live line: the log gets those lines only.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger("aespa.progress")


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
    """One run's progress line (module docstring); ``live`` only takes effect on a terminal."""

    def __init__(self, live: bool = True, n_blocks: int | None = None, refresh_s: float = 1.0, file=None):
        self.file = sys.stderr if file is None else file
        self.live = bool(live) and hasattr(self.file, "isatty") and self.file.isatty()
        self.n_blocks, self.refresh_s = n_blocks, refresh_s
        self.where, self.started = "", time.monotonic()  # the current block and phase, without a task
        self.task_now: ProgressTask | None = None
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def block_label(self, block: int) -> str:
        return f"block {block + 1}/{self.n_blocks}" if self.n_blocks else f"block {block + 1}"

    def phase(self, block: int, name: str) -> None:
        """The run entered phase ``name`` of ``block`` (0-based)."""
        self.where, self.started, self.task_now = f"{self.block_label(block)} · {name}", time.monotonic(), None
        self.redraw()

    def task(self, block: int, phase: str, layer: str = "", total: int | None = None) -> ProgressTask:
        self.task_now = ProgressTask(self, block, phase, layer, total)
        self.redraw()
        return self.task_now

    def text(self) -> str:
        task = self.task_now
        if task is not None:
            return task.text()
        return f"{self.where} · {clock(time.monotonic() - self.started)}" if self.where else ""

    def redraw(self) -> None:
        if not self.live or self._stop.is_set():
            return
        if self._bar is None:
            self._bar = tqdm(total=0, bar_format="{desc}", file=self.file, leave=False, dynamic_ncols=True)
            self._thread = threading.Thread(target=self._refresh, name="progress-line", daemon=True)
            self._thread.start()
        self._bar.set_description_str(self.text(), refresh=True)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.redraw()

    def write(self, message: str) -> None:
        """One log line (the live line steps aside while it is written)."""
        if self._bar is not None and not self._stop.is_set():
            with tqdm.external_write_mode(file=self.file):
                log.info(message)
        else:
            log.info(message)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        self._bar = self._thread = None


class ProgressTask:
    """A loop of ``total`` steps (or none) on the line; use as a context manager or call
    :meth:`close` (which writes the task's log line)."""

    def __init__(self, line: ProgressLine, block: int, phase: str, layer: str = "", total: int | None = None):
        self.line, self.block, self.phase, self.layer, self.total = line, block, phase, layer, total
        self.started = time.monotonic()
        self.step = 0
        self.loss: float | None = None
        self.first_loss: float | None = None
        self._next_loss = 0.0
        self.closed = False

    @property
    def label(self) -> str:
        return " · ".join(x for x in (self.line.block_label(self.block), self.phase, self.layer) if x)

    def update(self, step: int, loss: float | Callable[[], float] | None = None) -> None:
        """Step ``step`` (1-based) is done; ``loss`` its loss, or a function giving it."""
        self.step = step
        if loss is None:
            return
        now = time.monotonic()
        if step == 1 or step == self.total or now >= self._next_loss:
            self.loss = float(loss() if callable(loss) else loss)
            if self.first_loss is None:
                self.first_loss = self.loss
            self._next_loss = now + self.line.refresh_s

    def text(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [self.label]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        elif self.step:
            parts.append(f"step {self.step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        parts.append(clock(elapsed))
        if self.total and self.step:
            parts.append(f"ETA {clock(elapsed / self.step * (self.total - self.step))}")
        return " · ".join(parts)

    def log(self, message: str) -> None:
        """A log line about this task (e.g. one per layer)."""
        self.line.write(f"{self.label}: {message}")

    def close(self, summary: bool = True) -> None:
        """End the task; with ``summary``, its log line (steps, time, first and last loss)."""
        if self.closed:
            return
        self.closed = True
        if summary:
            seconds = time.monotonic() - self.started
            text = f"{self.step} steps in {seconds:.1f} s" if self.step else f"{seconds:.1f} s"
            if self.step:
                text += f" ({1e3 * seconds / self.step:.2f} ms/step)"
            if self.first_loss is not None:
                text += f", loss {self.first_loss:.4g} -> {self.loss:.4g}"
            self.log(text)
        if self.line.task_now is self:
            self.line.task_now = None
            self.line.redraw()

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc) -> None:
        self.close(summary=exc[0] is None)
