"""Run folders: a self-describing, resumable record of one command.

::

    runs/<command>-<model>-<UTC time>/
        manifest.json          command line, config (give it back as --config), model, what was resolved
                               from them, their hash, versions, git sha, seeds, status (running/done/failed)
        records.rank<k>.jsonl  one JSON line per finished work item, appended by process k
        records.parquet        all records, merged and sorted by key, at the end
        images/                generated images

A run started again with the same config skips the work items whose records exist; a record is
written only after its image, and a line cut by a kill is dropped, so a killed and resumed run ends
with exactly the records of an uninterrupted one. A run that raises is marked ``failed`` with its
error (:meth:`RunFolder.guard`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DoriError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGES = ("dori", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy")


def config_hash(config: dict) -> str:
    """16 hex digits of the SHA-256 of ``config`` as sorted JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_filename(key: str) -> str:
    """``key`` with every character but letters, digits and ``-_.`` replaced by ``_`` (``memorized/astronaut#3``
    -> ``memorized_astronaut_3``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cache_dir() -> Path:
    """Where dori keeps what it can compute again (NeMo's statistics, fine-tuned models): ``$DORI_CACHE``,
    default ``~/.cache/dori``."""
    return Path(os.environ.get("DORI_CACHE", Path.home() / ".cache" / "dori"))


def default_run_dir(command: str, model: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(root) / f"{command}-{model}-{stamp}"


def read_jsonl(path: Path) -> list[dict]:
    """Records of one JSONL file; an incomplete last line (a kill mid-write) is dropped."""
    data = path.read_bytes()
    if not data:
        return []
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def read_records(folder: Path) -> list[dict]:
    """The records of a run folder, from every process's ``records.rank<k>.jsonl`` (last one per key wins)."""
    by_key: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("records.rank*.jsonl")):
        for record in read_jsonl(path):
            by_key[record["key"]] = record
    return list(by_key.values())


