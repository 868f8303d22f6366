"""Reading Y_adv: the Dori triggers of one memorized image from a ``dori attack`` or ``dori analyze scatter`` run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DoriError

logger = logging.getLogger(__name__)


@dataclass
class TriggerSet:
    """The triggers of one image: ``triggers`` ``(n, tokens, dim)`` in restart order, with their attack records."""

    run: Path
    prompt_id: str
    prompt: str
    keys: list[str]
    triggers: torch.Tensor
    records: list[dict] = field(repr=False)
    n_available: int = 0
    """Triggers of this image in the run before the success filter and the limit."""
    n_succeeded: int = 0
    successful_only: bool = True
    initial: torch.Tensor | None = None
    """The attack's start embeddings of the same triggers ``(n, tokens, dim)``, when the run kept them."""

    def __len__(self) -> int:
        return len(self.keys)


def attack_folder(run: str | Path) -> Path:
    """The attack run inside ``run``: ``run`` itself (a ``dori attack`` folder) or ``run/attack`` (a scatter run)."""
    run = Path(run)
    for candidate in (run / "attack", run):
        if (candidate / "triggers.safetensors").is_file() or (candidate / "triggers").is_dir():
            return candidate
    raise DoriError(f"triggers: {run} holds no Dori triggers (expected a `dori attack` or `dori analyze scatter` "
                    "run folder with triggers.safetensors)")


def run_model(run: str | Path) -> str | None:
    """The model a scatter or attack run used (its manifest's ``model.location``), if recorded."""
    location = run_model_record(run).get("location")
    return str(location) if location else None


def run_model_record(run: str | Path) -> dict:
    """The manifest's ``model`` record of a scatter or attack run (empty if none is readable)."""
    for folder in (Path(run), Path(run) / "attack"):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                model = json.loads(manifest.read_text()).get("model") or {}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise DoriError(f"triggers: {manifest} is not a run manifest (not a JSON object)") from None
            if model:
                return model
    return {}


def check_trigger_model(pipe, run: str | Path) -> None:
    """Refuse triggers found on another model than ``pipe`` (by the identity their run recorded)."""
    from ..fingerprint import identity_mismatch

    recorded = run_model_record(run)
    if recorded.get("identity"):
        why = identity_mismatch(recorded["identity"], pipe, lambda: {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        if why:
            raise DoriError(f"triggers: {run} were found on {recorded.get('location')}, not on this model ({why}); "
                            "analyse them with that model (leave out --model)")


def load_initial(folder: Path, keys: list[str]) -> torch.Tensor | None:
    """The start embeddings ``(n, tokens, dim)`` of ``keys`` from the attack's per-trigger files, or None."""
    from safetensors import safe_open

    found = {}
    for path in sorted((folder / "triggers").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            key = (f.metadata() or {}).get("key")
            if key in keys and "initial" in f.keys():
                found[key] = f.get_tensor("initial")
    if any(k not in found for k in keys):
        return None
    return torch.stack([found[k] for k in keys]).float()


def load_trigger_set(run: str | Path, prompt_id: str | None = None, *, successful_only: bool = True,
                     limit: int | None = None) -> TriggerSet:
    """The triggers of one image (``prompt_id``, default the run's first) from an attack or scatter run.

    ``successful_only``: keep the triggers whose generations replicated (status ``succeeded``), as the
    paper's Y_adv; ``limit``: the first N by restart number.
    """
    from ..attack.run import load_triggers
    from ..runs import read_records

    folder = attack_folder(run)
    records = read_records(folder)
    tensors = load_triggers(folder)
    records = [r for r in records if r["key"] in tensors]
    if not records:
        raise DoriError(f"triggers: {folder} has no finished triggers yet")
    ids = list(dict.fromkeys(r["prompt_id"] for r in sorted(records, key=lambda r: (r["prompt_id"], r["restart"]))))
    if prompt_id is None:
        prompt_id = ids[0]
    elif prompt_id not in ids:
        raise DoriError(f"prompt_id: {folder} has no triggers for {prompt_id!r}; it has {', '.join(ids)}")
    mine = sorted((r for r in records if r["prompt_id"] == prompt_id), key=lambda r: r["restart"])
    succeeded = [r for r in mine if r["status"] == "succeeded"]
    chosen = succeeded if successful_only else mine
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise DoriError(f"triggers: none of the {len(mine)} triggers of {prompt_id!r} in {folder} succeeded; "
                        "pass --all-triggers to use them anyway, or attack with more steps")
    logger.info("Y_adv: %d of %d triggers of %s (%d succeeded)", len(chosen), len(mine), prompt_id, len(succeeded))
    return TriggerSet(run=folder, prompt_id=prompt_id, prompt=mine[0]["prompt"], keys=[r["key"] for r in chosen],
                      triggers=torch.stack([tensors[r["key"]] for r in chosen]).float(), records=chosen,
                      n_available=len(mine), n_succeeded=len(succeeded), successful_only=successful_only,
                      initial=load_initial(folder, [r["key"] for r in chosen]))


def check_embedding_shape(pipe, embeds: torch.Tensor, what: str) -> None:
    """Raise when ``embeds`` ``(n, tokens, dim)`` do not fit the pipeline's text conditioning."""
    expected = (pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    if tuple(embeds.shape[1:]) != expected:
        raise DoriError(f"{what}: embeddings of shape {tuple(embeds.shape[1:])} do not fit this model's text "
                        f"conditioning {expected}; use the model the triggers were found on (--model)")


def analysis_inputs(pipe, config) -> tuple:
    """Y_adv (the triggers of ``config.triggers``, checked against the model) and Y_mem (``config.memorized``)
    of the activation and weight analyses: ``(trigger set, memorized ids, prompts, embeddings)``."""
    from .common import prompt_embeddings

    adv = load_trigger_set(config.triggers, config.prompt_id, successful_only=config.successful_only,
                           limit=config.max_triggers)
    check_trigger_model(pipe, config.triggers)
    check_embedding_shape(pipe, adv.triggers, "triggers")
    if not bool(torch.isfinite(adv.triggers).all()):
        raise DoriError(f"triggers: {adv.run} holds non-finite values (a damaged file or a diverged attack)")
    if len(adv) < 2:
        raise DoriError(f"triggers: need at least 2 triggers of {adv.prompt_id!r}, the run has {len(adv)} "
                        f"({'successful ' if config.successful_only else ''}of {adv.n_available})")
    mem_ids, mem_prompts, mem = prompt_embeddings(pipe, config.memorized, config.max_memorized)
    if len(mem_ids) < 2:
        raise DoriError(f"memorized: {config.memorized} has {len(mem_ids)} prompt(s); Y_mem needs at least 2")
    return adv, mem_ids, mem_prompts, mem
