"""Checks on the ``MSGATE_*`` environment that pydantic-settings does not make: a misspelled top-level
name (ignored, so msgate ran on its defaults), and a list or section value that is not JSON (reported
without the variable's name)."""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from msgate.errors import ConfigError

# MSGATE_* variables that are not settings: read by load_settings itself, interpolated by compose.yaml on
# the host only, or test hooks (MSGATE_TEST_*). Any other MSGATE_* name is a typo and is refused.
NOT_SETTINGS = frozenset({"MSGATE_SECRETS_DIR", "MSGATE_IMAGE", "MSGATE_GPU_IMAGE", "MSGATE_WORKER_GPU"})


def check_variable_names(environ: Mapping[str, str], settings: type[BaseModel]) -> None:
    """A misspelled top-level name (MSGATE_DATABSE_URL) was ignored and msgate ran on its defaults.
    Nested names (MSGATE_DICOM__PORTT) are refused by the sections themselves (extra="forbid")."""
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("MSGATE_") or upper in NOT_SETTINGS or upper.startswith("MSGATE_TEST_"):
            continue
        if upper[len("MSGATE_"):].split("__", 1)[0].lower() not in settings.model_fields:
            raise ConfigError(f"unknown setting {name}: no such msgate setting (misspelled?); see README "
                              "\"Configuration\"")


def _is_structured(annotation: Any) -> bool:
    """Whether pydantic-settings reads the value of a variable for this type as JSON (a list, a mapping
    or a section)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_structured(arg) for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) in (list, tuple, set, frozenset, dict):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaf_annotation(name: str, settings: type[BaseModel]) -> Any:
    """The type of the setting a MSGATE_A__B variable sets, or None."""
    model: Any = settings
    annotation: Any = None
    for part in name.upper()[len("MSGATE_"):].split("__"):
        fields = getattr(model, "model_fields", None)
        if not fields or part.lower() not in fields:
            return None
        annotation = fields[part.lower()].annotation
        candidates = [annotation, *get_args(annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return annotation


def not_json(field: str, environ: Mapping[str, str], settings: type[BaseModel]) -> ConfigError | None:
    """The variable under ``field`` whose list or section value is not JSON, named with an example.
    pydantic-settings only said 'error parsing value for field "dicom" from source "EnvSettingsSource"'."""
    for name in sorted(environ):
        parts = name.upper()[len("MSGATE_"):].split("__") if name.upper().startswith("MSGATE_") else [""]
        annotation = _leaf_annotation(name, settings) if parts[0].lower() == field else None
        if annotation is None or not _is_structured(annotation):
            continue
        try:
            json.loads(environ[name])
        except ValueError:
            if get_origin(annotation) in (list, tuple, set, frozenset) and not any(
                    _is_structured(arg) for arg in get_args(annotation)):
                items = [item.strip() for item in environ[name].split(",") if item.strip()]
                example = json.dumps(items)[:80]
                return ConfigError(f"invalid setting {name}: a list is written as JSON, e.g. {example}")
            return ConfigError(f"invalid setting {name}: must be JSON (an object {{\"key\": value}} or a list "
                               "of them)")
    return None
