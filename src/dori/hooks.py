"""Reversible, named changes to a model: every forward hook and in-place edit in dori goes through here.

A :class:`Handle` holds a set of changes to one root module (a UNet, a text encoder): forward hooks,
forward pre-hooks and in-place edits with their undo. Each change has a name, unique on its root
while it is active, so applying the same change twice is refused instead of stacking silently;
:meth:`Handle.remove` undoes everything in reverse order, and ``with`` removes it even when the block
raises. Mitigations return a Handle from ``apply``; :func:`hooked` scopes hooks to a ``with`` block::

    with hooked(unet, "count") as hooks:
        hooks.forward("", lambda module, args, output: ...)      # "" is the root itself
        hooks.pre("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", fn)
        unet(...)

Which names are active is kept beside the modules (a weak map), never as an attribute of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import DoriError

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def active_names(root: torch.nn.Module) -> set[str]:
    """Names of the changes now applied to ``root`` (a copy)."""
    return set(_ACTIVE.get(root, ()))


class Handle:
    """Named, reversible changes to one root module; ``remove()`` undoes them (reverse order, idempotent).

    ``owner`` prefixes every name (``"<owner>/<module path>"``); two active handles on one root may not
    share a name.
    """

    def __init__(self, root: torch.nn.Module, owner: str):
        self.root, self.owner = root, owner
        self._undo: list[tuple[str, Callable[[], None]]] = []

    # -- adding changes -------------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        full = f"{self.owner}/{name}" if name else self.owner
        names = _ACTIVE.setdefault(self.root, set())
        if full in names:
            raise DoriError(f"hooks: {full!r} is already applied to this {type(self.root).__name__}; remove the "
                            "handle that applied it first (the same mitigation applied twice?)")
        names.add(full)
        return full

    def _module(self, path: str) -> torch.nn.Module:
        if not path:
            return self.root
        try:
            return self.root.get_submodule(path)
        except AttributeError as exc:
            raise DoriError(f"hooks: {type(self.root).__name__} has no module {path!r}") from exc

    def _register(self, name: str, make: Callable[[], torch.utils.hooks.RemovableHandle]) -> None:
        full = self._claim(name)
        try:
            handle = make()
        except BaseException:
            _ACTIVE[self.root].discard(full)
            raise
        self._undo.append((full, handle.remove))

    def forward(self, path: str, fn: Callable, *, with_kwargs: bool = False, name: str | None = None) -> None:
        """``fn(module, args, output) -> output | None`` (``fn(module, args, kwargs, output)`` with
        ``with_kwargs``) after ``path``'s forward."""
        module = self._module(path)
        self._register(name if name is not None else path,
                       lambda: module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre(self, path: str, fn: Callable, *, with_kwargs: bool = False, name: str | None = None) -> None:
        """``fn(module, args) -> args | None`` (or ``fn(module, args, kwargs) -> (args, kwargs) | None``
        with ``with_kwargs``) before ``path``'s forward."""
        module = self._module(path)
        self._register(f"{name if name is not None else path}:pre",
                       lambda: module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def edit(self, name: str, undo: Callable[[], None]) -> None:
        """Record an in-place change already made (e.g. masked weights) and how to undo it."""
        self._undo.append((self._claim(name), undo))

    # -- removing them --------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo every change, last first; a second call does nothing."""
        names = _ACTIVE.get(self.root, set())
        errors = []
        while self._undo:
            full, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep undoing the rest, then report
                errors.append(exc)
            names.discard(full)
        if errors:
            raise errors[0]

    def __len__(self) -> int:
        return len(self._undo)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def hooked(root: torch.nn.Module, owner: str) -> Iterator[Handle]:
    """A :class:`Handle` on ``root`` whose changes are undone when the block ends, however it ends."""
    handle = Handle(root, owner)
    try:
        yield handle
    finally:
        handle.remove()


class CallCounter:
    """Counts calls (and samples in the first argument) of ``root``'s forward while registered."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0

    def __call__(self, _module, args, _output) -> None:
        self.calls += 1
        self.samples += int(args[0].shape[0]) if args else 0


@contextmanager
def counting_calls(module: torch.nn.Module) -> Iterator[CallCounter]:
    """``with counting_calls(pipe.unet) as counter:`` -> ``counter.calls`` UNet evaluations inside."""
    counter = CallCounter()
    with hooked(module, f"count-{id(counter)}") as hooks:
        hooks.forward("", counter)
        yield counter


@contextmanager
def counting_class_calls(cls: type) -> Iterator[CallCounter]:
    """Counts the forward calls of every module of class ``cls`` inside the block (copies of a model
    included, such as a method's frozen reference UNet), through a global forward hook."""
    counter = CallCounter()

    def hook(module, args, output):
        if type(module) is cls:
            counter(module, args, output)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