def folder_bytes(path: str | Path) -> int:
    """Bytes a file, or every file under a folder, takes (0 when ``path`` does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_writable(path: str | Path, *, file: bool = False, option: str = "out") -> Path:
    """Refuse, before anything is created, an output ``path`` (a folder, or a ``file``) that cannot be
    made: one that exists as the other kind, or whose nearest existing folder cannot be written to
    (probed with a temporary file, which works on read-only filesystems and for root alike)."""
    import tempfile

    path = Path(path)
    if path.exists():
        if file and path.is_dir():
            raise DoriError(f"{option}: {path} is a folder; give a file path")
        if not file and not path.is_dir():
            raise DoriError(f"{option}: {path} is a file; give a folder (an existing run folder, or a new one)")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DoriError(f"{option}: {path} cannot be created: {parent} is a file")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise DoriError(f"{option}: cannot create files in {parent} ({exc.strerror or exc})") from None
    return path


INVOCATION: dict[str, str | None] = {}
"""How the command line chose the settings (``preset``, ``config_file``), set by the CLI and recorded in
every manifest it writes; empty when the library is called from Python."""


class RunFolder:
    """One run's folder; ``rank`` / ``world_size`` come from accelerate when several processes share it.

    ``config``: the verb's config (``to_dict``), what ``--config`` takes back; ``model``: where the model
    came from and its dtype (:func:`dori.models.model_record`); ``resolved``: what the run derived from
    them that decides its records (e.g. the descriptor's threshold). All three are hashed: a folder
    resumes only the same run, and refuses another unless ``overwrite``.
    """

    def __init__(self, path: str | Path, command: str, config: dict, *, model: dict | None = None,
                 resolved: dict | None = None, overwrite: bool = False, rank: int = 0, world_size: int = 1,
                 seeds: Iterable[int] | None = None):
        self.path = check_writable(path)
        self.command, self.config = command, config
        self.model, self.resolved = model or {}, resolved or {}
        identity = {k: self.model.get(k) for k in ("location", "dtype")} if self.model else None
        self.hash = config_hash({"config": config, "model": identity, "resolved": self.resolved})
        self.rank, self.world_size = rank, world_size
        self.barrier = lambda: None
        """Waits for every process of the run (set by :class:`Processes`; nothing to wait for with one)."""
        self.images = self.path / "images"
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            if previous.get("config_hash") != self.hash or previous.get("command") != command:
                if not overwrite:
                    raise DoriError(f"out: {self.path} holds a run with another config "
                                    f"({previous.get('command')}, hash {previous.get('config_hash')}); "
                                    "pass --overwrite to replace it or choose another --out")
                if rank == 0:
                    shutil.rmtree(self.path)
            elif overwrite and rank == 0:
                shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise DoriError(f"out: {self.path} exists and is not a dori run folder; choose another --out")
        self.images.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not manifest_path.exists():
            self.write_manifest({"status": "running", "seeds": list(seeds) if seeds is not None else None})
        self._repair_tail()

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        path = self.path / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def write_manifest(self, updates: dict | None = None) -> None:
        manifest = self.manifest() or {
            "command": self.command,
            "argv": sys.argv,
            "preset": INVOCATION.get("preset"),
            "config_file": INVOCATION.get("config_file"),
            "config": self.config,
            "model": self.model,
            "resolved": self.resolved,
            "config_hash": self.hash,
            "versions": package_versions(),
            "git_sha": git_sha(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "world_size": self.world_size,
        }
        manifest.update(updates or {})
        tmp = self.path / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json_text(manifest, indent=1))
        tmp.replace(self.path / MANIFEST)

    # -- records --------------------------------------------------------------------------
    @property
    def records_file(self) -> Path:
        return self.path / f"records.rank{self.rank}.jsonl"

    def _repair_tail(self) -> None:
        path = self.records_file
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> list[dict]:
        """Every record written by any process (unsorted, last one per key wins)."""
        return read_records(self.path)

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json_text(r) + "\n" for r in records)
        with open(self.records_file, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def guard(self) -> Iterator[RunFolder]:
        """``with run.guard():`` the work of the run; an exception marks it ``failed`` (with the error) in the
        manifest before it propagates, an interruption ``interrupted`` (run it again to resume)."""
        try:
            yield self
        except KeyboardInterrupt:
            if self.rank == 0:
                self.write_manifest({"status": "interrupted"})
            raise
        except BaseException as exc:
            if self.rank == 0:
                self.write_manifest({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
            raise

    def write_summary(self, summary: dict) -> Path:
        """``summary.json`` as standard JSON (NaN and infinities written as null)."""
        path = self.path / "summary.json"
        path.write_text(json_text(summary, indent=1))
        return path

    def finalize(self, summary: dict | None = None) -> Path:
        """Merge every process's records into ``records.parquet`` (sorted by key) and mark the run done."""
        import pandas as pd

        records = sorted(self.records(), key=lambda r: r["key"])
        table = pd.DataFrame.from_records(records)
        for column in table.columns:  # Parquet has no struct without fields: keep all-empty dicts as JSON text
            values = [v for v in table[column] if v is not None]
            if values and all(isinstance(v, dict) and not v for v in values):
                table[column] = [None if v is None else "{}" for v in table[column]]
        out = self.path / "records.parquet"
        table.to_parquet(out, index=False)
        if summary is not None:
            self.write_summary(summary)
        self.write_manifest({"status": "done", "error": None, "n_records": len(records),
                             "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
        return out


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON outputs stay standard JSON)."""
    import math

    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, str | bytes):
        value = value.item()  # numpy and torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value, indent: int | None = None) -> str:
    """``value`` as standard JSON: NaN and infinities written as null, paths and other objects as strings."""
    return json.dumps(json_safe(value), indent=indent, default=str, allow_nan=False)


_SOLO = {"on": False}


class Processes:
    """The processes sharing a run (accelerate's state; on CPU they talk over gloo): ``rank`` of ``world``.

    A run launched with ``accelerate launch`` gives each process its share of the work items
    (``items[rank::world]``) and its own records file; :meth:`barrier` waits for all of them. Inside
    :meth:`main_only` the main process works alone (its nested runs see one process)."""

    def __init__(self, pipe=None):
        from accelerate import PartialState

        cpu = pipe is None or pipe.unet.device.type == "cpu"
        self.state = PartialState(cpu=cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        if _SOLO["on"]:
            self.rank, self.world = 0, 1

    @contextmanager
    def main_only(self) -> Iterator[bool]:
        """``with processes.main_only() as mine: if mine: ...``: the block's work in the main process only,
        as a single-process run; the others wait at its end."""
        if not self.main:
            yield False
            self.barrier()
            return
        _SOLO["on"] = True
        threads = self._solo_threads()
        try:
            yield True
        finally:
            _SOLO["on"] = False
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
        self.barrier()

    def _solo_threads(self) -> int | None:
        """On CPU, the main process's work alone gets the threads of every process (the others wait at the
        barrier); returns the thread count to restore, or None when nothing changed."""
        import torch

        if self.world == 1 or self.state.device.type != "cpu":
            return None
        before = torch.get_num_threads()
        torch.set_num_threads(before * self.world)
        return before

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def open(self, path: str | Path, command: str, config: dict, **kwargs) -> RunFolder:
        """The run folder, made (or checked) by the main process first, then opened by the others."""
        if not self.main:
            self.barrier()
        run = RunFolder(path, command, config, rank=self.rank, world_size=self.world,
                        **{**kwargs, "overwrite": kwargs.get("overwrite", False) and self.main})
        run.barrier = self.barrier
        if self.main:
            self.barrier()
        return run
