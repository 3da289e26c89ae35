"""Progress of a long evaluation: which metric runs and how many images are done.

The explanation metrics cost many forward and backward passes per image
(insertion/deletion alone ~2 x auc_steps forwards), so an evaluation of a few
hundred images runs for minutes. `ProgressLine` is the hook `cgc_tf.evaluation`
calls as `progress(metric, done, total)`: on a terminal it rewrites one line in
place; otherwise (a log file, a pipe) it prints a line at most every `interval`
seconds, as `cgc-train` prints one line per epoch instead of a bar. Standard
library only.
"""

import sys
import time


class ProgressLine:
    """Prints evaluation progress; call it as `line(metric, done, total)`, then `close()`.

    Args:
      title: str, printed first on every line, e.g. "Explanation metrics".
      stream: text stream to write to (None: sys.stdout).
      interactive: bool, rewrite one line in place; None: whether `stream` is a
        terminal.
      interval: float >= 0, seconds between two lines when not interactive.
      clock: callable returning seconds (tests pass a fake clock).
    """

    def __init__(self, title, stream=None, interactive=None, interval=30.0,
                 clock=time.monotonic):
        if interval < 0:
            raise ValueError(f"interval={interval!r} must be >= 0 seconds")
        self._title = title
        self._stream = sys.stdout if stream is None else stream
        if interactive is None:
            interactive = hasattr(self._stream, "isatty") and self._stream.isatty()
        self._interactive = bool(interactive)
        self._interval = interval
        self._clock = clock
        self._start = self._last_call = self._last_line = clock()
        # Seconds spent in each metric, in the order the metrics first ran.
        self._seconds = {}
        self._images = 0
        self._width = 0

    @property
    def seconds(self):
        """dict metric -> seconds spent in it so far (the time since the previous call)."""
        return dict(self._seconds)

    def __call__(self, metric, done, total):
        """Records that `metric` has finished `done` of `total` images (total None: unknown)."""
        now = self._clock()
        self._seconds[metric] = self._seconds.get(metric, 0.0) + now - self._last_call
        self._last_call = now
        self._images = max(self._images, int(done))
        of_total = "" if total is None else f"/{int(total)}"
        line = f"{self._title}: {metric} {int(done)}{of_total} images, {now - self._start:.0f} s"
        if self._interactive:
            self._rewrite(line)
        elif now - self._last_line >= self._interval:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_line = now

    def close(self):
        """Prints the final line: images, total seconds and the seconds of each metric."""
        if not self._seconds:
            return
        elapsed = self._clock() - self._start
        parts = ", ".join(f"{metric} {seconds:.0f} s" for metric, seconds in self._seconds.items())
        line = f"{self._title}: {self._images} images in {elapsed:.0f} s ({parts})"
        if self._interactive:
            self._rewrite(line)
            self._stream.write("\n")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def _rewrite(self, line):
        # Pads with spaces so a shorter line fully covers the previous one.
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = max(self._width, len(line))


class Progress:
    """A `progress` argument (True, False or a hook) as one object: report(stage, done), close().

    Args:
      progress: True prints a `ProgressLine(title)`; False prints nothing; a
        callable is called as `progress(stage, done, total)`.
      title: str, the `ProgressLine` title.

    Attributes:
      total: int or None, the images the evaluation covers (None: unknown); set it
        before the first `report`.
    """

    def __init__(self, progress, title):
        if not (isinstance(progress, bool) or callable(progress)):
            raise ValueError(
                f"`progress` must be a bool or a callable (metric, done, total); received "
                f"{progress!r}"
            )
        self._own = ProgressLine(title) if progress is True else None
        self._hook = self._own if progress is True else (progress or None)
        self.total = None

    def report(self, stage, done):
        """Tells the hook that `stage` has finished `done` images."""
        if self._hook is not None:
            self._hook(stage, done, self.total)

    def close(self):
        """Prints the final line of an own `ProgressLine`."""
        if self._own is not None:
            self._own.close()
