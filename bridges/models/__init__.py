"""Model families: one module each (config translation and the weight rule table) ending with its `Family` record
(bridges/models/family.py). Every module of this package that defines `FAMILY` is registered by its model_type,
so adding a family is adding its file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from bridges.checkpoint.hf_config import HFConfigError
from bridges.models.family import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if family is None:
            continue
        if family.model_type in found:
            raise RuntimeError(f"two families for model_type {family.model_type!r} (bridges/models/{info.name}.py)")
        found[family.model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def family_for(config: dict[str, Any]) -> Family:
    """The family of an HF config, by its `model_type`."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise HFConfigError(f"model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    return FAMILIES[model_type]


def family_of(family: Family | str) -> Family:
    """A family given as its record or by its HF model_type."""
    return family if isinstance(family, Family) else family_for({"model_type": family})
