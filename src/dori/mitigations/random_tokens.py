"""Somepalli et al. (NeurIPS 2023, "Understanding and Mitigating Copying in Diffusion Models"): random
number or word addition to the caption at inference.

Official code: ``somepago/DCR`` (``prompt_augmentation`` with ``insert_rand_word``; Wen et al. ship the
same function as their baselines, ``inference_mem.py --prompt_aug_style``). ``repeat_num`` times, a
random word is inserted at a uniformly random word position of the caption (split on spaces):

* ``rand_numb_add``: a random integer in [0, 100000) as text;
* ``rand_word_add``: a random token of the vocabulary (id < 49400), decoded to text.

Here it is an ``inference`` mitigation on the text encoder: a pre-hook decodes each tokenised caption,
inserts the words, and tokenises it again, so every verb that generates from captions sees the
augmented ones; the unconditional (empty) caption is left alone. It does not act on embeddings given
directly (an attack's triggers), which never pass the text encoder: Dori's threat model bypasses it.

Deviations (also in the sidecar): the draws for a caption come from a generator seeded by (``seed``, the
caption), so a caption gets the same augmentation in every batch (the official code draws from the
global NumPy / ``random`` state once per prompt, shared by its images); the caption is the tokenizer's
decoding of its tokens (lower-case, cleaned), which the CLIP tokenizer encodes to the same tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import DoriError
from ..hooks import Handle
from ..seeding import item_generator
from .base import handle_for, register_mitigation
from .kinds import SettingsMitigation

STYLES = ("rand_numb_add", "rand_word_add")
DEVIATIONS = (
    "draws seeded by (seed, caption): the same augmentation of a caption in every batch",
    "the caption is the tokenizer's decoding of its tokens",
)


@dataclass(frozen=True)
class RandomTokensConfig:
    """``style``: ``rand_numb_add`` (numbers) or ``rand_word_add`` (vocabulary tokens); ``repeat_num``:
    words inserted (DCR's inference default 2; Wen et al.'s command line 1)."""

    style: str = "rand_numb_add"
    repeat_num: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.style not in STYLES:
            raise DoriError(f"style: must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.repeat_num < 1:
            raise DoriError(f"repeat_num: must be >= 1, got {self.repeat_num}")

    def to_dict(self) -> dict:
        return asdict(self)


def augment_caption(caption: str, config: RandomTokensConfig, tokenizer) -> str:
    """``caption`` with ``config.repeat_num`` random words inserted at random word positions."""
    g = item_generator("random-tokens", config.seed, caption)
    words = caption.split(" ")
    for _ in range(config.repeat_num):
        if config.style == "rand_numb_add":
            word = str(int(torch.randint(0, 100000, (1,), generator=g)))
        else:
            word = tokenizer.decode([int(torch.randint(0, 49400, (1,), generator=g))])
        words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), word)
    return " ".join(words)


@register_mitigation("random-tokens")
class RandomTokens(SettingsMitigation):
    """Insert random numbers or words into every caption before it is encoded."""

    name = "random-tokens"
    Config = RandomTokensConfig
    deviations = DEVIATIONS

    @classmethod
    def check(cls, pipe, config: RandomTokensConfig) -> None:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise DoriError("random-tokens: the pipeline needs a tokenizer and a text encoder")

    def augmented_ids(self, tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` ``(B, tokens)`` with every non-empty caption augmented and tokenised again."""
        rows = []
        for ids in input_ids.tolist():
            caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if caption:
                caption = augment_caption(caption, self.config, tokenizer)
            rows.append(caption)
        out = tokenizer(rows, padding="max_length", max_length=input_ids.shape[1], truncation=True,
                        return_tensors="pt").input_ids
        return out.to(input_ids.device)

    def apply(self, pipe, prompt: str | None = None) -> Handle:
        """Augment the captions the text encoder sees while applied; ``remove()`` takes the hook off."""
        handle = handle_for(pipe.unet, self)
        tokenizer = pipe.tokenizer

        def pre(_module, args, kwargs):
            if "input_ids" in kwargs:
                return args, {**kwargs, "input_ids": self.augmented_ids(tokenizer, kwargs["input_ids"])}
            if args:
                return (self.augmented_ids(tokenizer, args[0]), *args[1:]), kwargs
            return None

        text = Handle(pipe.text_encoder, handle.owner)
        text.pre("", pre, with_kwargs=True, name="augment")
        handle.edit("text-encoder-hook", text.remove)
        return handle
