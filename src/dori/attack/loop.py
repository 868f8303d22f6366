"""The optimiser loop of the embedding attack and its typed results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import DoriError
from .parts import DiffusionLoss, NoConstraint, ReplicationCheck, ShortSamplingCheck, item_generator

logger = logging.getLogger(__name__)

STATUSES = ("succeeded", "failed", "skipped")


@dataclass(frozen=True)
class AttackConfig:
    """The optimiser loop's settings (defaults: the paper's: Adam, lr 0.1, 50 steps, 8 (noise, t) pairs)."""

    steps: int = 50
    lr: float = 0.1
    pairs: int = 8
    record_at: tuple[int, ...] = (0, 1, 10, 25, 50)
    early_stop: bool = False
    check_every: int = 5
    check_margin: float = 0.1
    """The early check must clear the replication threshold by this much."""
    check_confirm: int = 2
    """Consecutive passing checks before a trigger stops (2: it keeps optimising ``check_every`` more
    steps after the first pass and must pass again, which weeds out triggers that only just pass)."""
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
        if any(s < 0 or s > self.steps for s in self.record_at):
            raise DoriError(f"record_at: every step must be in [0, {self.steps}], got {self.record_at}")

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


class EmbeddingAttack:
    """Optimise text-conditioning embeddings so the (possibly mitigated) model reproduces targets.

    Parts: ``objective`` (differentiable loss per trigger), ``success`` (replication check, separate
    from the loss), ``constraint`` (projection after each step), ``initializer`` (start point), and the
    loop's ``config``. Optional ``early_check`` (cheap, per step) stops triggers whose check passes.
    Gradients reach the embeddings only; the UNet's mode, gradient flags and hooks are left as found.
    """

    def __init__(self, pipe, *, objective: DiffusionLoss, success: ReplicationCheck, initializer,
                 constraint=None, config: AttackConfig | None = None, early_check: ShortSamplingCheck | None = None):
        config = config or AttackConfig()
        config.validate()
        if not callable(initializer):
            raise DoriError("initializer: must be callable (pipe, prompt, restart) -> (tokens, dim)")
        if config.early_stop and early_check is None:
            raise DoriError("early_stop: needs an early_check")
        self.pipe, self.objective, self.success = pipe, objective, success
        self.initializer, self.constraint = initializer, constraint or NoConstraint()
        self.config, self.early_check = config, early_check

    def run(self, items: list[AttackItem], targets: torch.Tensor,
            on_step: Callable[[int, int], None] | None = None) -> list[AttackResult]:
        """Attack ``items`` together in one UNet batch; ``targets[item.index]`` is each one's latent."""
        cfg = self.config
        t0 = time.perf_counter()
        n = len(items)
        which = [it.index for it in items]
        goal = targets[which]
        y0 = torch.stack([self.initializer(self.pipe, it.prompt, it.restart) for it in items]).float().detach()
        y = torch.nn.Parameter(y0.clone())
        optimizer = torch.optim.Adam([y], lr=cfg.lr)
        active = torch.ones(n, dtype=torch.bool)
        stopped_at = [cfg.steps] * n
        evals = np.zeros(n, dtype=int)
        passes = np.zeros(n, dtype=int)
        mr_by_step = [dict() for _ in range(n)]
        sscd_by_step = [dict() for _ in range(n)]
        first_loss = np.full(n, np.nan)
        last_loss = np.full(n, np.nan)

        def record(step: int) -> None:
            mr, mean = self.success(y.detach(), which)
            for i in range(n):
                mr_by_step[i][step], sscd_by_step[i][step] = float(mr[i]), float(mean[i])

        with _Model(self.pipe.unet):
            if 0 in cfg.record_at:
                record(0)
            for step in range(1, cfg.steps + 1):
                idx = torch.nonzero(active).flatten().tolist()
                if not idx:
                    break
                generators = [item_generator("dori", cfg.seed, items[i].key, step) for i in idx]
                frozen = y.detach()[~active].clone()
                loss = self.objective(y[idx], goal[idx], generators)
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
                with torch.no_grad():
                    y.data = self.constraint.project(y.data, y0)
                    y.data[~active] = frozen
                evals[idx] += cfg.pairs
                for j, i in enumerate(idx):
                    if np.isnan(first_loss[i]):
                        first_loss[i] = float(loss[j].detach())
                    last_loss[i] = float(loss[j].detach())
                if cfg.early_stop and step % cfg.check_every == 0:
                    checks = self.early_check(y.detach()[idx], [which[i] for i in idx])
                    evals[idx] += self.early_check.cost
                    for j, i in enumerate(idx):
                        passed = checks[j] > self.success.descriptor.threshold + cfg.check_margin
                        passes[i] = passes[i] + 1 if passed else 0
                        if passes[i] >= cfg.check_confirm:
                            active[i] = False
                            stopped_at[i] = step
                if step in cfg.record_at:
                    record(step)
                if on_step:
                    on_step(step, cfg.steps)
        final_scores = self.success.scores(y.detach(), which)
        final_images = getattr(self.success, "last_images", None)
        final_mr = (final_scores > self.success.descriptor.threshold).mean(1)
        final_mean = final_scores.mean(1)
        seconds = time.perf_counter() - t0
        results = []
        for i, it in enumerate(items):
            for s in cfg.record_at:  # a trigger stopped early keeps its final state at later steps
                if s > stopped_at[i] or s not in mr_by_step[i]:
                    mr_by_step[i][s], sscd_by_step[i][s] = float(final_mr[i]), float(final_mean[i])
            delta = (y.detach()[i] - y0[i]).norm() / y0[i].norm().clamp_min(1e-12)
            status = "succeeded" if final_mr[i] >= self.success.min_rate else "failed"
            results.append(AttackResult(
                key=it.key, prompt_id=it.prompt_id, prompt=it.prompt, restart=it.restart,
                init=getattr(self.initializer, "name", type(self.initializer).__name__), status=status,
                mr=float(final_mr[i]), sscd_mean=float(final_mean[i]), mr_by_step=dict(sorted(mr_by_step[i].items())),
                sscd_by_step=dict(sorted(sscd_by_step[i].items())), relative_perturbation=float(delta),
                loss_first=float(first_loss[i]), loss_last=float(last_loss[i]), steps_run=stopped_at[i],
                unet_evaluations=int(evals[i]), seconds=seconds / n, scores=[float(v) for v in final_scores[i]], trigger=y.detach()[i].clone(), initial=y0[i].clone(),
                images=final_images[i] if final_images is not None else None,
            ))
        return results


def optimize_embeddings(objective: DiffusionLoss, y0: torch.Tensor, targets: torch.Tensor, keys: list[str],
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
