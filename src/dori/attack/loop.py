"""The optimiser loop of the embedding attack and its typed results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import paper
from ..errors import DoriError
from ..seeding import item_generator
from .parts import Constraint, EarlyCheck, Initializer, NoConstraint, Objective, SuccessCheck

logger = logging.getLogger(__name__)

STATUSES = ("succeeded", "failed", "skipped")


@dataclass(frozen=True)
class AttackConfig:
    """The optimiser loop's settings (defaults: the paper's, section 2.1: Adam, lr 0.1, 50 steps, 8 (noise, t)
    pairs). ``record_at``: the steps after which the success check runs (None: 0, 1, 10, 25 and 50 as
    in the paper's figure, those within ``steps``, and always ``steps`` itself)."""

    steps: int = paper.STEPS
    lr: float = 0.1
    pairs: int = 8
    record_at: tuple[int, ...] | None = None
    early_stop: bool = False
    check_every: int = 4
    check_margin: float = 0.3
    """The early check must clear the replication threshold by this much."""
    check_confirm: int = 1
    """Consecutive passing checks before a trigger stops (2: it keeps optimising ``check_every`` more
    steps after the first pass and must pass again)."""
    check_tail: int = 6
    """Steps a trigger keeps optimising, without further checks, after it has passed ``check_confirm``
    checks: a margin bought with optimiser steps instead of check samples. The defaults (a check every
    4 steps, margin 0.3, one pass, 6 more steps) reach a higher MR with fewer UNet evaluations than two
    passes in a row 5 steps apart (``benchmarks/attack.py``, docs/results.md)."""
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise DoriError(f"steps: must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise DoriError(f"lr: must be > 0, got {self.lr}")
        if self.pairs < 1:
            raise DoriError(f"pairs: must be >= 1, got {self.pairs}")
        if self.check_every < 1 or self.check_confirm < 1:
            raise DoriError(f"check_every, check_confirm: must be >= 1, got {self.check_every}, {self.check_confirm}")
        if self.check_tail < 0:
            raise DoriError(f"check_tail: must be >= 0, got {self.check_tail}")
        if self.record_at is not None and any(s < 0 or s > self.steps for s in self.record_at):
            raise DoriError(f"record_at: every step must be in [0, {self.steps}], got {self.record_at}")

    def recorded_steps(self) -> tuple[int, ...]:
        """The steps after which the success check runs (``record_at`` resolved)."""
        if self.record_at is not None:
            return tuple(sorted(set(self.record_at)))
        return tuple(sorted({s for s in (0, 1, 10, 25, 50) if s <= self.steps} | {self.steps}))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttackItem:
    """One trigger to find: a prompt (and its reference/target ``index``), a restart number."""

    prompt_id: str
    prompt: str
    index: int
    restart: int = 0

    @property
    def key(self) -> str:
        return f"{self.prompt_id}#r{self.restart}"


@dataclass
class AttackResult:
    key: str
    prompt_id: str
    prompt: str
    restart: int
    init: str
    status: str
    mr: float
    sscd_mean: float
    mr_by_step: dict[int, float] = field(default_factory=dict)
    sscd_by_step: dict[int, float] = field(default_factory=dict)
    relative_perturbation: float = float("nan")
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    steps_run: int = 0
    unet_evaluations: int = 0
    seconds: float = 0.0
    scores: list[float] = field(default_factory=list)
    """Similarity of each evaluation seed's image to the target, at the end."""
    trigger: torch.Tensor | None = field(default=None, repr=False)
    initial: torch.Tensor | None = field(default=None, repr=False)
    images: torch.Tensor | None = field(default=None, repr=False)
    """The final images of the evaluation seeds, ``(seeds, 3, H, W)``."""

    def record(self) -> dict:
        """A JSON-able record (without the tensors); no steps recorded gives ``None`` curves."""
        out = {k: v for k, v in asdict(self).items() if k not in ("trigger", "initial", "images")}
        out["mr_by_step"] = {str(k): v for k, v in self.mr_by_step.items()} or None
        out["sscd_by_step"] = {str(k): v for k, v in self.sscd_by_step.items()} or None
        return out


@dataclass
class _Model:
    """Remembers the UNet's mode and gradient flags, and puts them back."""

    unet: torch.nn.Module
    training: bool = False
    flags: list[bool] = field(default_factory=list)

    def __enter__(self):
        self.training = self.unet.training
        self.flags = [p.requires_grad for p in self.unet.parameters()]
        self.unet.eval().requires_grad_(False)
        return self

    def __exit__(self, *exc):
        self.unet.train(self.training)
        for p, flag in zip(self.unet.parameters(), self.flags, strict=True):
            p.requires_grad_(flag)


PARTS = {"objective": Objective, "success": SuccessCheck, "initializer": Initializer, "constraint": Constraint,
         "early_check": EarlyCheck}


def check_part(role: str, part: object) -> None:
    """Raise when ``part`` does not have the interface of its ``role`` (see :mod:`dori.attack.parts`)."""
    protocol = PARTS[role]
    if not isinstance(part, protocol):
        wanted = [name for name in ("__call__", "pairs", "cost", "name", "project")
                  if hasattr(protocol, name) or name in getattr(protocol, "__annotations__", {})]
        raise DoriError(f"{role}: {type(part).__name__} is not an attack {role} (it needs {', '.join(wanted)}; "
                        f"see dori.attack.parts.{protocol.__name__})")


@dataclass
class _Track:
    """Per-trigger bookkeeping of one :meth:`EmbeddingAttack.run`."""

    n: int
    steps: int

    def __post_init__(self) -> None:
        self.active = torch.ones(self.n, dtype=torch.bool)
        self.stopped_at = [self.steps] * self.n
        self.evals = np.zeros(self.n, dtype=int)
        self.passes = np.zeros(self.n, dtype=int)
        self.stop_after = [None] * self.n  # the step after which a trigger that passed its checks stops
        self.mr_by_step: list[dict[int, float]] = [{} for _ in range(self.n)]
        self.sscd_by_step: list[dict[int, float]] = [{} for _ in range(self.n)]
        self.first_loss = np.full(self.n, np.nan)
        self.last_loss = np.full(self.n, np.nan)

    def record(self, step: int, outcome) -> None:
        for i in range(self.n):
            self.mr_by_step[i][step] = float(outcome.mr[i])
            self.sscd_by_step[i][step] = float(outcome.scores[i].mean())

    def stop_due(self, step: int) -> None:
        """Stop the triggers whose stop step (set by a passed early check) has come."""
        for i, last in enumerate(self.stop_after):
            if last is not None and last <= step and bool(self.active[i]):
                self.active[i] = False
                self.stopped_at[i] = step

    def losses(self, idx: list[int], loss: torch.Tensor) -> None:
        values = loss.detach().float().cpu().numpy()  # one copy off the device per step
        first = np.isnan(self.first_loss[idx])
        self.first_loss[np.asarray(idx)[first]] = values[first]
        self.last_loss[idx] = values


class EmbeddingAttack:
    """Optimise text-conditioning embeddings so the (possibly mitigated) model reproduces targets.

    Parts (:mod:`dori.attack.parts`): ``objective`` (differentiable loss per trigger), ``success``
    (replication check, separate from the loss), ``constraint`` (projection after each step),
    ``initializer`` (start point), and the loop's ``config``; an optional ``early_check`` (cheap, every
    ``config.check_every`` steps) stops triggers that pass it ``config.check_confirm`` times in a row.
    Each part is checked against its protocol here. Gradients reach the embeddings only; the UNet's
    mode, gradient flags and hooks are left as found.
    """

    def __init__(self, pipe, *, objective: Objective, success: SuccessCheck, initializer: Initializer,
                 constraint: Constraint | None = None, config: AttackConfig | None = None,
                 early_check: EarlyCheck | None = None):
        config = config or AttackConfig()
        config.validate()
        constraint = constraint or NoConstraint()
        for role, part in (("objective", objective), ("success", success), ("initializer", initializer),
                           ("constraint", constraint)):
            check_part(role, part)
        if config.early_stop:
            if early_check is None:
                raise DoriError("early_stop: needs an early_check")
            check_part("early_check", early_check)
        self.pipe, self.objective, self.success = pipe, objective, success
        self.initializer, self.constraint = initializer, constraint
        self.config, self.early_check = config, early_check

    def run(self, items: list[AttackItem], targets: torch.Tensor,
            on_step: Callable[[int, int], None] | None = None) -> list[AttackResult]:
        """Attack ``items`` together in one UNet batch; ``targets[item.index]`` is each one's latent."""
        cfg = self.config
        t0 = time.perf_counter()
        which = [it.index for it in items]
        goal = targets[which]
        y0 = torch.stack([self.initializer(self.pipe, it.prompt, it.restart) for it in items]).float().detach()
        y = torch.nn.Parameter(y0.clone())
        optimizer = torch.optim.Adam([y], lr=cfg.lr)
        track = _Track(len(items), cfg.steps)
        recorded = cfg.recorded_steps()
        outcome, checked_at = None, None  # the success check's last outcome and the step it was taken after
        with _Model(self.pipe.unet):
            if 0 in recorded:
                outcome, checked_at = self.success(y.detach(), which), 0
                track.record(0, outcome)
            step = 0
            for step in range(1, cfg.steps + 1):
                idx = torch.nonzero(track.active).flatten().tolist()
                if not idx:
                    step -= 1
                    break
                self._step(y, y0, goal, items, idx, step, optimizer, track)
                if cfg.early_stop and step % cfg.check_every == 0:
                    self._early_stop(y, which, [i for i in idx if track.stop_after[i] is None], step, track)
                if cfg.early_stop:
                    track.stop_due(step)
                if step in recorded:
                    outcome, checked_at = self.success(y.detach(), which), step
                    track.record(step, outcome)
                if on_step:
                    on_step(step, cfg.steps)
        # the triggers have not moved since the last check: its outcome is the final one
        final = outcome if checked_at == step else self.success(y.detach(), which)
        return self._results(items, y, y0, final, track, recorded, time.perf_counter() - t0)

    def _step(self, y, y0, goal, items, idx: list[int], step: int, optimizer, track: _Track) -> None:
        """One Adam step on the active triggers ``idx``; the stopped ones keep their values."""
        cfg = self.config
        generators = [item_generator("dori", cfg.seed, items[i].key, step) for i in idx]
        frozen = y.detach()[~track.active].clone()
        loss = self.objective(y[idx], goal[idx], generators)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            y.data = self.constraint.project(y.data, y0)
            y.data[~track.active] = frozen
        track.evals[idx] += self.objective.pairs
        track.losses(idx, loss)

    def _early_stop(self, y, which: list[int], idx: list[int], step: int, track: _Track) -> None:
        """Check the triggers ``idx``; one that passes ``check_confirm`` checks in a row stops
        ``check_tail`` steps later (:meth:`_Track.stop_due`)."""
        if not idx:
            return
        passed = self.early_check(y.detach()[idx], [which[i] for i in idx])
        track.evals[idx] += self.early_check.cost
        for j, i in enumerate(idx):
            track.passes[i] = track.passes[i] + 1 if passed[j] else 0
            if track.passes[i] >= self.config.check_confirm:
                track.stop_after[i] = step + self.config.check_tail

    def _results(self, items, y, y0, final, track: _Track, recorded, seconds: float) -> list[AttackResult]:
        results = []
        for i, it in enumerate(items):
            for s in recorded:  # a trigger stopped early keeps its final state at later steps
                if s > track.stopped_at[i] or s not in track.mr_by_step[i]:
                    track.mr_by_step[i][s] = float(final.mr[i])
                    track.sscd_by_step[i][s] = float(final.scores[i].mean())
            delta = (y.detach()[i] - y0[i]).norm() / y0[i].norm().clamp_min(1e-12)
            results.append(AttackResult(
                key=it.key, prompt_id=it.prompt_id, prompt=it.prompt, restart=it.restart,
                init=getattr(self.initializer, "name", type(self.initializer).__name__),
                status="succeeded" if final.succeeded[i] else "failed",
                mr=float(final.mr[i]), sscd_mean=float(final.scores[i].mean()),
                mr_by_step=dict(sorted(track.mr_by_step[i].items())),
                sscd_by_step=dict(sorted(track.sscd_by_step[i].items())), relative_perturbation=float(delta),
                loss_first=float(track.first_loss[i]), loss_last=float(track.last_loss[i]),
                steps_run=track.stopped_at[i], unet_evaluations=int(track.evals[i]), seconds=seconds / len(items),
                scores=[float(v) for v in final.scores[i]], trigger=y.detach()[i].clone(), initial=y0[i].clone(),
                images=final.images[i] if final.images is not None else None,
            ))
        return results


def optimize_embeddings(objective: Objective, y0: torch.Tensor, targets: torch.Tensor, keys: list[str],
                        config: AttackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The bare Dori descent, without success checks: ``config.steps`` Adam steps on ``objective`` from
    ``y0`` toward ``targets``; the draws of trigger ``i`` at step ``s`` come from ``(keys[i], s)``.

    Returns the triggers and their last losses. Call it with the UNet frozen (see :class:`EmbeddingAttack`).
    """
    y = torch.nn.Parameter(y0.detach().float().clone())
    optimizer = torch.optim.Adam([y], lr=config.lr)
    loss = torch.full((len(y0),), float("nan"))
    for step in range(1, config.steps + 1):
        loss = objective(y, targets, [item_generator("dori", config.seed, key, step) for key in keys])
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
    return y.detach(), loss.detach()


class frozen_unet(_Model):
    """``with frozen_unet(unet):`` eval mode and no weight gradients inside, the old state after."""
