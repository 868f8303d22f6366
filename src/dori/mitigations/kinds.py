"""Base classes of the ``weights`` and ``inference`` kinds of mitigation (see :mod:`dori.mitigations.base`).

* :class:`WeightsMitigation`: new values for some of the model's tensors (a fine-tuned UNet, an
  edited layer). ``apply`` copies them in and ``remove`` copies the originals back, bit for bit; the
  artefact holds only the tensors that differ from the model it was fitted on.
* :class:`InferenceMitigation`: a change of the text conditioning the UNet sees, made by a forward
  pre-hook on the UNet for as long as it is applied. Because the change sits inside the UNet call, it
  acts on generation and on the attack's loss alike, and gradients flow through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import DoriError
from ..hooks import Handle
from .base import MitigationBase, handle_for, read_saved, write_saved

COMPONENTS = ("unet", "text_encoder", "vae")


def _tensors(pipe, components: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Tensor]:
    """``"<component>.<parameter or buffer>"`` -> tensor, for the components a weights mitigation may change."""
    out = {}
    for component in components:
        module = getattr(pipe, component, None)
        if module is not None:
            out.update({f"{component}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return out


class WeightsMitigation(MitigationBase):
    """New values for named tensors of the pipeline (``"unet.<name>"``, ``"text_encoder.<name>"``)."""

    kind = "weights"
    scope = "set"
    bakeable = True

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict | None = None):
        if not tensors:
            raise DoriError(f"{self.name}: a weights mitigation needs at least one tensor")
        self.tensors, self.meta = tensors, dict(meta or {})

    @classmethod
    def from_difference(cls, before: dict[str, torch.Tensor], pipe, meta: dict | None = None):
        """The tensors of ``pipe`` that differ from ``before`` (a copy of :func:`snapshot` taken earlier)."""
        now = _tensors(pipe)
        changed = {k: v.detach().cpu().clone() for k, v in now.items() if k in before and not torch.equal(v.detach().cpu(), before[k])}
        return cls(changed, meta)

    def validate_for(self, pipe) -> None:
        targets = _tensors(pipe)
        for name, value in self.tensors.items():
            if name not in targets:
                raise DoriError(f"mitigation: {self.name} changes {name!r}, which this model does not have "
                                "(it was fitted on another model)")
            if tuple(targets[name].shape) != tuple(value.shape):
                raise DoriError(f"mitigation: {self.name} has {name} of shape {tuple(value.shape)}, the model "
                                f"{tuple(targets[name].shape)} (it was fitted on another model)")

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        """Copy the tensors in (all of them, whatever ``prompt``); ``remove()`` restores the originals."""
        self.validate_for(pipe)
        targets = _tensors(pipe)
        handle = handle_for(pipe.unet, self)
        with torch.no_grad():
            for name, value in self.tensors.items():
                target = targets[name]
                original = target.detach().clone()
                target.data.copy_(value.to(target.device, target.dtype))
                handle.edit(name, lambda target=target, original=original: target.data.copy_(original))
        return handle

    summary_keys: tuple[str, ...] = ()
    """Keys of ``meta`` that :meth:`summary` reports beside the tensor counts."""

    def summary(self) -> dict:
        """What ``dori mitigate`` reports: how many tensors and weights changed, and the ``summary_keys``."""
        return {"tensors": len(self.tensors), "parameters": int(sum(v.numel() for v in self.tensors.values())),
                **{k: self.meta.get(k) for k in self.summary_keys}}

    def describe(self) -> dict:
        return {**self.identity(), **self.meta, "tensors": len(self.tensors),
                "parameters": int(sum(v.numel() for v in self.tensors.values()))}

    def save(self, path: str | Path) -> Path:
        return write_saved(path, self.tensors, self.describe())

    @classmethod
    def load(cls, path: str | Path):
        meta, tensors = read_saved(path)
        for name, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DoriError(f"mitigation: {path} holds non-finite values in {name}")
        keep = {k: v for k, v in meta.items()
                if k not in ("format", "method", "kind", "scope", "model", "sha256", "tensors", "parameters")}
        return cls(tensors, keep)


def fit_by_training(cls: type[WeightsMitigation], pipe, run, folder: str, train: Callable[[Path], dict]) -> WeightsMitigation:
    """A weights mitigation from a training run: ``train(out)`` trains ``pipe.unet`` in place in the run
    folder ``out`` (``<run>/<folder>``, resumable; a temporary one without a ``run``), may set ``pipe.unet``
    to the trained module, and returns the sidecar's metadata. The tensors that changed are kept, and
    ``pipe`` gets its original UNet, weights and location back, however ``train`` ends."""
    import tempfile

    from ..models import pipeline_location

    unet, location = pipe.unet, pipeline_location(pipe)
    training, flags = unet.training, [p.requires_grad for p in unet.parameters()]
    with tempfile.TemporaryDirectory(prefix=f"dori-{folder}-") as scratch:
        before = snapshot(pipe, path=Path(scratch) / "before.pt")
        try:
            meta = train(run.path / folder if run is not None else Path(scratch) / folder)
            if run is None:
                meta = {**meta, "pipeline": None}  # the temporary folder is gone
            fitted = cls.from_difference(before, pipe, meta)
        finally:
            pipe.unet = unet
            unet.load_state_dict({k.removeprefix("unet."): v for k, v in before.items()})
            unet.train(training)
            params = list(unet.parameters())
            if len(params) == len(flags):  # not when a failed run left an adapter attached
                for p, flag in zip(params, flags, strict=True):
                    p.requires_grad_(flag)
            pipe.register_to_config(_name_or_path=location)
            del before  # unmapped before its folder goes
    return fitted.stamp(pipe)


def fit_unlearning(cls: type[WeightsMitigation], pipe, prompts, config, objective: Callable[[], object], *,
                   stage: str, folder: str, deviations: tuple[str, ...], run=None, progress=None,
                   extra: Callable[[object], dict] | None = None) -> WeightsMitigation:
    """A Table 2 unlearning baseline fitted on the captions of ``prompts``: ``objective()`` builds the method's
    :class:`~dori.finetune.unlearning.UnlearningObjective`, trained ``config.iterations`` steps per caption by
    :func:`~dori.finetune.unlearning.train_unlearning` in ``<run>/<folder>`` (resumable); the sidecar holds
    the settings, the captions, the ``deviations`` from the official code, the loss and ``extra(objective)``."""
    from dataclasses import replace

    from ..config_files import to_dict
    from ..finetune.unlearning import train_unlearning

    ids = [r.id for r in prompts.records]

    def train(out: Path) -> dict:
        built = objective()
        steps = replace(config, iterations=config.iterations * len(ids))  # per caption, for the loop
        result = train_unlearning(pipe, built, steps, out, config=to_dict(config), stage=stage,
                                  resolved={"prompts": prompts.name, "ids": ids}, progress=progress)
        return {"config": to_dict(config), "prompts": prompts.name, "ids": ids, "deviations": list(deviations),
                "steps": result.summary["steps"], "loss_first": result.summary["loss_first"],
                "loss_last": result.summary["loss_last"], **(extra(built) if extra else {}),
                "pipeline": str(result.pipeline) if result.pipeline else None}

    return fit_by_training(cls, pipe, run, folder, train)


def snapshot(pipe, components: tuple[str, ...] = ("unet",), path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of the tensors of ``components``, to compare with after a fit (:meth:`WeightsMitigation.from_difference`).

    With ``path`` the copy is written there and read back memory-mapped: it takes disk instead of memory
    while the fit holds the weights, their gradients and the optimiser's moments (for all of SD's UNet
    in float32 that is 3.4 GB less at the fit's peak). The file is removed at once where the system
    keeps a mapped file's data (POSIX), so a killed fit leaves nothing behind."""
    tensors = {k: v.detach().cpu() for k, v in _tensors(pipe, components).items()}
    if path is None:
        return {k: v.clone() for k, v in tensors.items()}
    torch.save(tensors, path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    if os.name == "posix":
        os.unlink(path)
    return mapped


class InferenceMitigation(MitigationBase):
    """A change of the text conditioning at generation time: :meth:`condition` rewrites the UNet's
    ``encoder_hidden_states`` ``(batch, tokens, dim)`` on every UNet call while applied. With
    classifier-free guidance the batch is ``[unconditional; conditional]`` (diffusers' order)."""

    kind = "inference"
    scope = "set"

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """The text encoder, whose output the mitigation rewrites."""
        return {"text_encoder": pipe.text_encoder}

    def condition(self, encoder_hidden_states: torch.Tensor, timestep) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        handle = handle_for(pipe.unet, self)

        def pre(_module, args, kwargs):
            if "encoder_hidden_states" in kwargs:
                timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
                kwargs = {**kwargs, "encoder_hidden_states": self.condition(kwargs["encoder_hidden_states"], timestep)}
            elif len(args) > 2:
                args = (*args[:2], self.condition(args[2], args[1]), *args[3:])
            return args, kwargs

        handle.pre("", pre, with_kwargs=True, name="condition")
        return handle


class SettingsMitigation(InferenceMitigation):
    """An inference mitigation that learns nothing: its artefact is its ``Config`` (a frozen dataclass with
    ``validate`` and ``to_dict``) and the ``deviations`` from the official code, both in the sidecar. It
    applies to any model (``depends_on`` is empty); ``fit`` runs the class's optional ``check``."""

    Config: type
    deviations: tuple[str, ...] = ()
    needs_prompts = False

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.config.validate()

    @classmethod
    def fit(cls, pipe, prompts=None, config=None, *, run=None, progress=None):
        """Nothing to learn: checks the model where the method needs something of it."""
        mitigation = cls(config)
        if hasattr(cls, "check"):
            cls.check(pipe, mitigation.config)
        return mitigation.stamp(pipe)

    def depends_on(self, pipe) -> dict[str, torch.nn.Module]:
        """Nothing but the settings: the change means the same on any weights."""
        return {}

    def summary(self) -> dict:
        return self.config.to_dict()

    def describe(self) -> dict:
        return {**self.identity(), "config": self.config.to_dict(), "deviations": list(self.deviations)}

    def save(self, path: str | Path) -> Path:
        return write_saved(path, {}, self.describe())

    @classmethod
    def load(cls, path: str | Path):
        from ..config_files import from_dict

        meta, _ = read_saved(path)
        return cls(from_dict(cls.Config, meta["config"], cls.name))
