"""Versioned checkpoints: weights + preset + feature-schema hash + scaler + temperatures + data note.

A checkpoint is one ``torch.save`` file (plain tensors and JSON-able metadata, loaded with
``weights_only=True``) and a JSON sidecar with the same metadata for humans and the SR/ORU renderers.
A checkpoint whose feature-schema hash differs from ``model.features`` is refused (:class:`SchemaMismatch`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msgate.errors import MsgateError
from msgate.model.patient.ehr import EhrScaler, schema_hash
from msgate.model.patient.network import Mode, PatientNet
from msgate.model.patient.presets import Preset, get_preset

MODEL_NAME = "msgate-patient"
MODEL_VERSION = "0.2.0"  # 0.2.0: trained on the features of lesion model 0.2.0 (Rim+ training code 0.2.0)
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "checkpoints" / "patient-tiny.pt"


class SchemaMismatch(MsgateError):
    """The checkpoint was trained on a different EHR feature schema."""


@dataclass
class PatientCheckpoint:
    """A loaded checkpoint: the networks (one, or the members of a small ensemble whose logits are
    averaged) in eval mode, plus everything predict needs."""

    nets: list[PatientNet]
    scaler: EhrScaler
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def net(self) -> PatientNet:
        """The first (or only) member."""
        return self.nets[0]

    @property
    def t_edss(self) -> float:
        return float(self.meta.get("temperature_edss", 1.0))

    @property
    def t_ms(self) -> float:
        return float(self.meta.get("temperature_ms", 1.0))


def save(path: Path, net: PatientNet | list[PatientNet], scaler: EhrScaler, meta: dict[str, Any]) -> None:
    """Write ``path`` and ``path.with_suffix('.json')``; fills in name, version and schema hash."""
    nets = net if isinstance(net, list) else [net]
    meta = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "feature_schema_hash": schema_hash(),
            "mode": nets[0].mode, **meta, "ensemble_size": len(nets), "scaler": scaler.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    states = [{k: v.detach().cpu() for k, v in n.state_dict().items()} for n in nets]
    torch.save({"state_dict": states[0], "members": states, "meta_json": json.dumps(meta, sort_keys=True)}, path)
    sidecar = {k: v for k, v in meta.items() if k != "scaler"}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def preset_from_meta(meta: dict[str, Any]) -> Preset:
    """The preset stored in the checkpoint (falls back to the named built-in preset)."""
    cfg = meta.get("preset_config")
    if not cfg:
        return get_preset(meta["preset"])
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def load(path: Path | str | None = None) -> PatientCheckpoint:
    """Load a checkpoint in eval mode; raises :class:`SchemaMismatch` on a different feature schema."""
    p = Path(path) if path is not None else DEFAULT_PATH
    if not p.is_file():
        raise FileNotFoundError(f"patient model checkpoint not found: {p}")
    blob = torch.load(p, map_location="cpu", weights_only=True)
    meta = json.loads(blob["meta_json"])
    if meta.get("feature_schema_hash") != schema_hash():
        raise SchemaMismatch(
            f"checkpoint {p.name} was trained on EHR feature schema {str(meta.get('feature_schema_hash'))[:12]}, "
            f"this build has {schema_hash()[:12]}; retrain with `msgate train patient` or install the matching model")
    mode: Mode = meta.get("mode", "multimodal")
    nets = []
    for state in blob.get("members") or [blob["state_dict"]]:
        net = PatientNet(preset_from_meta(meta), mode)
        net.load_state_dict(state)
        nets.append(net.eval())
    return PatientCheckpoint(nets, EhrScaler.from_dict(meta["scaler"]), meta)
