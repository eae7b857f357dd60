"""Adapter from ``msgate.model.lesions`` (segment + classify_rims) to the patient model's LesionSource."""

from __future__ import annotations

from pathlib import Path

from msgate.model.patient.lesionsrc import LesionOutput
from msgate.model.types import Volume


class RealLesions:
    """The lesion model of issue 6: UNet segmentation, location classes, Rim+ from QSM + FLAIR."""

    name = "msgate-lesions"

    def __init__(self, path: Path | str | None = None) -> None:
        from msgate.model.lesions import load_lesion_model

        self.model = load_lesion_model(path)
        self.name = f"msgate-lesions-{self.model.version}"

    def __call__(self, volumes: dict[str, Volume]) -> LesionOutput:
        lesions = self.model.segment(volumes)
        rims = self.model.classify_rims(volumes, lesions)
        return LesionOutput(lesions.label_map.astype("int16"), rims.apply(lesions))
