"""What every mitigation is: a name, ``apply(pipe) -> handle`` with an exact ``remove()``, save / load.

A mitigation can hold one selection for a whole prompt set (``scope="set"``) or one per prompt
(``scope="per-prompt"``, as NeMo localises); ``apply(pipe, prompt=...)`` then uses that prompt's
selection, and nothing for a prompt it has no selection for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import DoriError

SCOPES = ("set", "per-prompt")


class Handle:
    """Undoes one application; ``remove()`` may be called more than once."""

    def __init__(self, undo: Callable[[], None]):
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@runtime_checkable
class Mitigation(Protocol):
    name: str
    scope: str

    def apply(self, pipe, prompt: str | None = None) -> Handle: ...

    def save(self, path: str | Path) -> Path: ...

    def describe(self) -> dict: ...


@contextmanager
def mitigated(pipe, *mitigations: Mitigation, prompt: str | None = None) -> Iterator[object]:
    """Apply mitigations for the duration of a ``with`` block, removing them (in reverse) even on error."""
    with ExitStack() as stack:
        for mitigation in mitigations:
            stack.enter_context(mitigation.apply(pipe, prompt=prompt))
        yield pipe


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def write_sidecar(path: str | Path, data: dict) -> Path:
    out = sidecar_path(path)
    out.write_text(json.dumps(data, indent=1, default=str))
    return out


def write_saved(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Save ``tensors`` as ``<path>.safetensors`` and ``meta`` as its JSON sidecar; returns the tensor file."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    write_sidecar(path, meta)
    return path


def read_saved(path: str | Path) -> tuple[dict, dict]:
    """``(sidecar, tensors)`` of a saved mitigation."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    return json.loads(sidecar_path(path).read_text()), load_file(str(path))


def load_mitigation(path: str | Path) -> Mitigation:
    """Load a saved mitigation (``x.safetensors`` + ``x.json``) of any kind."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta = sidecar_path(path)
    if not path.is_file() or not meta.is_file():
        raise DoriError(f"mitigation: {path} and its sidecar {meta.name} must both exist")
    kind = json.loads(meta.read_text()).get("kind")
    if kind == "nemo":
        from .nemo import NeMo

        return NeMo.load(path)
    if kind == "wanda":
        from .wanda import Wanda

        return Wanda.load(path)
    if kind == "ablation":
        from .ablation import LayerAblation

        return LayerAblation.load(path)
    raise DoriError(f"mitigation: {meta} has unknown kind {kind!r} (expected nemo, wanda or ablation)")
