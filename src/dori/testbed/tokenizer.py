"""The real CLIP BPE tokenizer, built offline from OpenAI's vocabulary file.

Stable Diffusion's tokenizer (``openai/clip-vit-large-patch14``) cannot be downloaded here, but its
vocabulary is fully determined by the BPE merges file that OpenAI published with CLIP (MIT licence,
vendored as ``dori/assets/bpe_simple_vocab_16e6.txt.gz``). The vocabulary is laid out exactly as in
OpenAI's ``SimpleTokenizer``: 256 byte symbols, the same with ``</w>``, the first 48,894 merges, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) -- 49,408 entries in all.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Path of the vendored ``bpe_simple_vocab_16e6.txt.gz``."""
    return Path(str(resources.files("dori") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def clip_vocab_and_merges(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` of the CLIP tokenizer from the gzipped merges file."""
    lines = gzip.open(path or bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(path: Path | None = None) -> CLIPTokenizer:
    """Build the CLIP tokenizer that Stable Diffusion v1.x uses, with no download.

    ``model_max_length`` is set to 77: without it ``StableDiffusionPipeline`` fails when it enables
    truncation.
    """
    vocab, merges = clip_vocab_and_merges(path)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
