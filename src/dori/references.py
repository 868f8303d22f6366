"""``dori references``: fetch the training images of a prompt set from the URLs it lists into a
references folder (``<prompt id>.<ext>``, what ``--references`` takes).

Many LAION links are dead or now serve something else, so every file is checked before it is kept:
downloads run concurrently, transient failures (timeouts, connection errors, HTTP 429 and 5xx) are
retried with exponential back-off, a body shorter than its ``Content-Length`` or an image that does
not decode completely is refused, and ``references.csv`` lists every link with its status:

* ``ok`` (fetched now), ``kept`` (already in the folder and decodable: a rerun resumes), ``changed``
  (``refresh``: the URL now serves other bytes than the ones kept, which are replaced);
* ``dead`` (HTTP 4xx), ``failed`` (5xx or connection errors after the retries), ``timeout``,
  ``not-an-image`` (e.g. an HTML page in its place), ``truncated``, ``too-large``, ``no-url``.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DoriError
from .progress import Progress
from .runs import check_writable, safe_filename

logger = logging.getLogger(__name__)

TABLE = "references.csv"
COLUMNS = ("id", "url", "status", "file", "http_status", "bytes", "sha256", "width", "height", "attempts", "error")
GOOD = ("ok", "kept", "changed")
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass(frozen=True)
class FetchConfig:
    """Which prompt set, how many at once, how patiently."""

    prompts: str = "webster-sd1-vm"
    limit: int | None = None
    workers: int = 8
    retries: int = 3
    """Further tries after the first, for transient failures only."""
    timeout: float = 20.0
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each further one."""
    max_bytes: int = 50 * 2**20
    refresh: bool = False
    """Fetch kept images again and report ``changed`` where the bytes differ."""
    user_agent: str = "dori-references (research; Finding Dori reproduction)"

    def validate(self) -> None:
        if self.workers < 1 or self.retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.max_bytes < 1:
            raise DoriError("workers, retries, timeout, backoff, max_bytes: workers >= 1, retries >= 0, timeout > 0, "
                            "backoff >= 0, max_bytes >= 1")


@dataclass
class Fetched:
    id: str
    url: str | None
    status: str
    file: str | None = None
    http_status: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    attempts: int = 0
    error: str | None = None


class _Transient(Exception):
    """A failure worth another try."""

    def __init__(self, status: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.status, self.http_status = status, http_status


class _Final(Exception):
    def __init__(self, status: str, message: str, http_status: int | None = None):
        super().__init__(message)
        self.status, self.http_status = status, http_status


def _decode(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of a completely decodable image, else :class:`_Final`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.format or "", image.width, image.height
    except UnidentifiedImageError as exc:
        raise _Final("not-an-image", f"not an image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # "image file is truncated", broken chunks
        raise _Final("truncated", f"image does not decode ({exc})") from exc


def _download(url: str, config: FetchConfig) -> tuple[bytes, int]:
    request = urllib.request.Request(url, headers={"User-Agent": config.user_agent})
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            expected = response.headers.get("Content-Length")
            if expected is not None and int(expected) > config.max_bytes:
                raise _Final("too-large", f"{expected} bytes > {config.max_bytes}")
            data = response.read(config.max_bytes + 1)
            if len(data) > config.max_bytes:
                raise _Final("too-large", f"more than {config.max_bytes} bytes")
            if expected is not None and len(data) < int(expected):
                raise _Transient("truncated", f"{len(data)} of {expected} bytes")
            return data, response.status
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise _Transient("failed", f"HTTP {exc.code}", exc.code) from exc
        raise _Final("dead", f"HTTP {exc.code}", exc.code) from exc
    except http.client.IncompleteRead as exc:
        raise _Transient("truncated", f"{len(exc.partial)} bytes, then the connection closed") from exc
    except http.client.HTTPException as exc:  # a malformed response
        raise _Transient("failed", f"{type(exc).__name__}: {exc}") from exc
    except (TimeoutError, OSError) as exc:  # socket.timeout is TimeoutError; URLError and IncompleteRead are OSError
        reason = getattr(exc, "reason", exc)
        status = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "failed"
        raise _Transient(status, f"{type(exc).__name__}: {reason}") from exc


def _existing(folder: Path, record_id: str) -> Path | None:
    stem = safe_filename(record_id)
    found = [p for p in folder.glob(f"{stem}.*") if p.suffix.lower() in _SUFFIX.values() or p.suffix == ".jpeg"]
    return found[0] if found else None


def fetch_one(record, folder: Path, config: FetchConfig) -> Fetched:
    """Fetch one record's image into ``folder`` (or keep the one there)."""
    result = Fetched(record.id, record.url, "no-url")
    if not record.url:
        return result
    kept = _existing(folder, record.id)
    kept_hash = None
    if kept is not None:
        data = kept.read_bytes()
        try:
            fmt, width, height = _decode(data)
            kept_hash = hashlib.sha256(data).hexdigest()
            if not config.refresh:
                return Fetched(record.id, record.url, "kept", kept.name, None, len(data), kept_hash, width, height)
        except _Final:
            kept.unlink()  # a broken file from an earlier run: fetch again
            kept = None
    delay = config.backoff
    for attempt in range(1, config.retries + 2):
        result.attempts = attempt
        try:
            data, code = _download(record.url, config)
            fmt, width, height = _decode(data)
        except _Transient as exc:
            result.status, result.error, result.http_status = exc.status, str(exc), exc.http_status
            if attempt <= config.retries:
                time.sleep(delay)
                delay *= 2
            continue
        except _Final as exc:
            result.status, result.error, result.http_status = exc.status, str(exc), exc.http_status
            return result
        digest = hashlib.sha256(data).hexdigest()
        name = f"{safe_filename(record.id)}{_SUFFIX.get(fmt, '.img')}"
        tmp = folder / f".{name}.part"
        tmp.write_bytes(data)
        if kept is not None and kept.name != name:
            kept.unlink()
        tmp.replace(folder / name)
        status = "changed" if kept_hash is not None and kept_hash != digest else ("kept" if kept_hash else "ok")
        return Fetched(record.id, record.url, status, name, code, len(data), digest, width, height, attempt)
    return result


@dataclass
class FetchResult:
    folder: Path
    rows: list[Fetched]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out


def fetch_references(config: FetchConfig, out: str | Path, *, progress: Progress | None = None) -> FetchResult:
    """Fetch every image of ``config.prompts`` into the folder ``out``; writes ``out/references.csv``."""
    from .prompts import load_prompt_set

    config.validate()
    records = load_prompt_set(config.prompts).subset(config.limit).records
    if not any(r.url for r in records):
        raise DoriError(f"prompts: {config.prompts!r} lists no image URLs (a url column is needed)")
    folder = check_writable(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Fetched] = {}
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        futures = {pool.submit(fetch_one, record, folder, config): record for record in records}
        for done, future in enumerate(as_completed(futures), 1):
            record = futures[future]
            rows[record.id] = future.result()
            if progress:
                progress("fetch references", done, len(records), rows[record.id].status)
    ordered = [rows[r.id] for r in records]
    with open(folder / TABLE, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(row) for row in ordered)
    logger.info("references: %s", FetchResult(folder, ordered).counts())
    return FetchResult(folder, ordered)
