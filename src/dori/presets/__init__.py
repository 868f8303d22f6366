"""Presets: named settings for every verb at once (``--preset paper-sd1``), YAML files in this folder.

A preset has a ``model`` section (``scheduler``, ``location``) and one section per verb, named as the
verb's manifest names it (``evaluate``, ``attack``, ``mitigate``, ``analyze-scatter`` ...); the
``mitigate`` section holds ``prompts`` and one mapping of settings per method. A verb lays its section
under ``--config`` and the command line: defaults < preset < config file < command line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import DoriError


def names() -> list[str]:
    folder = resources.files("dori") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """The preset ``name`` (a shipped one, or the path of a YAML file of the same shape)."""
    import yaml

    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from ..config_files import read_text

        text = read_text(path, "preset", "a YAML file")
    elif name in names():
        text = (resources.files("dori") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    else:
        raise DoriError(f"preset: no preset {name!r} (shipped: {', '.join(names())}, or a YAML file)")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise DoriError(f"preset: {name} must hold a mapping of sections")
    return data


def section(name: str, command: str, method: str | None = None) -> tuple[dict, dict]:
    """``(settings of the verb, model section)`` of preset ``name`` for ``command`` (and, for
    ``mitigate``, the method's settings under ``settings``)."""
    data = load_preset(name)
    model = dict(data.get("model") or {})
    part = dict(data.get(command) or {})
    if command == "mitigate":
        methods = {k: v for k, v in part.items() if isinstance(v, dict)}
        part = {k: v for k, v in part.items() if not isinstance(v, dict)}
        if method is not None and method in methods:
            part["settings"] = methods[method]
    return part, model


def demo_settings(name: str) -> dict:
    """The preset's settings of ``dori demo`` on a model: its evaluation protocol, NeMo's and Wanda's
    settings and the attack's, from the ``evaluate``, ``mitigate`` and ``attack`` sections."""
    data = load_preset(name)
    evaluate, mitigate, attack = (dict(data.get(k) or {}) for k in ("evaluate", "mitigate", "attack"))
    out = {k: evaluate[k] for k in ("generation", "descriptor", "seed") if k in evaluate}
    out.update({k: mitigate[k] for k in ("nemo", "wanda") if k in mitigate})
    if "attack" in attack:
        out["attack_config"] = attack["attack"]
    return out
