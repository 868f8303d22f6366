"""Paraphrases of memorized captions: other captions of the same subject.

Concept Ablation (its memorization mode) scores paraphrases to find anchor captions that do not
replicate; its official code asks an LLM (GPT-3.5 or Llama-3) for them, which dori cannot reach, so
they come from a file, or, on the testbed, from the captions it ships
(:data:`dori.testbed.data.MEMORIZED_PARAPHRASES`). The same captions are the testbed's *concept*
prompts, on which the damage a mitigation does to the subject is measured (the paper's A_Concept).

A paraphrase file is JSON: ``{"<prompt id or caption>": ["paraphrase", ...], ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DoriError
from .prompts import PromptRecord

FILE_HELP = 'a JSON file {"<prompt id or caption>": ["paraphrase", ...]}'


def testbed_paraphrases(records: list[PromptRecord]) -> dict[str, list[str]]:
    """The shipped paraphrases of the testbed's memorized captions (id ``memorized/<photo>``)."""
    from .testbed.data import MEMORIZED_PARAPHRASES

    out = {}
    for record in records:
        photo = record.id.split("/", 1)[-1]
        if record.group != "memorized" or photo not in MEMORIZED_PARAPHRASES:
            raise DoriError(f"paraphrases: the testbed ships paraphrases of its memorized captions only, and "
                            f"{record.id!r} is not one; give {FILE_HELP}")
        out[record.id] = list(MEMORIZED_PARAPHRASES[photo])
    return out


def load_paraphrases(spec: str | Path | None, records: list[PromptRecord], *, testbed: bool) -> dict[str, list[str]]:
    """Record id -> paraphrases, from the file ``spec``, or (``spec`` None) the testbed's own."""
    if spec is None:
        if testbed:
            return testbed_paraphrases(records)
        raise DoriError(f"paraphrases: this method needs paraphrases of each memorized caption (the official code asks "
                        f"an LLM for them); give {FILE_HELP}")
    path = Path(spec)
    if not path.is_file():
        raise DoriError(f"paraphrases: {path} is not a file; give {FILE_HELP}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DoriError(f"paraphrases: {path} is not JSON ({exc}); give {FILE_HELP}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                             for v in data.values()):
        raise DoriError(f"paraphrases: {path} must map each prompt id or caption to a list of strings")
    out = {}
    for record in records:
        found = data.get(record.id, data.get(record.prompt))
        if not found:
            raise DoriError(f"paraphrases: {path} has no paraphrases for {record.id!r} ({record.prompt!r})")
        out[record.id] = [p.strip() for p in found if p.strip()]
    return out
