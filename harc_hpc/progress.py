"""Progress of long loops: a bar on a terminal, plain log lines in batch jobs.

A SLURM job's stderr is a file, where a carriage-return bar would leave thousands of fragments, so
when the stream is not a terminal the same updates become a log line at every ``every`` fraction
of the total (and at the end).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

log = logging.getLogger("harc_hpc.progress")


class Progress:
    def __init__(self, total: int, desc: str, *, logger: Optional[logging.Logger] = None,
                 every: float = 0.1, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 width: int = 30):
        self.total = max(int(total), 0)
        self.desc = desc
        self.logger = logger or log
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.every = every
        self.width = width
        self.done = 0
        self.info = ""
        self._next_log = every
        self._t0 = time.perf_counter()
        self._closed = False
        self._logged = 0

    def update(self, n: int = 1, info: str = "") -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        self.info = info or self.info
        if self.tty:
            self._draw()
            return
        frac = self.done / self.total if self.total else 0.0
        if self.total and (frac >= self._next_log or self.done == self.total):
            while self._next_log <= frac:
                self._next_log += self.every
            self._log_line()

    def _draw(self) -> None:
        frac = self.done / self.total if self.total else 0.0
        bar = "#" * int(self.width * frac)
        extra = f" {self.info}" if self.info else ""
        self.stream.write(f"\r{self.desc} [{bar:<{self.width}}] {self.done}/{self.total} "
                          f"{time.perf_counter() - self._t0:.0f}s{extra}\x1b[K")
        self.stream.flush()

    def _log_line(self) -> None:
        self._logged = self.done
        extra = f" ({self.info})" if self.info else ""
        self.logger.info("%s: %d/%d after %.1fs%s", self.desc, self.done, self.total,
                         time.perf_counter() - self._t0, extra)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.tty and self.done != self._logged:
            self._log_line()  # where a loop that ended early (e.g. CG converged) stopped
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
