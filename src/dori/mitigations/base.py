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
                                       skip=("base", "kinds", "run", "sampling_calls"))
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
    """Save ``tensors`` as ``<path>.safetensors`` and ``meta`` as its JSON sidecar (with the tensor file's
    SHA-256, so that damaged bytes are refused on load); both written through temporary files and
    readable by everyone (mode 0644 under the usual umask); returns the tensor file."""
    import hashlib
    import os

    from safetensors.torch import save_file

    from ..runs import json_text

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    side = sidecar_path(path)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}")
    side_tmp.write_text(json_text({"format": FORMAT, **meta, "sha256": digest}, indent=1))
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp, side_tmp):
        file.chmod(0o666 & ~umask)
    tmp.replace(path)
    side_tmp.replace(side)
    return path


def read_saved(path: str | Path) -> tuple[dict, dict]:
    """``(sidecar, tensors)`` of a saved mitigation; a DoriError if either is damaged."""
    import hashlib

    from safetensors.torch import load

    path = Path(path).with_suffix(".safetensors")
    meta = read_sidecar(path)
    data = path.read_bytes()
    if meta.get("sha256") and hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise DoriError(f"mitigation: {path} is damaged (its bytes do not match the checksum in {sidecar_path(path).name})")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise DoriError(f"mitigation: {path} is not a readable safetensors file ({exc})") from None
    return meta, tensors


def read_sidecar(path: str | Path) -> dict:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DoriError(f"mitigation: {side} is not a mitigation sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise DoriError(f"mitigation: {side} is not a mitigation sidecar (not a JSON object)")
    return meta


def method_of(meta: dict) -> str | None:
    """The registered name a sidecar was saved by (``method``; format 1 called it ``kind``)."""
    return meta.get("method") or (meta.get("kind") if meta.get("kind") not in KINDS else None)


def load_mitigation(path: str | Path) -> Mitigation:
    """Load a saved mitigation (``x.safetensors`` + ``x.json``) of any registered method; a DoriError
    naming the file if it is missing, damaged or not what its sidecar says."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta = sidecar_path(path)
    if not path.is_file() or not meta.is_file():
        raise DoriError(f"mitigation: {path} and its sidecar {meta.name} must both exist")
    sidecar = read_sidecar(path)
    name = method_of(sidecar)
    if not name:
        raise DoriError(f"mitigation: {meta} names no method")
    try:
        mitigation = MITIGATIONS.get(name).load(path)
    except DoriError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise DoriError(f"mitigation: {path} is not a valid {name} file ({type(exc).__name__}: {exc})") from None
    if isinstance(mitigation, MitigationBase):
        mitigation.made_for = sidecar.get("model")
    return mitigation


def load_for(pipe, path: str | Path, prompts: list[str] | None = None, *, union: bool = False) -> Mitigation:
    """:func:`load_mitigation`, refused unless it was fitted on ``pipe``'s model and fits its layers; with
    ``prompts`` (those it will be applied for), a per-prompt mitigation must hold a selection for each,
    unless ``union`` (every prompt's selection applied together)."""
    mitigation = load_mitigation(path)
    if isinstance(mitigation, MitigationBase):
        mitigation.check_model(pipe, path)
        mitigation.validate_for(pipe)
        fitted = mitigation.fitted_prompts()
        if prompts is not None and fitted is not None and mitigation.scope == "per-prompt" and not union:
            missing = [p for p in prompts if p not in set(fitted)]
            if missing:
                raise DoriError(f"mitigation: {path} was fitted per prompt on {len(fitted)} prompts and has no "
                                f"selection for {len(missing)} of these (first: {missing[0]!r}); fit it on them, "
                                "or apply every prompt's selection together (--mitigation-union)")
    return mitigation


class MitigationBase:
    """Shared plumbing of the built-in mitigations: the sidecar's identity fields, baking."""

    name: ClassVar[str]
    kind: ClassVar[str]
    bakeable: ClassVar[bool] = False
    """Whether ``apply`` only edits weights (no hooks), so that the mitigated model can be saved."""
    made_for: dict | None = None
    """The model it was fitted on (:func:`dori.fingerprint.model_identity`), saved in the sidecar."""

    def identity(self) -> dict:
        """The fields every sidecar starts with."""
        return {"method": self.name, "kind": self.kind, "scope": self.scope, "model": self.made_for}

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """The modules whose weights give the mitigation its meaning (probed in ``made_for``)."""
        return {"unet": pipe.unet}

    def stamp(self, pipe):
        """Record ``pipe``'s model as the one this mitigation was fitted on; returns ``self``."""
        from ..fingerprint import model_identity
        from ..models import pipeline_location

        self.made_for = {"location": pipeline_location(pipe), **model_identity(pipe, self.depends_on(pipe))}
        return self

    def check_model(self, pipe, source: str | Path = "mitigation") -> None:
        """Refuse a model other than the one this mitigation was fitted on (no record: nothing to check)."""
        from ..fingerprint import identity_mismatch
        from ..models import pipeline_location

        if not self.made_for:
            return
        why = identity_mismatch(self.made_for, pipe, lambda: self.depends_on(pipe))
        if why:
            raise DoriError(f"mitigation: {source} was fitted on {self.made_for.get('location') or 'a model in memory'}, "
                            f"not on this model ({pipeline_location(pipe) or 'in memory'}: {why}); fit it on this model")

    def validate_for(self, pipe) -> None:
        """Refuse content that cannot apply to ``pipe`` (out-of-range indices, wrong shapes), before any run
        folder is created."""

    def fitted_prompts(self) -> list[str] | None:
        """The prompts a per-prompt mitigation holds selections for (None: it applies to any prompt)."""
        return None

    def bake(self, pipe, folder: str | Path, prompt: str | None = None) -> Path:
        """Save the pipeline with the mitigation applied (a normal diffusers folder); only for methods
        whose ``apply`` edits weights."""
        if not self.bakeable:
            raise DoriError(f"bake: {self.name} changes the model through hooks and cannot be saved into a "
                            "pipeline folder")
        with self.apply(pipe, prompt=prompt):
            pipe.save_pretrained(folder)
        return Path(folder)
