"""Scanner vendors, acquisition protocols and vendor-style series names.

Each subject gets one vendor and one protocol family: ``3d`` (1 mm or grid
isotropic FLAIR/T1/QSM) or ``2d`` (axial FLAIR and T1 with 3-5 mm slices;
QSM stays 3D). SeriesDescription and ProtocolName are drawn from vendor-style
variants, including messy ones, so the routing rules meet realistic names.
All volumes are stored as axial slices (a "SAG" name is a reformat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msgate.model.synth.contrasts import Acquisition

VENDORS: dict[str, tuple[str, float, float]] = {  # model, field (T), intensity scale per relative unit
    "SIEMENS": ("Prisma", 3.0, 2400.0),
    "GE MEDICAL SYSTEMS": ("SIGNA Premier", 3.0, 3200.0),
    "Philips": ("Ingenia", 1.5, 1600.0),
}

NAMES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("SIEMENS", "FLAIR", "3D"): ("t2_space_dark-fluid_sag_p2_iso", "3D_FLAIR_SAG", "t2_spc_da-fl_sag_p2_iso"),
    ("SIEMENS", "FLAIR", "2D"): ("t2_tirm_tra_dark-fluid", "AX FLAIR", "t2_tirm_tra_dark-fluid_4mm"),
    ("SIEMENS", "T1", "3D"): ("T1 MPRAGE", "t1_mprage_sag_p2_iso", "MPRAGE_GRAPPA2"),
    ("SIEMENS", "T1", "2D"): ("t1_se_tra", "t1_tse_tra"),
    ("SIEMENS", "QSM", "3D"): ("QSM", "SWI_Images QSM", "t2_swi_tra_p2_QSM"),
    ("GE MEDICAL SYSTEMS", "FLAIR", "3D"): ("FLAIR CUBE", "Sag CUBE FLAIR", "3D FLAIR"),
    ("GE MEDICAL SYSTEMS", "FLAIR", "2D"): ("AX FLAIR", "AX T2 FLAIR", "Ax T2 FLAIR 5mm"),
    ("GE MEDICAL SYSTEMS", "T1", "3D"): ("Sag 3D BRAVO", "3D T1 BRAVO", "SAG FSPGR BRAVO"),
    ("GE MEDICAL SYSTEMS", "T1", "2D"): ("AX T1 SE", "AX T1 FLAIR"),
    ("GE MEDICAL SYSTEMS", "QSM", "3D"): ("QSM_SWAN", "SWAN QSM", "QSM"),
    ("Philips", "FLAIR", "3D"): ("3D_FLAIR_SAG", "3D_Brain_VIEW_FLAIR_SAG", "VISTA_FLAIR"),
    ("Philips", "FLAIR", "2D"): ("T2W_FLAIR_TRA", "FLAIR_TRA 5mm", "flair ax"),
    ("Philips", "T1", "3D"): ("sT1W_3D_TFE", "T1W_3D_TFE_SAG", "3D_T1_TFE"),
    ("Philips", "T1", "2D"): ("T1W_SE_TRA", "T1W_TSE_TRA"),
    ("Philips", "QSM", "3D"): ("QSM_SWIp", "SWIp_QSM_TRA", "QSM"),
}
PROTOCOLS: tuple[str, ...] = ("3d", "2d", "mixed")


@dataclass(frozen=True)
class SeriesPlan:
    """Role, acquisition and names of one series."""

    role: str
    acq: Acquisition
    description: str
    protocol_name: str


def _names(vendor: str, role: str, mode: str, rng: np.random.Generator) -> tuple[str, str]:
    """SeriesDescription and ProtocolName (sometimes different, sometimes decorated)."""
    options = NAMES[(vendor, role, mode)]
    desc = str(options[int(rng.integers(len(options)))])
    proto = str(options[int(rng.integers(len(options)))])
    if rng.random() < 0.15:
        desc = f"{desc} {'RPT' if rng.random() < 0.5 else '(2)'}"
    return desc, proto


def plan_series(vendor: str, protocol: str, rng: np.random.Generator) -> list[SeriesPlan]:
    """FLAIR, T1 and QSM plans for one subject ('mixed' draws 3D with p 0.6)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f'Argument "protocol" must be one of {PROTOCOLS}.')
    family = protocol if protocol != "mixed" else ("3d" if rng.random() < 0.6 else "2d")
    scale = VENDORS[vendor][2] * float(rng.uniform(0.7, 1.3))
    plans = []
    for role in ("FLAIR", "T1", "QSM"):
        mode = "2D" if family == "2d" and role != "QSM" else "3D"
        thick = float(rng.choice([3.0, 4.0, 5.0])) if mode == "2D" else 0.0
        acq_scale = 10000.0 if role == "QSM" else scale * (1.3 if role == "T1" else 1.0)
        acq = Acquisition(role, mode, thick, float(rng.uniform(0.02, 0.06)), acq_scale)
        desc, proto = _names(vendor, role, mode, rng)
        plans.append(SeriesPlan(role, acq, desc, proto))
    return plans
