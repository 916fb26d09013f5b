"""The sweep's stderr chatter: one line per row, and a progress bar under them on a terminal.

A GPU sweep (docs/design.md §6: 7 T × routings × passes × variants × backends) runs for
minutes and its per-row lines scroll by; the bar says how many cells are done and which one is
running.
It is drawn only when the stream is a TTY: a log file or a pipe (CI, `2> log`) gets the
plain lines and no carriage returns. `stream=None` (`--quiet`) silences everything.

Written here rather than taken from tqdm so the suite needs nothing beyond torch.
"""
import os
import time


def _is_tty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream):
    """Terminal width of `stream`: a bar wider than that wraps, and `\\r` then redraws only its
    last row, leaving a trail of stale bars."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80
    return columns if columns > 0 else 80  # a fresh pty reports 0 x 0 until someone sets it


def format_elapsed(seconds):
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Lines via `write`, progress via `step` (a cell begins) and `close` (all done).

    enabled: None draws the bar when `stream` is a TTY; False never draws it (the lines still
    go out); True forces it (tests). A disabled bar writes no `\\r` at all.
    """

    def __init__(self, total, stream, enabled=None, width=24, clock=time.monotonic):
        self.total = max(int(total), 0)
        self.stream = stream
        self.enabled = stream is not None and (_is_tty(stream) if enabled is None else enabled)
        self.width = width
        self.clock = clock
        self.started = 0  # cells begun; the one in progress is not yet done
        self.label = ""
        self.t0 = clock()
        self._shown = 0  # length of the bar now on screen, 0 when none is

    @property
    def done(self):
        return max(self.started - 1, 0)

    def render(self):
        """The bar as one line (no `\\r`), cut to the terminal's width."""
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        text = (f"{self.done:>{len(str(self.total))}}/{self.total} "
                f"[{'#' * fill}{'.' * (self.width - fill)}] {100 * frac:3.0f}% "
                f"{format_elapsed(self.clock() - self.t0)}  {self.label}")
        return text[:max(_columns(self.stream) - 1, 10)].rstrip()

    def _clear(self):
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _draw(self):
        text = self.render()
        self.stream.write("\r" + text + " " * max(self._shown - len(text), 0))
        self._shown = len(text)
        self.stream.flush()

    def step(self, label=""):
        """Cell number `started + 1` begins: the bar counts the previous ones as done."""
        self.started += 1
        self.label = label
        if self.enabled:
            self._draw()

    def write(self, line):
        """One line of log above the bar (the bar is redrawn under it)."""
        if self.stream is None:
            return
        if self.enabled:
            self._clear()
        self.stream.write(line + "\n")
        if self.enabled and self.started:
            self._draw()
        else:
            self.stream.flush()

    def close(self):
        """Erases the bar, so what follows (the table on the same terminal) starts clean."""
        if self.enabled:
            self._clear()
            self.stream.flush()
