"""A dependency-free progress bar for long operations, on stderr, that callers can silence.

On a terminal the bar redraws one line in place (at most ten times a
second); elsewhere (logs, CI) it stays quiet until it closes and then writes
one summary line, so logs are not flooded. It never writes to stdout, so
``--json`` output stays clean.

By default a bar shows when the ``secateurs`` logger would show INFO
messages: the CLI's ``--quiet`` (and a library user's logging setup, which
leaves INFO off unless asked) silences bars and messages together.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Count ``total`` steps of work labelled ``desc``.

    Args:
        total: number of steps (``update`` calls) expected.
        desc: a short label shown before the bar.
        enabled: False makes every method a no-op; None follows the ``secateurs``
            logger (shown when it is enabled for INFO).
        stream: where to draw (stderr by default).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress(3, "epoch 1", stream=out) as bar:
        ...     for _ in range(3):
        ...         bar.update(loss=0.5)
        >>> out.getvalue().strip()
        'epoch 1 3/3 loss 0.5000 in 0s'
    """

    def __init__(self, total: int, desc: str, *, enabled: bool | None = True, stream: TextIO | None = None) -> None:
        if enabled is None:
            enabled = logging.getLogger("secateurs").isEnabledFor(logging.INFO)
        self.total = max(int(total), 0)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._start = time.perf_counter()
        if self._tty:  # at once: the first step of a long job (a 70B model's layer) can take minutes
            self.stream.write("\r" + self._line(bar=True))
            self.stream.flush()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps and show ``postfix`` values (e.g. ``loss=0.31``)."""
        if not self.enabled:
            return
        self.count += n
        self.postfix.update(postfix)
        now = time.perf_counter()
        if self._tty and (now - self._last_draw > 0.1 or self.count >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line(bar=True))
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" + self._line(bar=True) if self._tty else self._line(bar=False)) + "\n")
        self.stream.flush()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self, *, bar: bool) -> str:
        parts = [self.desc]
        if bar and self.total:
            done = int(20 * min(self.count, self.total) / self.total)
            parts.append("[" + "#" * done + "." * (20 - done) + "]")
        parts.append(f"{self.count}/{self.total}")
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.postfix.items()]
        elapsed = time.perf_counter() - self._start
        if not bar:
            return " ".join([*parts, f"in {_duration(elapsed)}"])
        parts.append(f"elapsed {_duration(elapsed)}")
        if 0 < self.count < self.total:  # the steps so far, at their mean pace
            parts.append(f"left ~{_duration(elapsed / self.count * (self.total - self.count))}")
        return " ".join(parts)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
