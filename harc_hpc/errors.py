"""The one error base of harc-hpc and its stable exit codes.

Every error that harc-hpc raises on purpose derives from ``HarcHpcError``; the CLI prints its
message (no traceback unless ``--debug``) and exits with its ``exit_code``:

* 2 ``UsageError``: the command line or the config is wrong (a key, a value, a selection);
* 3 ``InputDataError``: a model, a calibration file or an artifact's content is unusable
  (missing file, NaN, wrong shape, disk full while writing it);
* 4 ``RunStateError``: the run directory is not in a state for this command (locked by another
  submit, jobs still queued, upstream results missing);
* 1: anything else (an internal error: a bug to report, shown with its traceback under ``--debug``).

A message says what went wrong, where (file, config key, tensor, layer, task) and, where there is
one, what to do; ``HarcHpcError(what, where=..., hint=...)`` builds it in that order.
"""

from __future__ import annotations

from typing import Optional


class HarcHpcError(Exception):
    """Base of every deliberate harc-hpc error."""

    exit_code = 1

    def __init__(self, what: str = "", *, where: Optional[str] = None, hint: Optional[str] = None):
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.message())

    def message(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(HarcHpcError, ValueError):
    """The command line or the config is wrong."""

    exit_code = 2


class InputDataError(HarcHpcError, ValueError):
    """A model, data file or artifact cannot be used as it is."""

    exit_code = 3


class UnsupportedModelError(InputDataError):
    """A model type harc-hpc does not run: no family adapter, or refused with a reason
    (harc_hpc.models.coverage, docs/models.md)."""


class RunStateError(HarcHpcError, RuntimeError):
    """The run directory is not in a state that allows this command."""

    exit_code = 4


class DiskFullError(InputDataError, OSError):
    """No space left while writing ``path``; says how much was needed and how much is free."""

    def __init__(self, path, needed_bytes: Optional[int] = None, free_bytes: Optional[int] = None):
        self.path = str(path)
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes
        parts = []
        if needed_bytes is not None:
            parts.append(f"needs about {format_bytes(needed_bytes)}")
        if free_bytes is not None:
            parts.append(f"{format_bytes(free_bytes)} free")
        detail = f" ({', '.join(parts)})" if parts else ""
        super().__init__(f"no space left on device{detail}", where=self.path,
                         hint="free space or point run.output_dir elsewhere, then resubmit: the run resumes")


class CorruptArtifactError(InputDataError):
    """An artifact that a completed task wrote no longer matches what was recorded (or fails its
    checksum on read). ``path`` is the artifact; the runner drops the producer's completion record
    so that the next submit reruns it."""

    def __init__(self, path, what: str, hint: Optional[str] = None):
        self.path = str(path)
        super().__init__(what, where=self.path,
                         hint=hint or "resubmit: the task that wrote it runs again")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def require_finite(tensor, what: str, where: str, hint: Optional[str] = None) -> None:
    """Raise ``InputDataError`` naming ``what`` and ``where`` when ``tensor`` holds NaN or Inf.

    NaN must stop a run where it first appears: downstream it only turns into NaN statistics and a
    solve that "finishes" with the uncalibrated router.
    """
    finite = tensor.isfinite()
    if bool(finite.all()):
        return
    bad = ~finite
    count = int(bad.sum())
    first = [int(i) for i in bad.nonzero()[0].tolist()]
    raise InputDataError(f"{what} has {count} NaN/Inf value(s) (first at index {tuple(first)})", where=where,
                         hint=hint)
