"""Three synthetic patients for the demo: MS with rim lesions, MS without, and cSVD.

They come from the project's synthetic cohort generator (``msgate.model.synth``) at 2 mm, picked
deterministically: the first MS subjects of a fixed seed with and without Rim+ lesions, and the first
cSVD subject of another seed. Nothing here is real patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msgate.model.synth.cohort import CohortConfig, generate_subject, simulate_subject

KINDS = ("MS with rims", "MS without rims", "cSVD")


@dataclass(frozen=True)
class DemoPatient:
    kind: str
    record: dict[str, object]
    root: Path

    @property
    def dicom_files(self) -> list[Path]:
        files: list[Path] = []
        for series in self.record["series"]:  # type: ignore[union-attr]
            files += sorted((self.root / str(series["dir"])).glob("*.dcm"))  # type: ignore[index]
        return files

    @property
    def hl7_files(self) -> list[Path]:
        return [self.root / str(p) for p in self.record["hl7"]]  # type: ignore[union-attr]


def _first(cfg: CohortConfig, start: int, want_rims: bool | None) -> int:
    for index in range(start, start + 60):
        subject = simulate_subject(cfg, index)
        rims = sum(lesion.rim for lesion in subject.lesions.lesions)
        if want_rims is None or (rims > 0) == want_rims:
            return index
    raise RuntimeError("no matching synthetic subject in 60 draws")


def make_patients(out: Path, seed: int = 2026, count: int = len(KINDS)) -> list[DemoPatient]:
    """Write the first ``count`` of the three subjects' DICOM and HL7 files under ``out``."""
    ms = CohortConfig(out, seed=seed, mix={"ms": 1.0}, resolution=2, protocol="3d", missing_rate=0.0)
    csvd = CohortConfig(out, seed=seed + 1, mix={"csvd": 1.0}, resolution=2, protocol="3d", missing_rate=0.0)
    with_rims = _first(ms, 1, True)
    picks = [(KINDS[0], ms, with_rims)]
    if count > 1:
        picks.append((KINDS[1], ms, _first(ms, with_rims + 1 if with_rims == 1 else 1, False)))
    if count > 2:
        picks.append((KINDS[2], csvd, _first(csvd, 101, None)))
    return [DemoPatient(kind, generate_subject(cfg, index), out) for kind, cfg, index in picks]
