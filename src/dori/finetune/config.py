"""Settings of adversarial fine-tuning (the paper's section 2.6)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..attack.loop import AttackConfig
from ..descriptors import DescriptorConfig
from ..errors import DoriError
from ..generation import GenerationConfig
from ..weight_groups import WEIGHT_GROUPS, check_groups

INITS = ("prompt", "random")
RETAIN_TARGETS = ("data", "teacher")
SAMPLE_BY = ("image", "prompt")
"""What adversarial fine-tuning draws its attacked prompts over (:mod:`dori.finetune.sampling`)."""
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
"""Learning-rate schedules over the run (diffusers' ``get_scheduler``, after any warm-up)."""
SURROGATES = ("nemo", "palette")
"""The built-in surrogates (:mod:`dori.finetune.surrogates`); ``FinetuneConfig.surrogate`` may also be a folder."""


TEMPLATE_TESTBED_PROMPTS = "testbed:memorized+testbed:template"
"""What adversarial fine-tuning attacks on a testbed with template captions: a template photo is reached from
every caption of its template, not from the memorized one alone (docs/testbed.md)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Adversarial fine-tuning: Dori triggers against the current model, mapped to a surrogate image.

    Defaults are the paper's where it gives them (5 epochs, L = L_DM + L_Adv, all UNet weights, Dori
    with Adam lr 0.1, 50 steps, 8 (noise, t) pairs) and common choices where it is silent (AdamW, lr
    1e-5 as usual for full fine-tuning of SD, one retain batch per adversarial batch, inits from the
    prompt, surrogates from the NeMo-pruned model). :meth:`testbed` is the documented setting for the
    embedded testbed (docs/methods.md).
    """

    retain: str | None = None
    """The retain pairs (:mod:`dori.finetune.retain`): a folder of image-caption pairs, a prompt file with
    ``retain_images`` or ``retain_generate``, or ``testbed:retain``; None: ``testbed:retain`` on the
    testbed, else an error naming the option."""
    retain_images: str | None = None
    retain_generate: bool = False
    """Make the retain images with the model itself from the prompt file ``retain`` (kept in the run folder)."""
    epochs: int = 5
    images_per_step: int = 8
    steps_per_epoch: int | None = None
    """None: one pass over the memorized images, ``images_per_step`` at a time."""
    sample_by: str = "prompt"
    """What each step's attacked prompts are drawn over (:mod:`dori.finetune.sampling`): ``prompt``, every
    prompt equally often; ``image``, every training image equally often, an image that several prompts share
    (template memorization) through its prompts in turn. The same where each prompt has its own image; on a v2
    testbed build with every template caption attacked, ``image`` left more to a fresh Dori (docs/testbed.md)."""
    lr: float = 1e-5
    lr_schedule: str = "constant"
    """How the learning rate moves over the run (``LR_SCHEDULES``): ``constant`` (the paper is silent; a constant
    rate is what it describes), or ``cosine`` / ``linear`` decay to 0 at the last step."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up from 0 to ``lr`` before the schedule."""
    ema_decay: float = 0.0
    """0: the last step's weights are the result. In (0, 1): an exponential moving average of the trained
    weights is kept beside them (diffusers' ``EMAModel``: its decay rises as ``(1 + k) / (10 + k)`` over the
    first steps and stops at this value) and becomes the result; training and each step's Dori search use
    the weights themselves. Costs one more copy of the trained weights in memory and in each checkpoint
    (the paper is silent; docs/methods.md)."""
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    adv_weight: float = 1.0
    dm_weight: float = 1.0
    adv_pairs: int = 8
    """(noise, t) draws per trigger for L_Adv."""
    adv_timesteps: tuple[int, int] | None = None
    """The training timesteps ``[low, high)`` that L_Adv draws its t from; None: all of them (the paper). The
    inner Dori attack keeps drawing from all of them."""
    retain_batch_size: int = 8
    retain_uncond: float = 0.0
    """Share of retain pairs trained under the empty caption (the unconditional branch that classifier-free
    guidance reads; Stable Diffusion trained 10% of its pairs so)."""
    retain_target: str = "data"
    """What L_DM regresses on a noised retain latent: ``data``, the ordinary diffusion target (the paper's
    L_DM on LAION pairs); ``teacher``, the prediction of a frozen copy of the UNet as it was before
    fine-tuning (a distillation of the original model on the retain pairs; costs one more UNet in memory)."""
    inits: tuple[str, ...] = ("prompt",)
    inner: AttackConfig = field(default_factory=lambda: AttackConfig(record_at=()))
    """The Dori attack run against the current model at every step (its steps, lr, pairs)."""
    warm_start: bool = False
    """Start each step's attack from the previous step's trigger of the same image and init."""
    lora_rank: int = 0
    """0: update every UNet weight (the paper); > 0: a LoRA on the attention projections instead."""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    frozen_groups: tuple[str, ...] = ()
    """Weight groups of the UNet that keep their values (:data:`dori.weight_groups.WEIGHT_GROUPS`: ``cross_kv``,
    ``cross_qo``, ``self_attn``, ``ff``, ``rest``); with a LoRA, the adapters of layers in them are not trained.
    The paper trains every weight; docs/testbed.md measures freezing groups on the testbed."""
    mixed_precision: str = "no"
    checkpoint_every: int = 10
    seed: int = 0
    surrogate: str = "nemo"
    """``nemo``: generate each surrogate with NeMo-pruned models (escalated until the image stops
    replicating; the paper's surrogate); ``palette``: the prompt's training image with its pixels shuffled, its
    colours without its layout (not the paper's; docs/methods.md, "Palette surrogates"); or a folder of
    ``<prompt id>.png`` images."""
    surrogate_mitigation: str | None = None
    """A saved NeMo mitigation tried first (e.g. the one ``dori localize`` wrote)."""
    surrogate_seeds: int = 8
    surrogate_below: float = 1.0
    """A surrogate's similarity to every memorized image must stay below this share of the descriptor's
    threshold (1: anything under the threshold). The first pruned image under the threshold can be a near
    copy (0.55 against a threshold of 0.57 on a v2 testbed build), and mapping triggers onto a near copy
    leaves the image a short step away for a fresh Dori (docs/testbed.md)."""
    surrogate_fallback: str | None = None
    """A prompt set whose (unpruned) generations stand in where no pruned image stops replicating
    (``testbed:held-out`` in :meth:`testbed`); None: such a prompt is an error."""
    statistics: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    """Scores surrogates: none may replicate a memorized image."""
    save_pipeline: bool = True
    """Write the fine-tuned pipeline to ``<out>/pipeline`` (a normal diffusers folder)."""

    def validate(self) -> None:
        for name in ("epochs", "images_per_step", "adv_pairs", "retain_batch_size", "checkpoint_every",
                     "surrogate_seeds"):
            if getattr(self, name) < 1:
                raise DoriError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.adv_timesteps is not None and not (len(self.adv_timesteps) == 2
                                                   and 0 <= self.adv_timesteps[0] < self.adv_timesteps[1]):
            raise DoriError(f"adv_timesteps: must be None (every training timestep) or [low, high) with 0 <= low < "
                            f"high, got {self.adv_timesteps}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise DoriError(f"steps_per_epoch: must be >= 1 or None, got {self.steps_per_epoch}")
        if not 0 < self.surrogate_below <= 1:
            raise DoriError(f"surrogate_below: must be in (0, 1], got {self.surrogate_below}")
        if self.lr <= 0:
            raise DoriError(f"lr: must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DoriError(f"lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise DoriError(f"ema_decay: must be in [0, 1) (0: no moving average), got {self.ema_decay}")
        if self.lr_warmup_steps < 0:
            raise DoriError(f"lr_warmup_steps: must be >= 0, got {self.lr_warmup_steps}")
        if self.adv_weight < 0 or self.dm_weight < 0 or self.adv_weight + self.dm_weight == 0:
            raise DoriError("adv_weight, dm_weight: must be >= 0 and not both 0")
        if not 0 <= self.retain_uncond <= 1:
            raise DoriError(f"retain_uncond: must be in [0, 1], got {self.retain_uncond}")
        if self.sample_by not in SAMPLE_BY:
            raise DoriError(f"sample_by: must be one of {', '.join(SAMPLE_BY)}, got {self.sample_by!r}")
        if self.retain_target not in RETAIN_TARGETS:
            raise DoriError(f"retain_target: must be one of {', '.join(RETAIN_TARGETS)}, got {self.retain_target!r}")
        if not self.inits or any(i not in INITS for i in self.inits):
            raise DoriError(f"inits: each must be one of {', '.join(INITS)}, got {self.inits}")
        if self.lora_rank < 0:
            raise DoriError(f"lora_rank: must be >= 0, got {self.lora_rank}")
        frozen = check_groups(self.frozen_groups, "frozen_groups")
        if set(frozen) == set(WEIGHT_GROUPS):
            raise DoriError("frozen_groups: freezes every weight group; leave at least one to train")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DoriError(f"mixed_precision: must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        self.inner.validate()
        self.generation.validate()
        self.descriptor.validate()

    def surrogate_bar(self, threshold: float) -> float:
        """The similarity a surrogate must not reach against any memorized image (``surrogate_below``)."""
        return threshold * self.surrogate_below

    def steps_in_epoch(self, n_images: int) -> int:
        return self.steps_per_epoch or math.ceil(n_images / self.images_per_step)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> FinetuneConfig:
        return replace(self, **changes)

    @classmethod
    def testbed(cls, **changes) -> FinetuneConfig:
        """The testbed setting (docs/methods.md has the measurements behind each value): lr 5e-4 (the tiny
        UNet was trained at 2e-3; 1e-5 barely moves it), 12 steps per epoch (one pass over 4 images is a
        single step), inits from the prompt and from N(0, I), each step's attack warm-started from the
        last step's triggers and run 10 Adam steps (fresh against the current weights, 5x cheaper than
        50 from scratch), retain batch 48 at weight 4 (smaller or lighter retain terms cost the shape
        captions' colours), 20% of the retain pairs under the empty caption (without them guidance's
        unconditional branch drifts and the shapes lose their colours), surrogates below 0.75 of the
        threshold against every memorized photo (on v2 builds the first pruned image under the threshold
        was a near copy, and a fresh Dori brought the photo back), and a held-out caption's image as the
        surrogate where every pruned image of a prompt still copies some memorized photo."""
        base = cls(lr=5e-4, steps_per_epoch=12, images_per_step=4, inits=("prompt", "random"), warm_start=True,
                   inner=AttackConfig(steps=10, record_at=()), retain_batch_size=48, dm_weight=4.0,
                   retain_uncond=0.2, surrogate_below=0.75, surrogate_fallback="testbed:held-out")
        return replace(base, **changes)

    @classmethod
    def testbed_v2(cls, **changes) -> FinetuneConfig:
        """The setting for a testbed with template photos (``dori testbed build --recipe v2``): the testbed setting
        with 10 epochs, 20 inner Dori steps, the moving average of the weights at decay 0.9 as the result
        (docs/testbed.md, "A stronger inner attack") and palette surrogates, which keep the shape captions' colours
        where the NeMo-pruned ones lost them. docs/testbed.md ("Palette surrogates" and the section after it) has
        what it keeps on each build and fine-tuning seed, and where it does not hold: one fine-tuning seed of four on
        u seed 0 let a fresh Dori bring the cat back in 10 of 160 generations."""
        return cls.testbed(**{"epochs": 10, "ema_decay": 0.9, "inner": AttackConfig(steps=20, record_at=()),
                              "surrogate": "palette", **changes})
