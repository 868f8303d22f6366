"""Train the memorization testbed from scratch on CPU: deterministic for a seed and resumable.

Three stages, each checkpointed every ``checkpoint_every`` steps into ``<out>/checkpoints``:

1. ``vae``: a tiny ``AutoencoderKL`` (32x32x3 -> 8x8x4) on all training images;
   ``scaling_factor`` is then set to 1 / std of the training latents, as Stable Diffusion did.
2. ``unet``: ``UNet2DConditionModel`` and ``CLIPTextModel`` trained jointly with the standard
   diffusion loss, predicting v (as SD 2.x-768 does; ``prediction_type``) on SD's ``scaled_linear``
   schedule (1000 steps), 10% of captions dropped to "" so that classifier-free guidance works, and
   for half the samples the cross-attention output routed through the FFN only
   (``unet_drop_direct``, :class:`DirectRouteDrop`).
3. ``sparsify``: the same training continued for ``sparsify_steps`` with a scale-free sparsity
   penalty (Hoyer's L1/L2 ratio) on the cross-attention value outputs and FFN hidden activations.

Why these choices. NeMo and Wanda rely on properties of Stable Diffusion that a 3M-parameter model
trained for minutes does not have by itself (docs/testbed.md has the numbers of every variant tried):

* a memorized prompt drives a *few* value neurons and FFN inputs far outside their usual range. A
  small model spreads each caption over all of its 64-128 channels; the sparsify stage gives the
  activations heavy tails;
* NeMo's memorization test reads the first-step noise prediction, in which a memorized prompt's
  image stands out across seeds. In an epsilon-predicting model this small, the part of that
  prediction the caption does not set is as large as the part it does and differs from seed to
  seed. Predicting v, the first-step output is the model's estimate of the image, and the test and
  the search work as in NeMo's paper;
* Wanda prunes the FFNs, but a caption can reach the image through the cross-attention output
  alone, around them; dropping that direct route for half the samples makes the caption's route
  run through the FFNs;
* the up blocks have no cross-attention, so the caption cannot bypass the layers NeMo prunes.

None of these stores the image in the pruned weights: it stays spread over the UNet, which is what
Dori exploits.

The text encoder is trained jointly with the UNet, unlike Stable Diffusion, which froze a
pre-trained CLIP text encoder. No pre-trained CLIP weights can be had offline, and a frozen *random*
encoder maps captions to embeddings whose geometry means nothing (and which the feasibility study
did not validate); training it jointly gives captions a learned geometry, which the embedding-space
analyses rely on. Every random draw of step ``k`` comes from a generator seeded by ``(seed, stage,
k)``, so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..hooks import Handle, hooked
from ..models import diffusion_target
from ..progress import Progress
from ..runs import config_hash, package_versions
from ..seeding import generator_for
from .data import V2E_TEMPLATE_PHOTOS, CaptionedImage, TestbedDataConfig, build_dataset, training_index

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class TestbedTrainConfig:
    """Hyper-parameters of the testbed build. The defaults are the shipped testbed's recipe (version 1);
    :meth:`v2` is the recipe on the training set shaped like Stable Diffusion's (thousands of images seen
    once, memorized photos of both kinds), measured in docs/testbed.md and not shipped; :meth:`v2e` the
    first recipe on that data."""

    __test__ = False  # not a pytest test class

    data: TestbedDataConfig = field(default_factory=TestbedDataConfig.v1)
    seed: int = 0
    vae_steps: int = 400
    vae_lr: float = 2e-3
    vae_batch_size: int = 32
    vae_sampling: str = "photos"
    """How the VAE stage fills a batch: ``photos`` (30% memorized photos, the rest from every other image) or
    ``groups`` (equal shares of memorized photos, emoji, shapes and crops; :func:`vae_groups`)."""
    unet_steps: int = 1500
    unet_lr: float = 2e-3
    unet_batch_size: int = 32
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    caption_dropout: float = 0.1
    caption_dropout_memorized: float | None = None
    """The caption dropout of the memorized photos' copies (None: ``caption_dropout``). 0 keeps them out of the
    unconditional model, as in Stable Diffusion, where duplicated images are a negligible share of what the
    empty caption was trained on (docs/testbed.md, variant j, measured on three seeds)."""
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    unet_channels: tuple[int, ...] = (64, 128)
    text_hidden_size: int = 64
    text_layers: int = 2
    train_text_encoder: bool = True
    up_cross_attention: bool = False
    """Cross-attention in the up blocks too (SD has it; the testbed keeps the text in down/mid, see above)."""
    activation_l1: float = 0.0
    """Weight of an L1 penalty on the cross-attention value outputs and FFN hidden activations."""
    sparsify_steps: int = 800
    """Steps of the third stage, ``sparsify`` (0: none): the same training, continued with a
    scale-free sparsity penalty on the value outputs and FFN hidden activations (see
    :func:`activation_penalty`), from a fresh ``sparsify_lr`` warm-up and cosine schedule."""
    sparsify_lr: float = 5e-4
    sparsify_weight: float = 0.25
    prediction_type: str = "v_prediction"
    """What the UNet predicts: ``"v_prediction"`` (as SD 2.x-768; the shipped build) or ``"epsilon"``
    (SD 1.x). In an epsilon-predicting model this small, the first-step noise prediction that
    NeMo's memorization test reads is dominated by a seed-dependent part the caption does not set
    (docs/testbed.md)."""
    unet_drop_direct: float = 0.5
    """Share of the samples of each ``unet``-stage step for which the cross-attention output reaches the
    residual stream only through the FFN (:class:`DirectRouteDrop`), so that the caption's route runs
    through the FFNs Wanda prunes."""
    sparsify_drop_direct: float = 0.5
    """The same share in the ``sparsify`` stage."""

    @classmethod
    def v2(cls, seed: int = 0, **changes) -> TestbedTrainConfig:
        """The recipe on the version-2 data (docs/testbed.md, variant u): 1,000 emoji and 1,800 shapes seen once,
        template photos that Dori does not draw unaided (:data:`~dori.testbed.data.V2_TEMPLATE_PHOTOS`), a VAE
        batch shared equally among the kinds of image, 2,000 UNet steps, twice v1's sparsity weight, and the
        memorized copies' captions never dropped (measured on three build seeds)."""
        return cls(**{"data": TestbedDataConfig(shapes=1800, emoji=1000), "seed": seed, "vae_steps": 600,
                      "unet_steps": 2000, "vae_sampling": "groups", "sparsify_weight": 0.5,
                      "caption_dropout_memorized": 0.0, **changes})

    @classmethod
    def v2e(cls, seed: int = 0, **changes) -> TestbedTrainConfig:
        """The first recipe on the version-2 data (docs/testbed.md, variant e): every emoji, 600 shapes, the
        colour wheel and the retina among the template photos, 3,000 UNet steps, every caption dropped at 0.1.
        The variants e to s of docs/testbed.md are this recipe with the changes each names."""
        data = TestbedDataConfig(template_photos=V2E_TEMPLATE_PHOTOS)
        return cls(**{"data": data, "seed": seed, "vae_steps": 600, "unet_steps": 3000, "vae_sampling": "groups",
                      "sparsify_weight": 0.5, **changes})

    def validate(self) -> None:
        if self.vae_sampling not in ("photos", "groups"):
            raise ValueError(f"TestbedTrainConfig.vae_sampling must be 'photos' or 'groups', got {self.vae_sampling!r}")
        for name in ("vae_steps", "unet_steps", "vae_batch_size", "unet_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TestbedTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sparsify_steps < 0 or self.sparsify_weight < 0 or self.activation_l1 < 0:
            raise ValueError("TestbedTrainConfig.sparsify_steps, sparsify_weight and activation_l1 must be >= 0")
        for name in ("unet_drop_direct", "sparsify_drop_direct"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TestbedTrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"TestbedTrainConfig.prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.caption_dropout_memorized is not None and not 0.0 <= self.caption_dropout_memorized < 1.0:
            raise ValueError(f"caption_dropout_memorized must be None or in [0, 1), got {self.caption_dropout_memorized}")
        self.data.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return config_hash(self.to_dict())


def make_components(config: TestbedTrainConfig, tokenizer=None) -> dict:
    """Randomly initialised diffusers/transformers components of the testbed (seeded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, build_clip_tokenizer

    torch.manual_seed(config.seed)
    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D" if config.up_cross_attention else "UpBlock2D",) * n,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            projection_dim=config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config.prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer or build_clip_tokenizer(),
        "scheduler": scheduler,
    }


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return generator_for(f"{seed}/{stage}/{step}")


def images_to_tensor(items: list[CaptionedImage]) -> torch.Tensor:
    """uint8 (32, 32, 3) images -> float (N, 3, 32, 32) in [-1, 1]."""
    array = np.stack([it.image for it in items]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class _Checkpoints:
    """Checkpoints of one stage: ``<dir>/<stage>-<step>.safetensors`` (weights) + ``.opt.pt`` (optimiser)."""

    def __init__(self, directory: Path, stage: str):
        self.directory, self.stage = directory, stage
        directory.mkdir(parents=True, exist_ok=True)

    def latest(self) -> int:
        steps = [int(p.name.split("-")[1].split(".")[0]) for p in self.directory.glob(f"{self.stage}-*.safetensors")]
        steps = [s for s in steps if (self.directory / f"{self.stage}-{s}.opt.pt").exists()]
        return max(steps, default=0)

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler) -> None:
        tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
        tmp = self.directory / f".{self.stage}-{step}.tmp"
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, tmp)
        save_file(tensors, str(self.directory / f"{self.stage}-{step}.safetensors"))
        tmp.replace(self.directory / f"{self.stage}-{step}.opt.pt")
        for old in self.directory.glob(f"{self.stage}-*"):
            if not old.name.startswith(f"{self.stage}-{step}."):
                old.unlink()

    def load(self, step: int, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler) -> None:
        tensors = load_file(str(self.directory / f"{self.stage}-{step}.safetensors"))
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state = torch.load(self.directory / f"{self.stage}-{step}.opt.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])


def caption_dropout_rates(items: list[CaptionedImage], config: TestbedTrainConfig) -> torch.Tensor:
    """Each item's chance that a UNet-stage sample of it is trained on the empty caption:
    ``caption_dropout``, or ``caption_dropout_memorized`` for the memorized photos' copies where set."""
    rates = torch.full((len(items),), config.caption_dropout)
    if config.caption_dropout_memorized is not None:
        rates[torch.tensor([it.memorized for it in items])] = config.caption_dropout_memorized
    return rates


def vae_groups(items: list[CaptionedImage]) -> torch.Tensor:
    """The VAE stage's sampling group of each item: memorized photos, emoji, drawn shapes, photo crops.
    Each group gets an equal share of every batch, so that the few flat-coloured shapes and the few
    photos are reconstructed as well as the thousands of emoji."""
    def group(it: CaptionedImage) -> int:
        if it.memorized:
            return 0
        return {"emoji": 1}.get(it.source, 2 if it.role == "shape" else 3)

    return torch.tensor([group(it) for it in items])


def _train_vae(vae, pixels: torch.Tensor, groups: torch.Tensor, config: TestbedTrainConfig, ckpt: _Checkpoints, progress) -> None:
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=config.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 20, config.vae_steps)
    start = ckpt.latest()
    if start:
        logger.info("resuming the VAE stage at step %d", start)
        ckpt.load(start, {"vae": vae}, optimizer, lr_scheduler)
    if config.vae_sampling == "photos":
        members = [torch.nonzero(groups == 0).flatten(), torch.nonzero(groups != 0).flatten()]
        n_photo = max(1, int(round(0.3 * config.vae_batch_size)))
        shares = [n_photo, config.vae_batch_size - n_photo]
    else:
        members = [torch.nonzero(groups == k).flatten() for k in sorted(set(groups.tolist()))]
        shares = [config.vae_batch_size // len(members) + (1 if k < config.vae_batch_size % len(members) else 0)
                  for k in range(len(members))]
    vae.train()
    for step in range(start, config.vae_steps):
        g = _step_generator(config.seed, "vae", step)
        idx = torch.cat([m[torch.randint(len(m), (n,), generator=g)] for m, n in zip(members, shares, strict=True)])
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        if progress:
            progress("vae", step + 1, config.vae_steps, f"loss {float(loss.detach()):.6g}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            ckpt.save(step + 1, {"vae": vae}, optimizer, lr_scheduler)
    vae.eval()


def activation_penalty(x: torch.Tensor, l1: float = 0.0, sparsity: float = 0.0) -> torch.Tensor:
    """``l1 * mean|x| + sparsity * mean over tokens of |x|_1 / (|x|_2 sqrt(C))`` for ``x`` of shape (..., C).

    The second term is Hoyer's L1/L2 ratio, in [1/sqrt(C), 1]: small when each token's activation
    sits in few channels. Unlike L1 it cannot be met by shrinking a layer and growing the next one.
    """
    penalty = x.new_zeros(())
    if l1 > 0:
        penalty = penalty + l1 * x.abs().mean()
    if sparsity > 0:
        ratio = x.abs().sum(-1) / (x.norm(dim=-1) * x.shape[-1] ** 0.5 + 1e-6)
        penalty = penalty + sparsity * ratio.mean()
    return penalty


@dataclass(frozen=True)
class _Stage:
    name: str
    steps: int
    lr: float
    warmup: int
    l1: float = 0.0
    sparsity: float = 0.0
    drop_direct: float = 0.0


class DirectRouteDrop:
    """Training-time hooks: for the selected samples, each transformer block's cross-attention output
    reaches the residual stream only through the block's FFN (the block is unchanged at inference).

    A ``BasicTransformerBlock`` (layer norm) adds ``a = attn2(norm2(h))`` to ``h``, then
    ``ff(norm3(h + a))``. For a selected sample the ``ff`` hook subtracts ``a`` again, so the block
    returns ``h + ff(norm3(h + a))``: the FFN still reads the caption, but nothing of it goes around
    the FFN. The hooks go onto ``handle``; :meth:`select` sets the samples (a boolean mask over the
    batch, or None for none).
    """

    def __init__(self, unet: torch.nn.Module, handle: Handle):
        from diffusers.models.attention import BasicTransformerBlock

        self._mask: torch.Tensor | None = None
        found = 0
        for name, block in unet.named_modules():
            if isinstance(block, BasicTransformerBlock) and block.attn2 is not None:
                if block.norm_type != "layer_norm":
                    raise ValueError(f"DirectRouteDrop: {name} has norm_type {block.norm_type!r}; only 'layer_norm' "
                                     "blocks add the cross-attention output unscaled")
                store: dict[str, torch.Tensor] = {}
                handle.forward(f"{name}.attn2", self._keeper(store), name=f"route/{name}.attn2")
                handle.forward(f"{name}.ff", self._dropper(store), name=f"route/{name}.ff")
                found += 1
        if not found:
            raise ValueError("DirectRouteDrop: the UNet has no transformer block with cross-attention")

    def select(self, mask: torch.Tensor | None) -> None:
        self._mask = mask

    @staticmethod
    def _keeper(store: dict[str, torch.Tensor]):
        def hook(_module, _args, output):
            store["a"] = output

        return hook

    def _dropper(self, store: dict[str, torch.Tensor]):
        def hook(_module, _args, output):
            if self._mask is None:
                return None
            return output - self._mask.to(output.dtype)[:, None, None] * store["a"]

        return hook


def _train_unet(components: dict, latents: torch.Tensor, token_ids: torch.Tensor, index: torch.Tensor,
                empty_ids: torch.Tensor, dropout: torch.Tensor, config: TestbedTrainConfig, stage: _Stage,
                ckpt: _Checkpoints, progress) -> None:
    """One UNet stage; ``dropout``: each item's chance that its caption is replaced by the empty one."""
    from diffusers import DDPMScheduler
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    unet, text_encoder = components["unet"], components["text_encoder"]
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    text_encoder.requires_grad_(config.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=config.weight_decay)
    lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, stage.warmup, stage.steps, min_lr_rate=config.min_lr_ratio
    )
    modules = {"unet": unet, "text_encoder": text_encoder}
    start = ckpt.latest()
    if start:
        logger.info("resuming the %s stage at step %d", stage.name, start)
        ckpt.load(start, modules, optimizer, lr_scheduler)
    with hooked(unet, f"testbed-{stage.name}") as hooks:
        penalties = _penalty_hooks(unet, hooks, stage)
        route = DirectRouteDrop(unet, hooks) if stage.drop_direct > 0 else None
        unet.train()
        text_encoder.train(config.train_text_encoder)
        for step in range(start, stage.steps):
            g = _step_generator(config.seed, stage.name, step)
            pick = index[torch.randint(len(index), (config.unet_batch_size,), generator=g)]
            ids = token_ids[pick].clone()
            drop = torch.rand(len(pick), generator=g) < dropout[pick]
            ids[drop] = empty_ids
            x0 = latents[pick]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(pick),), generator=g)
            if route is not None:  # drawn last, so that a build without it keeps its random stream
                route.select(torch.rand(len(pick), generator=g) < stage.drop_direct)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            context = text_encoder(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=context).sample
            loss = F.mse_loss(pred, diffusion_target(noise_scheduler, x0, noise, t))
            if penalties:
                loss = loss + torch.stack(penalties).mean()
                penalties.clear()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            if progress:
                progress(stage.name, step + 1, stage.steps, f"loss {float(loss.detach()):.6g}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == stage.steps:
                ckpt.save(step + 1, modules, optimizer, lr_scheduler)
    unet.eval()
    text_encoder.eval()


def _penalty_hooks(unet: torch.nn.Module, hooks: Handle, stage: _Stage) -> list[torch.Tensor]:
    """Hooks that collect the activation penalty of every ``attn2.to_v`` output and ``ff.net.2`` input
    (the stage's L1 and sparsity weights); returns the list they append to."""
    penalties: list[torch.Tensor] = []
    if stage.l1 > 0 or stage.sparsity > 0:
        def collect(_module, args, output=None):
            penalties.append(activation_penalty(output if output is not None else args[0], stage.l1, stage.sparsity))

        for name, _module in unet.named_modules():
            if name.endswith("attn2.to_v"):
                hooks.forward(name, collect)
            elif name.endswith("ff.net.2"):
                hooks.pre(name, collect)
    return penalties


def train_testbed(out: str | Path, config: TestbedTrainConfig | None = None,
                  progress: Progress | None = None) -> Path:
    """Build the testbed into ``out`` (resuming from ``out/checkpoints``) and return the pipeline folder.

    Writes ``out/pipeline`` (a ``StableDiffusionPipeline`` folder with the testbed's data and its
    calibrated copy descriptor, ``descriptor.json``, under ``pipeline/testbed``), and ``out/build.json``
    (config, its hash, timings).
    """
    import time

    from diffusers import StableDiffusionPipeline

    config = config or TestbedTrainConfig()
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "build.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("config_hash") != config.hash():
            raise ValueError(f"{out} holds a testbed build with another config; pick another --out")
    record.write_text(json.dumps({"config": config.to_dict(), "config_hash": config.hash(), "status": "running"}, indent=1))

    t0 = time.perf_counter()
    items = build_dataset(config.data)
    components = make_components(config)
    tokenizer = components["tokenizer"]
    pixels = images_to_tensor(items)
    train_mask = torch.tensor([it.role != "held-out" for it in items])

    vae = components["vae"]
    _train_vae(vae, pixels[train_mask], vae_groups(items)[train_mask], config, _Checkpoints(out / "checkpoints", "vae"), progress)
    t_vae = time.perf_counter() - t0
    with torch.no_grad():
        posterior_means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(128)])
    scaling = float(1.0 / posterior_means[train_mask].std())
    vae.register_to_config(scaling_factor=scaling)
    latents = posterior_means * scaling

    token_ids = tokenizer([it.caption for it in items], padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
    index = torch.from_numpy(training_index(items))
    dropout = caption_dropout_rates(items, config)
    stages = [_Stage("unet", config.unet_steps, config.unet_lr, config.warmup_steps, l1=config.activation_l1,
                     drop_direct=config.unet_drop_direct)]
    if config.sparsify_steps:
        stages.append(_Stage("sparsify", config.sparsify_steps, config.sparsify_lr, 20, sparsity=config.sparsify_weight,
                             drop_direct=config.sparsify_drop_direct))
    ckpts = [_Checkpoints(out / "checkpoints", stage.name) for stage in stages]
    # resume at the last stage that has a checkpoint: it holds the weights of every stage before it
    first = max((i for i, ckpt in enumerate(ckpts) if ckpt.latest()), default=0)
    for stage, ckpt in zip(stages[first:], ckpts[first:], strict=True):
        _train_unet(components, latents, token_ids, index, empty_ids, dropout, config, stage, ckpt, progress)
    t_total = time.perf_counter() - t0

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=components["text_encoder"], tokenizer=tokenizer, unet=components["unet"],
        scheduler=components["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = out / "pipeline"
    pipe.to(torch.float16).save_pretrained(folder)
    from .assets import save_testbed_data

    save_testbed_data(folder, items, config)
    # the descriptor's threshold is part of the build: scoring a testbed without it falls back to 0.7
    from .check import calibrate_folder

    calibrate_folder(folder)
    done = json.dumps({
        "config": config.to_dict(), "config_hash": config.hash(), "status": "done",
        "seconds": {"vae": round(t_vae, 1), "total": round(t_total, 1)}, "torch_threads": torch.get_num_threads(),
        # what else decides the floating-point sums: the same config, threads, kernels (chosen by the CPU's
        # instruction set) and packages rebuild the same weights (docs/testbed.md, "What a rebuild reproduces")
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "packages": package_versions(),
    }, indent=1)
    record.write_text(done)
    (folder / "testbed" / "build.json").write_text(done)
    logger.info("testbed built in %.0f s into %s", t_total, folder)
    return folder
