"""Prompt sets: CSV / JSONL / TXT readers, the bundled public sets, the testbed's captions, references.

A :class:`PromptSet` is a list of :class:`PromptRecord` (``id``, ``prompt``, ``group``) plus, where
known, a reference image per id (the training image a replica would copy).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import DoriError
from .images import load_image

PROMPT_COLUMNS = ("prompt", "caption", "text")
ID_COLUMNS = ("id", "index", "key")
GROUP_COLUMNS = ("group", "type", "overfit_type", "role")
MEMORIZATION_KINDS = ("VM", "TM", "MV", "TV")
"""Webster's (2023) kinds of memorization as the bundled sets label them: verbatim and template (SD v1.4),
matching and template verbatim (SD 2)."""
URL_COLUMNS = ("url", "image_url", "link")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Bundled sets: name -> (file, description, filter on group). Sources and licences: dori/data/README.md.
BUNDLED: dict[str, tuple[str, str, str | None]] = {
    "webster-sd1": ("memorized_laion_prompts.csv", "Webster's 500 SD v1.4 memorized prompts, NeMo's VM/TM labels", None),
    "webster-sd1-vm": ("memorized_laion_prompts.csv", "the 112 verbatim-memorized (VM) prompts of webster-sd1", "VM"),
    "webster-sd1-tm": ("memorized_laion_prompts.csv", "the 388 template-memorized (TM) prompts of webster-sd1", "TM"),
    "webster-sd2": ("sd2_mem.jsonl", "Webster's 219 SD v2 memorized prompts (overfit_type MV/TV)", None),
    "sd2-219": ("sd2_mem219.txt", "the 219 SD v2 memorized prompts as plain text (Ren et al.)", None),
    "laion-nonmem": ("unmemorized_laion_prompts.csv", "500 non-memorized LAION prompts (NeMo)", None),
    "coco-10k": ("coco2014_val_10000.csv", "10,000 COCO 2014 val captions (NeMo's FID prompts)", None),
    "generic-nonmem": ("group_nomem500.txt", "500 generic non-memorized prompts (Ren et al.)", None),
}
TESTBED_SETS = ("testbed", "testbed:memorized", "testbed:memorized-vm", "testbed:memorized-tm", "testbed:template",
                "testbed:seen-once", "testbed:shape", "testbed:held-out", "testbed:concept")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    group: str | None = None
    url: str | None = None
    """Where the training image was published (LAION's URL), when the set says."""
    truncated: bool = False
    """Whether the model's tokenizer cuts the prompt (longer than its ``model_max_length`` tokens): the
    model sees only the beginning (set by :func:`prompts_for`)."""
    kind: str | None = None
    """The kind of memorization where the set says (:data:`MEMORIZATION_KINDS`): the testbed's manifest, or a
    group column holding those labels (Webster's sets)."""


@dataclass
class PromptSet:
    name: str
    records: list[PromptRecord]
    references: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """id -> uint8 ``(H, W, 3)`` reference image."""
    gallery: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Images any generation is compared against (the testbed's memorized photos)."""

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, limit: int | None) -> PromptSet:
        if limit is None:
            return self
        if limit < 1:
            raise DoriError(f"limit: must be >= 1, got {limit}")
        records = self.records[:limit]
        keep = {r.id for r in records}
        return PromptSet(self.name, records, {k: v for k, v in self.references.items() if k in keep}, self.gallery)


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {c.lower().strip(): c for c in columns if c is not None}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _records_from_rows(rows: list[dict], source: str) -> list[PromptRecord]:
    if not rows:
        raise DoriError(f"prompts: {source} holds no prompts")
    columns = list(rows[0].keys())
    prompt_col = _pick(columns, PROMPT_COLUMNS)
    if prompt_col is None:
        raise DoriError(f"prompts: {source} has no prompt column (columns: {', '.join(map(str, columns))}; "
                        f"expected one of {', '.join(PROMPT_COLUMNS)})")
    id_col, group_col, url_col = _pick(columns, ID_COLUMNS), _pick(columns, GROUP_COLUMNS), _pick(columns, URL_COLUMNS)

    def value(row: dict, column: str | None) -> str | None:
        return str(row[column]).strip() if column and row.get(column) not in (None, "") else None

    records = []
    for i, row in enumerate(rows):
        text = str(row.get(prompt_col) or "").strip()
        if not text:
            continue
        group = value(row, group_col)
        records.append(PromptRecord(value(row, id_col) or str(i), text, group, value(row, url_col),
                                    kind=group if group in MEMORIZATION_KINDS else None))
    if not records:
        raise DoriError(f"prompts: {source} holds no prompts (the {prompt_col!r} column is empty)")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DoriError(f"prompts: {source} has the id {dup!r} twice; ids must be unique")
    return records


def read_prompt_text(text: str, suffix: str, source: str) -> list[PromptRecord]:
    """Parse a prompt file's text: ``.txt`` (a prompt a line), ``.jsonl``, or ``.csv`` (``,`` ``;`` or tab)."""
    if suffix == ".txt":
        lines = [line.strip() for line in text.splitlines()]
        return _records_from_rows([{"prompt": line} for line in lines if line], source)
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DoriError(f"prompts: {source} line {n} is not JSON ({exc.msg})") from exc
        return _records_from_rows(rows, source)
    if suffix in (".csv", ".tsv"):
        if not text.strip():
            raise DoriError(f"prompts: {source} is empty")
        header = text.lstrip("\ufeff").splitlines()[0]
        delimiter = max(",;\t", key=header.count)
        return _records_from_rows(list(csv.DictReader(io.StringIO(text), delimiter=delimiter)), source)
    raise DoriError(f"prompts: {source} must end in .csv, .tsv, .jsonl or .txt")


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    path = Path(path)
    if not path.is_file():
        raise DoriError(f"prompts: file {path} does not exist")
    from .config_files import read_text

    return read_prompt_text(read_text(path, "prompts", "a prompt file"), path.suffix.lower(), str(path))


def load_reference_folder(folder: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """Reference images named ``<id>.png`` (or .jpg/.jpeg/.webp/.bmp); every id must have one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DoriError(f"references: {folder} is not a folder")
    found = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}

    def find(prompt_id: str) -> Path | None:
        # "<id>.png", or for ids with a slash ("memorized/astronaut") a sub-folder or "_" in its place
        for suffix in IMAGE_SUFFIXES:
            if (folder / f"{prompt_id}{suffix}").is_file():
                return folder / f"{prompt_id}{suffix}"
        return found.get(prompt_id) or found.get(prompt_id.replace("/", "_"))

    paths = {i: find(i) for i in ids}
    missing = [i for i, p in paths.items() if p is None]
    if missing:
        raise DoriError(f"references: no image for prompt id {missing[0]!r} in {folder} "
                        f"({len(missing)} of {len(ids)} missing; name them <id>.png)")
    return {i: load_image(p) for i, p in paths.items()}


def testbed_prompt_set(name: str, folder: str | Path) -> PromptSet:
    """The testbed's captions with their training images; ``testbed:<role>`` keeps one role,
    ``testbed:memorized-vm`` / ``-tm`` the memorized prompts of one kind (verbatim / template)."""
    from .testbed.assets import is_testbed_folder, load_testbed_data

    if not is_testbed_folder(folder):
        raise DoriError(f"prompts: {name} are the testbed's captions, and {folder} is not the testbed; give --prompts "
                        "(a bundled set such as webster-sd1-vm, or a CSV / JSONL / TXT file)")
    entries, images = load_testbed_data(folder)
    role = name.split(":", 1)[1] if ":" in name else None
    gallery = {e.source: images[e.index] for e in entries if e.role == "memorized"}
    if role == "concept":  # never trained on: other captions of each memorized photo's subject
        from .testbed.data import MEMORIZED_PARAPHRASES

        records = [PromptRecord(f"concept/{photo}-{k}", caption, "concept")
                   for photo, captions in MEMORIZED_PARAPHRASES.items() if photo in gallery
                   for k, caption in enumerate(captions)]
        return PromptSet(name, records, {r.id: gallery[r.id.split("/")[1].rsplit("-", 1)[0]] for r in records}, gallery)
    kind = None
    if role is not None and role.startswith("memorized-"):
        role, kind = "memorized", role.split("-", 1)[1].upper()
    chosen = [e for e in entries if (role is None or e.role == role) and (kind is None or e.kind == kind)]
    records = [PromptRecord(e.id, e.caption, e.role, kind=e.kind or None) for e in chosen]
    references = {e.id: images[e.index] for e in chosen}
    return PromptSet(name, records, references, gallery)


def load_prompt_set(spec: str, *, references: str | Path | None = None, model_folder: str | Path | None = None) -> PromptSet:
    """A bundled set by name, a ``testbed[:role]`` set, a CSV / JSONL / TXT file, or several of these joined
    by ``+`` (``testbed:memorized+testbed:template``: one set, in that order; an id may occur once)."""
    if len(spec_parts(spec)) > 1:
        return _joined_prompt_set(spec, references, model_folder)
    if spec in TESTBED_SETS:
        if model_folder is None:
            from .models import testbed_path

            model_folder = testbed_path()
        prompt_set = testbed_prompt_set(spec, model_folder)
    elif spec in BUNDLED:
        file, _, group = BUNDLED[spec]
        text = (resources.files("dori") / "data" / file).read_text(encoding="utf-8")
        records = read_prompt_text(text, Path(file).suffix, spec)
        if group is not None:
            records = [r for r in records if r.group == group]
        prompt_set = PromptSet(spec, records)
    elif spec.startswith("testbed:"):
        raise DoriError(f"prompts: unknown testbed set {spec!r}; choose from {', '.join(TESTBED_SETS)}")
    else:
        path = Path(spec)
        if not path.exists() and path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".txt"):
            raise DoriError(f"prompts: {spec!r} is neither a file nor a bundled set "
                            f"({', '.join([*BUNDLED, *TESTBED_SETS])})")
        prompt_set = PromptSet(path.stem, read_prompt_file(path))
    if references is not None:
        prompt_set.references = load_reference_folder(references, [r.id for r in prompt_set.records])
    return prompt_set


def spec_parts(spec: str) -> list[str]:
    """The prompt sets a ``--prompts`` value names: several joined by ``+``, or one (a bundled set or an
    existing file whose name holds ``+`` is one)."""
    if "+" not in spec or spec in BUNDLED or Path(spec).exists():
        return [spec]
    return [part for part in spec.split("+") if part]


def _joined_prompt_set(spec: str, references, model_folder) -> PromptSet:
    parts = [load_prompt_set(part, model_folder=model_folder) for part in spec_parts(spec)]
    records = [r for part in parts for r in part.records]
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DoriError(f"prompts: id {record.id!r} occurs twice in {spec!r}; join sets whose ids differ")
        seen.add(record.id)
    joined = PromptSet(spec, records, {k: v for part in parts for k, v in part.references.items()},
                       {k: v for part in parts for k, v in part.gallery.items()})
    if references is not None:
        joined.references = load_reference_folder(references, [r.id for r in records])
    return joined


def prompts_for(pipe, spec: str, *, references: str | Path | None = None, limit: int | None = None) -> PromptSet:
    """The prompt set ``spec`` as a verb on ``pipe`` reads it: the testbed's sets from the testbed ``pipe``
    came from, the reference images from ``references``, the first ``limit`` prompts."""
    from .models import testbed_folder

    folder = testbed_folder(pipe)
    if folder is None and any(part == "testbed" or part.startswith("testbed:") for part in spec_parts(spec)):
        raise DoriError(f"prompts: {spec} are the testbed's captions, and this model is not the testbed; give --prompts "
                        "(a bundled set such as webster-sd1-vm, or a CSV / JSONL / TXT file)")
    prompt_set = load_prompt_set(spec, references=references, model_folder=folder).subset(limit)
    mark_truncated(pipe, prompt_set)
    return prompt_set


def prompt_kinds(pipe, spec: str) -> dict[str, str]:
    """Prompt id -> ``VM`` / ``TM`` for the prompts of ``spec`` that carry a memorization kind."""
    return {r.id: r.kind for r in prompts_for(pipe, spec).records if r.kind}


def mark_truncated(pipe, prompt_set: PromptSet) -> int:
    """Mark the prompts ``pipe``'s tokenizer cuts (``record.truncated``) and warn once; returns how many."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not prompt_set.records:
        return 0
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer([r.prompt for r in prompt_set.records], verbose=False).input_ids]
    prompt_set.records = [replace(r, truncated=True) if n > limit else r
                          for r, n in zip(prompt_set.records, lengths, strict=True)]
    cut = [r for r in prompt_set.records if r.truncated]
    if cut:
        logging.getLogger(__name__).warning(
            "%d of %d prompts of %s are longer than the tokenizer's %d tokens and are cut to them (first: %s); "
            "records mark them truncated", len(cut), len(prompt_set.records), prompt_set.name, limit, cut[0].id)
    return len(cut)


def require_references(prompt_set: PromptSet, what: str) -> list[np.ndarray]:
    """The reference image of every prompt, in order; a missing one names the option that gives them."""
    missing = [r.id for r in prompt_set.records if r.id not in prompt_set.references]
    if missing:
        raise DoriError(f"references: {what} needs the training image of every prompt; none for {missing[0]!r} "
                        "(give --references DIR with <prompt id>.png files)")
    return [prompt_set.references[r.id] for r in prompt_set.records]
