"""Loading Stable Diffusion pipelines (hub id, local folder, or the embedded testbed) and module selectors."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .errors import DoriError

logger = logging.getLogger(__name__)

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Selector = str | Iterable[str] | Callable[[str, torch.nn.Module], bool]


def testbed_path() -> Path:
    """Folder of the testbed that ships with the package."""
    from importlib import resources

    return Path(str(resources.files("dori") / "assets" / "testbed"))


def check_pipeline_folder(folder: Path) -> None:
    """Raise a :class:`DoriError` naming what is missing when ``folder`` is not a saved SD pipeline."""
    if not folder.is_dir():
        raise DoriError(f"model: {folder} is not a folder (expected a pipeline saved with save_pretrained)")
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for name in PIPELINE_COMPONENTS:
        sub = folder / name
        wanted = "tokenizer_config.json" if name == "tokenizer" else (
            "scheduler_config.json" if name == "scheduler" else "config.json")
        if not (sub / wanted).is_file():
            missing.append(f"{name}/{wanted}")
    if missing:
        raise DoriError(
            f"model: {folder} is not a Stable Diffusion pipeline folder; missing {', '.join(missing)}"
        )


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def resolve_model(model: str | os.PathLike) -> tuple[str, str]:
    """Return ``(kind, location)`` with kind ``testbed``, ``folder``, ``single-file`` or ``hub``; raise on
    a bad path."""
    text = str(model)
    if text == "testbed":
        folder = testbed_path()
        if not (folder / "model_index.json").is_file():
            raise DoriError("model: the shipped testbed is missing; run `dori testbed build --install`")
        return "testbed", str(folder)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise DoriError(f"model: {path} is a file; give a pipeline folder, or a single-file checkpoint "
                            f"({', '.join(SINGLE_FILE_SUFFIXES)})")
        return "single-file", str(path)
    if path.exists():
        check_pipeline_folder(path)
        return "folder", str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return "hub", text
    raise DoriError(f"model: {text} does not exist (give a pipeline folder, a hub id such as "
                    "CompVis/stable-diffusion-v1-4, or 'testbed')")


def is_testbed_model(model: str | os.PathLike) -> bool:
    """Whether ``model`` is the shipped testbed or a testbed folder (a ``dori testbed build`` of your own):
    the verbs then run the testbed's story, with the captions and photos that folder holds."""
    kind, location = resolve_model(model)
    return kind == "testbed" or (kind == "folder" and (Path(location) / "testbed" / "manifest.json").is_file())


def is_template_testbed(model: str | os.PathLike) -> bool:
    """Whether ``model`` is a testbed whose data holds template (TM) captions, as a ``dori testbed build
    --recipe v2`` folder's does: the verbs then fine-tune with the setting measured for such builds."""
    if not is_testbed_model(model):
        return False
    from .testbed.assets import has_template_captions

    return has_template_captions(resolve_model(model)[1])


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise DoriError(f"dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


# /proc/cpuinfo flags of x86 CPUs that run each half precision natively (AVX-512 or AMX instructions).
_NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_runs_natively(dtype: str | torch.dtype) -> bool | None:
    """Whether this machine's CPU computes ``dtype`` in its own instructions: True for float32 and for a
    half precision whose AVX-512 / AMX flags ``/proc/cpuinfo`` lists, False when it lists neither, None
    where there is no ``/proc/cpuinfo`` to read. Without them PyTorch emulates the half precision, and
    its convolutions run hundreds of times slower than in float32 (docs/sd-scale.md)."""
    dtype = parse_dtype(dtype)
    if dtype not in _NATIVE_CPU_FLAGS:
        return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return any(flag in flags for flag in _NATIVE_CPU_FLAGS[dtype])


SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler",
              "lms": "LMSDiscreteScheduler", "ddpm": "DDPMScheduler"}


