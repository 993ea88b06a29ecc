"""Stopping a run at a safe point on SIGINT (Ctrl-C) or SIGTERM.

An entry point calls `install` once. The handlers only record the signal; the one training loop
(`lqf.runtime.loop.run`) calls `check` after every step, saves a checkpoint there when it has checkpoints, and
raises `Interrupted`, which `lqf.runtime.cli` turns into one line ("interrupted at step 37 of pretrain; rerun the
same command to resume from step 37") and the exit status of the signal (130 for SIGINT, 143 for SIGTERM).
Nothing is cut short: a signal that arrives while XLA compiles, while a checkpoint is written or while data
is loaded takes effect at the next step, and every file is written whole (temporary file renamed). A
second SIGINT stops the process at once (exit 130), for a user who does not want to wait for the step.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
_requested: list[int] = []


class Interrupted(Exception):
  """A run stopped by a signal at a safe point.

  Attributes:
    signum: the signal (SIGINT or SIGTERM).
    where: where it stopped, e.g. "at step 37/100 of pretrain".
    resume: what a rerun resumes from, e.g. "step 37" (None: it starts over).
  """

  def __init__(self, signum: int, where: str, resume: str | None):
    super().__init__(f"interrupted {where}")
    self.signum, self.where, self.resume = signum, where, resume

  def message(self) -> str:
    """The one line printed by `lqf.runtime.cli`."""
    rerun = (f"rerun the same command to resume from {self.resume}" if self.resume
             else "rerun the same command to start it again")
    return f"interrupted {self.where}; {rerun}."


def _handle(signum, frame) -> None:
  del frame
  if _requested and signum == signal.SIGINT:
    print("error: interrupted again: stopped at once (the last checkpoint is intact).", file=sys.stderr)
    os._exit(EXIT_STATUS[signal.SIGINT])  # pylint: disable=protected-access
  _requested.append(signum)


def install() -> None:
  """Records SIGINT and SIGTERM instead of raising (main thread only)."""
  for signum in EXIT_STATUS:
    signal.signal(signum, _handle)


def requested() -> int | None:
  """The signal received since `install`, or None."""
  return _requested[0] if _requested else None


def check(where: str, resume: str | None) -> None:
  """Raises `Interrupted` (``where``, ``resume``) if a signal was received."""
  if _requested:
    raise Interrupted(_requested[0], where, resume)
