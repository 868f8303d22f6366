"""Calibrating the testbed descriptor and checking that a testbed memorizes what it should."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..descriptors import calibrate_testbed_descriptor
from .assets import SUBFOLDER, load_testbed_data

logger = logging.getLogger(__name__)


def read_calibration(folder: str | Path) -> dict | None:
    """The descriptor calibration that :func:`calibrate_folder` wrote for the testbed in ``folder`` (None: none)."""
    path = Path(folder) / SUBFOLDER / "descriptor.json"
    return json.loads(path.read_text()) if path.is_file() else None


def calibrate_folder(folder: str | Path, pipe=None) -> dict:
    """Calibrate the descriptor on the testbed in ``folder``; writes ``testbed/descriptor.json``."""
    from ..models import load_pipeline

    folder = Path(folder)
    pipe = pipe or load_pipeline(folder)
    entries, images = load_testbed_data(folder)
    calibration = calibrate_testbed_descriptor(pipe, images, [e.role for e in entries])
    data = {"descriptor": "testbed", **asdict(calibration),
            "method": "memorized photo vs imperfect copies (positives) / every other testbed image (negatives)"}
    (folder / SUBFOLDER / "descriptor.json").write_text(json.dumps(data, indent=1))
    logger.info("testbed descriptor: threshold %.3f, AUC %.4f", calibration.threshold, calibration.auc)
    return data