def swap_scheduler(pipe, scheduler: str) -> None:
    """Give ``pipe`` another scheduler class (a short name such as ``ddim`` or a diffusers class name) with
    the same noise schedule (``from_config`` of the current one)."""
    import diffusers

    name = SCHEDULERS.get(scheduler, scheduler)
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise DoriError(f"scheduler: {scheduler!r} is not a diffusers scheduler (e.g. {', '.join(SCHEDULERS)} or a "
                        "class name such as DDIMScheduler)")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _from_single_file(path: str, config: str | os.PathLike | None, kwargs: dict):
    """A single-file checkpoint (the original Stable Diffusion layout) through diffusers' ``from_single_file``,
    offline: the component configs and the tokenizer come from ``config``, a pipeline folder (or hub id)
    of the same architecture."""
    from diffusers import StableDiffusionPipeline

    if config is None:
        raise DoriError(f"model_config: the single-file checkpoint {path} needs the configs of its components, which "
                        "cannot be downloaded here: give --model-config DIR, a pipeline folder of the same "
                        "architecture (e.g. stable-diffusion-v1-4 saved with save_pretrained)")
    config_path = Path(config).expanduser()
    if config_path.exists():
        check_pipeline_folder(config_path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(path, config=str(config), local_files_only=True, **kwargs)
        pipe.register_to_config(_name_or_path=path)
        return pipe
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DoriError(f"model: could not load the single-file checkpoint {path} with the configs of {config} "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from exc


def load_pipeline(model: str | os.PathLike = "testbed", device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = torch.float32, scheduler: str | None = None,
                  model_config: str | os.PathLike | None = None):
    """Load a ``StableDiffusionPipeline`` (SD 1.x, 2.x or the testbed) with its progress bar switched off.

    ``model`` is ``"testbed"``, a local folder written by ``save_pretrained``, a single-file checkpoint
    (``.safetensors`` / ``.ckpt`` in the original layout, with ``model_config``: a pipeline folder of the
    same architecture for the component configs), or a diffusers hub id (downloaded only when the hub
    is reachable). ``scheduler``: another sampler than the model's own (see :func:`swap_scheduler`). The
    safety checker is not loaded. The result is a plain diffusers pipeline: every function of dori
    takes one loaded any other way just as well.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    dtype = parse_dtype(dtype)
    kind, location = resolve_model(model)
    diffusers_logging.disable_progress_bar()  # the library never prints; the CLI owns the progress bars
    transformers_logging.disable_progress_bar()
    kwargs = {"dtype": dtype, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        if kind == "single-file":
            pipe = _from_single_file(location, model_config, kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(location, **kwargs)
    except DoriError:
        raise
    except (OSError, ValueError) as exc:
        if kind == "hub":
            raise DoriError(f"model: could not load hub id {location!r} ({type(exc).__name__}); the hub may be "
                            "unreachable: save the pipeline with save_pretrained and pass its folder") from exc
        raise DoriError(f"model: could not load {location}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        swap_scheduler(pipe, scheduler)
    pipe.to(device)
    if pipe.unet.device.type == "cpu" and cpu_runs_natively(dtype) is False:
        logger.warning("dtype %s on this CPU, which has no %s instructions: PyTorch emulates it and runs "
                       "convolutions hundreds of times slower than in float32; use float32 on this CPU",
                       str(dtype).removeprefix("torch."), " / ".join(_NATIVE_CPU_FLAGS[dtype]))
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        module.eval().requires_grad_(False)
        for tensor_name, tensor in module.state_dict().items():  # a damaged checkpoint must not draw black images
            # one pass: a sum is finite exactly when every value is (weights never overflow float32)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
                raise DoriError(f"model: {location} has non-finite weights in {name}.{tensor_name} (a damaged "
                                "checkpoint)")
    logger.info("loaded %s pipeline from %s", kind, location)
    return pipe


def pipeline_location(pipe) -> str | None:
    """The folder or hub id ``pipe`` was loaded from (diffusers' ``name_or_path``), or None for a pipeline
    built in memory."""
    location = getattr(pipe, "name_or_path", None)
    return str(location) if location else None


def testbed_folder(pipe) -> Path | None:
    """The folder of ``pipe`` when it holds dori testbed data (``<folder>/testbed/manifest.json``), else None."""
    location = pipeline_location(pipe)
    if location and (Path(location) / "testbed" / "manifest.json").is_file():
        return Path(location)
    return None


def save_pipeline_folder(pipe, folder: str | os.PathLike) -> Path:
    """``pipe.save_pretrained(folder)``, with the testbed's prompt sets and images beside it when ``pipe``
    is (derived from) the testbed, so that the saved folder works wherever the testbed does."""
    import shutil

    folder = Path(folder)
    source = testbed_folder(pipe)
    pipe.save_pretrained(folder)
    if source is not None:
        from .testbed.assets import SUBFOLDER

        shutil.copytree(source / SUBFOLDER, folder / SUBFOLDER, dirs_exist_ok=True)
    return folder


def model_name(model) -> str:
    """A short name for run folders: ``testbed``, the folder name, or the hub id's last part; ``model`` is a
    pipeline or what :func:`load_pipeline` takes."""
    if not isinstance(model, str | os.PathLike):
        if testbed_folder(model) == testbed_path():
            return "testbed"
        model = pipeline_location(model) or "model"
    text = str(model).rstrip("/")
    return "testbed" if text == "testbed" else re.sub(r"[^\w.-]+", "-", Path(text).name or text)


def model_record(pipe) -> dict:
    """What a run's manifest says about its model: where it came from, its dtype and prediction type."""
    from .fingerprint import model_identity

    identity = model_identity(pipe, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    return {"location": pipeline_location(pipe), "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "device": str(pipe.unet.device), "prediction_type": pipe.scheduler.config.prediction_type,
            "scheduler": type(pipe.scheduler).__name__,
            "identity": identity}


def select_modules(root: torch.nn.Module, selector: Selector) -> dict[str, torch.nn.Module]:
    """Modules of ``root`` by name: a glob (``"*attn2.to_v"``), a list of exact names, or a predicate.

    Names come from ``root.named_modules()`` (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v``),
    so no block index is hard-coded.
    """
    named = dict(root.named_modules())
    if isinstance(selector, str):
        found = {n: m for n, m in named.items() if fnmatch.fnmatchcase(n, selector)}
    elif callable(selector):
        found = {n: m for n, m in named.items() if selector(n, m)}
    else:
        names = list(selector)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise DoriError(f"modules: no module named {unknown[0]!r} in {type(root).__name__}")
        found = {n: named[n] for n in names}
    return found


_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def linear_layers(unet: torch.nn.Module, patterns: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """``nn.Linear`` modules matching any glob, in execution order (down blocks, mid block, up blocks)."""
    found: dict[str, torch.nn.Module] = {}
    for pattern in patterns:
        found.update(select_modules(unet, pattern))
    found = {n: m for n, m in found.items() if isinstance(m, torch.nn.Linear)}
    if not found:
        raise DoriError(f"layers: no Linear module of the UNet matches {patterns}")
    return {n: found[n] for n in sorted(found, key=lambda n: (_BLOCK_ORDER.get(n.split(".")[0], 3), n))}


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs ``(N, tokens, dim)`` of ``prompts`` (no guidance, no gradient)."""
    with torch.no_grad():
        return pipe.encode_prompt(list(prompts), pipe.unet.device, 1, False)[0]


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of the diffusion loss for ``scheduler``'s prediction type: the noise
    (epsilon, SD 1.x) or the velocity (v_prediction, SD 2.x-768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise DoriError(f"scheduler: prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def initial_latents(pipe, seeds: list[int]) -> torch.Tensor:
    """One seeded initial latent per seed ``(S, C, h, w)``, drawn as the pipeline draws them."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = pipe.unet
    size = unet.config.sample_size
    shape = (1, unet.config.in_channels, size, size)
    return torch.cat([randn_tensor(shape, generator=torch.Generator().manual_seed(int(s)), dtype=unet.dtype)
                      for s in seeds]).to(unet.device)


def center_square(images: torch.Tensor) -> torch.Tensor:
    """The centred square crop of ``(N, C, H, W)`` images (Stable Diffusion's training images were
    resized on the short side and centre-cropped)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]


def encode_images(pipe, images, batch_size: int | None = None) -> torch.Tensor:
    """VAE latents (posterior mean x ``vae.config.scaling_factor``) ``(N, C, h, w)`` of ``images``: a float
    ``(N, 3, H, W)`` batch in [0, 1], or a list of uint8 ``(H, W, 3)`` / ``(H, W)`` arrays of any sizes
    (training images). Each is centre-cropped to a square and resized to the model's resolution; the
    VAE sees ``batch_size`` images at a time (None: all at once)."""
    import torch.nn.functional as F

    from .images import to_rgb, to_tensor

    vae = pipe.vae
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = [images[i : i + 1] for i in range(len(images))] if isinstance(images, torch.Tensor) else \
        [to_tensor(to_rgb(image)) for image in images]
    squares = []
    for x in batch:
        x = center_square(x.float())
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        squares.append(x)
    x = torch.cat(squares).to(vae.device, vae.dtype)
    with torch.no_grad():
        chunks = x.split(batch_size) if batch_size else (x,)
        return torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in chunks]) * vae.config.scaling_factor


def weights_fingerprint(*modules: torch.nn.Module, extra: object = ()) -> str:
    """16 hex digits of the SHA-256 of the modules' tensors (names, shapes, dtypes and bytes) and ``extra``:
    the identity of the weights a cached or saved result depends on. Tensors are hashed one at a time
    (on the CPU), so memory stays at the largest tensor."""
    import hashlib

    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            t = tensor.detach()
            h.update(f"{i}/{name}/{tuple(t.shape)}/{t.dtype}".encode())
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]
