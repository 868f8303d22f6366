"""The one progress protocol of every long-running function: ``progress(stage, done, total, info="")``.

The library calls it after each unit of work (an image, a trigger, a training step); the CLI passes
rich progress bars, one per stage. ``None`` means nobody is watching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None: ...


def for_stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    """A ``(done, total)`` callback that reports to ``progress`` under ``stage`` (None stays None)."""
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def labelled(progress: Progress | None, label: str) -> Progress | None:
    """``progress`` with every stage shown as ``"<label> / <stage>"`` (a run inside a larger one)."""
    if progress is None:
        return None
    return lambda stage, done, total, info="": progress(f"{label} / {stage}", done, total, info)
