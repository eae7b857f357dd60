"""Lesions: rim prevalence in MS, no rims or infratentorial lesions in cSVD, masks match records."""

from __future__ import annotations

import numpy as np
import pytest

from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy
from msgate.model.synth.latent import sample_latent
from msgate.model.synth.lesions import LOCATIONS, place_lesions, sample_specs


def test_rim_prevalence_between_5_and_15_percent_of_ms_lesions() -> None:
    rng = np.random.default_rng(42)
    specs = [s for _ in range(400) for s in sample_specs(sample_latent("ms", rng), rng)]
    rate = sum(s.rim for s in specs) / len(specs)
    assert 0.05 <= rate <= 0.15


def test_progressive_ms_has_more_rims() -> None:
    rng = np.random.default_rng(3)
    by = {"RRMS": [0, 0], "SPMS": [0, 0], "PPMS": [0, 0]}
    for _ in range(1500):
        lat = sample_latent("ms", rng)
        specs = sample_specs(lat, rng)
        by[lat.phenotype][0] += sum(s.rim for s in specs)
        by[lat.phenotype][1] += len(specs)
    rr = by["RRMS"][0] / by["RRMS"][1]
    prog = (by["SPMS"][0] + by["PPMS"][0]) / (by["SPMS"][1] + by["PPMS"][1])
    assert prog > rr


def test_csvd_has_no_rims_and_no_infratentorial_lesions() -> None:
    rng = np.random.default_rng(1)
    specs = [s for _ in range(300) for s in sample_specs(sample_latent("csvd", rng), rng)]
    assert specs and not any(s.rim for s in specs)
    assert not any(s.location == "infratentorial" for s in specs)
    assert {s.kind for s in specs} >= {"punctate", "confluent", "lacune"}


@pytest.mark.parametrize("dx", ["ms", "csvd"])
def test_placed_lesions_match_label_map(dx: str) -> None:
    rng = np.random.default_rng(9)
    lat = sample_latent(dx, rng)
    an = make_anatomy(load_template(2), WarpParams.sample(rng), lat.atrophy, rng)
    specs = sample_specs(lat, rng)
    maps = place_lesions(specs, an, rng)
    ids = np.unique(maps.labels)
    assert specs and len(maps.lesions) >= len(specs) // 2  # lesions were placed (an empty map matched trivially)
    assert list(ids[1:]) == [les.id for les in maps.lesions]
    vox = an.spacing ** 3
    for les in maps.lesions:
        assert les.location in LOCATIONS
        assert les.volume_mm3 == pytest.approx(float((maps.labels == les.id).sum()) * vox)
    if dx == "csvd":
        assert not maps.rim_ppm.any()
        assert not any(les.location == "infratentorial" for les in maps.lesions)
