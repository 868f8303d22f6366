"""What every mitigation is, and the registry that finds them by name.

A mitigation is one module of this package (or of a plugin, see :mod:`dori.registry`) holding:

* ``Config``: a frozen dataclass of its settings, with ``validate()``;
* ``fit(pipe, prompts, config, *, run=None, progress=None)``: a classmethod that localises, calibrates or
  trains it on a :class:`~dori.prompts.PromptSet` (``run``: a :class:`~dori.runs.RunFolder` to resume
  from and write per-item records into; ``progress``: :class:`~dori.progress.Progress`);
* ``apply(pipe, prompt=None) -> Handle``: the change, undone exactly by ``handle.remove()``;
* ``describe()`` (the JSON sidecar), ``save(path)`` and the classmethod ``load(path)``;
* optionally ``check(pipe, config)``: a classmethod that refuses a model the method cannot work on
  (missing layers) before a run folder is created, and ``summary()``: what ``dori mitigate`` reports;
* ``name`` (its registered name), ``kind`` and ``scope`` as class or instance attributes.

Three kinds:

* ``hook``: reversible edits while applied (forward hooks, masked weights): NeMo, Wanda, ablation;
* ``weights``: a fine-tuned or edited model; the handle swaps the weights in and restores them
  (:class:`~dori.mitigations.kinds.WeightsMitigation`): adversarial fine-tuning;
* ``inference``: changes the text conditioning or the sampling loop at generation time
  (:class:`~dori.mitigations.kinds.InferenceMitigation`).

A mitigation holds one selection for a whole prompt set (``scope="set"``) or one per prompt
(``scope="per-prompt"``, as NeMo localises); ``apply(pipe, prompt=...)`` then uses that prompt's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch

from ..errors import DoriError
from ..hooks import Handle
from ..registry import Registry
from ..runs import config_hash

KINDS = ("hook", "weights", "inference")
SCOPES = ("set", "per-prompt")
FORMAT = 2
"""Version of the saved sidecar; 1 had the method's name under ``kind``."""

MITIGATIONS: Registry[type] = Registry("mitigation", "dori.mitigations", "dori.mitigations",
                                       skip=("base", "kinds", "run"))
register_mitigation = MITIGATIONS.register


@runtime_checkable
class Mitigation(Protocol):
    name: str
    kind: str
    scope: str

    def apply(self, pipe, prompt: str | None = None) -> Handle: ...

    def save(self, path: str | Path) -> Path: ...

    def describe(self) -> dict: ...


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise DoriError(f"scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


def handle_for(module: torch.nn.Module, mitigation: Mitigation) -> Handle:
    """A :class:`Handle` on ``module`` named after ``mitigation`` and its content: applying the same
    mitigation again while it is applied is refused."""
    handle = Handle(module, f"{mitigation.name}:{config_hash(mitigation.describe())[:8]}")
    handle.edit("", lambda: None)
    return handle


@contextmanager
def mitigated(pipe, *mitigations: Mitigation, prompt: str | None = None) -> Iterator[object]:
    """Apply mitigations for the duration of a ``with`` block, removing them (in reverse) even on error."""
    with ExitStack() as stack:
        for mitigation in mitigations:
            stack.enter_context(mitigation.apply(pipe, prompt=prompt))
        yield pipe


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def write_saved(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Save ``tensors`` as ``<path>.safetensors`` and ``meta`` as its JSON sidecar; returns the tensor file."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    sidecar_path(path).write_text(json.dumps({"format": FORMAT, **meta}, indent=1, default=str))
    return path


def read_saved(path: str | Path) -> tuple[dict, dict]:
    """``(sidecar, tensors)`` of a saved mitigation."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    return json.loads(sidecar_path(path).read_text()), load_file(str(path))


def method_of(meta: dict) -> str | None:
    """The registered name a sidecar was saved by (``method``; format 1 called it ``kind``)."""
    return meta.get("method") or (meta.get("kind") if meta.get("kind") not in KINDS else None)


def load_mitigation(path: str | Path) -> Mitigation:
    """Load a saved mitigation (``x.safetensors`` + ``x.json``) of any registered method."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta = sidecar_path(path)
    if not path.is_file() or not meta.is_file():
        raise DoriError(f"mitigation: {path} and its sidecar {meta.name} must both exist")
    try:
        name = method_of(json.loads(meta.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise DoriError(f"mitigation: {meta} is not a mitigation sidecar (not a JSON object)") from exc
    if not name:
        raise DoriError(f"mitigation: {meta} names no method")
    return MITIGATIONS.get(name).load(path)


class MitigationBase:
    """Shared plumbing of the built-in mitigations: the sidecar's identity fields, baking."""

    name: ClassVar[str]
    kind: ClassVar[str]
    bakeable: ClassVar[bool] = False
    """Whether ``apply`` only edits weights (no hooks), so that the mitigated model can be saved."""

    def identity(self) -> dict:
        """The fields every sidecar starts with."""
        return {"method": self.name, "kind": self.kind, "scope": self.scope}

    def bake(self, pipe, folder: str | Path, prompt: str | None = None) -> Path:
        """Save the pipeline with the mitigation applied (a normal diffusers folder); only for methods
        whose ``apply`` edits weights."""
        if not self.bakeable:
            raise DoriError(f"bake: {self.name} changes the model through hooks and cannot be saved into a "
                            "pipeline folder")
        with self.apply(pipe, prompt=prompt):
            pipe.save_pretrained(folder)
        return Path(folder)
