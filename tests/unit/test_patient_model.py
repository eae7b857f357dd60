"""Patient model: shapes, ranges, HE-compatible EHR branch, linearity in the EHR embedding, exact
contributions, calibration helpers, EHR encoding (tiny random networks, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from msgate.model.features import FEATURES
from msgate.model.patient.calibration import ece, fit_temperature, softmax
from msgate.model.patient.ehr import N_COLUMNS, EhrScaler, ehr_vector, raw_columns, schema_hash
from msgate.model.patient.encoders import PolyAct
from msgate.model.patient.explain import ehr_contributions
from msgate.model.patient.lesionsrc import LESION_FEATURES
from msgate.model.patient.network import PatientNet
from msgate.model.patient.presets import Preset

torch.set_num_threads(1)
MICRO = Preset("micro", (16, 16, 16), 12.0, (4, 4, 8, 8), (1, 1, 1, 1), 16, 32, 16, 0.2, 1, 2, 1e-3, 1,
               "encoder.layer3")


def _inputs(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 4, 16, 16, 16, generator=g), torch.ones(b, 2), torch.rand(b, len(LESION_FEATURES), generator=g),
            torch.randn(b, 2 * N_COLUMNS, generator=g))


@pytest.fixture(scope="module")
def net() -> PatientNet:
    torch.manual_seed(0)
    return PatientNet(MICRO).eval()


def test_output_shapes_and_ranges(net: PatientNet) -> None:
    with torch.no_grad():
        out = net(*_inputs())
    assert out["edss_logits"].shape == (3, 4)
    assert out["edss"].shape == out["ms_logit"].shape == out["rim_log_rate"].shape == (3,)
    p = softmax(out["edss_logits"].numpy())
    assert np.allclose(p.sum(1), 1.0) and (p >= 0).all()
    assert torch.isfinite(out["rim_log_rate"]).all()


def test_ehr_branch_is_polynomial_only(net: PatientNet) -> None:
    kinds = {type(m) for m in net.ehr.modules()} - {type(net.ehr), nn.Sequential}
    assert kinds == {nn.Linear, PolyAct}
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(PolyAct()(x), x + 0.25 * x * x)


def test_logits_are_linear_in_ehr_embedding(net: PatientNet) -> None:
    z = net.image_embedding(*_inputs()[:3]).detach()
    e1, e2 = torch.randn(3, 16), torch.randn(3, 16)
    base = net.fusion(z, torch.zeros_like(e1))
    lhs = net.fusion(z, 2.0 * e1 - 0.5 * e2) - base
    rhs = 2.0 * (net.fusion(z, e1) - base) - 0.5 * (net.fusion(z, e2) - base)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    assert torch.allclose(net.fusion(z, e1) - base, net.fusion.ehr_term(z, e1), atol=1e-6)


@pytest.mark.parametrize("target,index", [("edss", 0), ("ms_logit", 0), ("edss_logits", 2)])
def test_ehr_contributions_sum_exactly_to_output_difference(net: PatientNet, target: str, index: int) -> None:
    image, present, lesion, ehr = _inputs()
    z = net.image_embedding(image, present, lesion).detach()
    contrib = ehr_contributions(net, z, ehr, target, index)
    with torch.no_grad():
        full = net.fusion(z, net.ehr_embedding(ehr))
        none = net.fusion(z, net.ehr_embedding(torch.zeros_like(ehr)))
    col = {"edss": 4, "ms_logit": 5, "edss_logits": index}[target]
    diff = (full - none)[:, col].numpy()
    sums = np.array([sum(c.values()) for c in contrib])
    assert set(contrib[0]) == {f.name for f in FEATURES}
    assert np.allclose(sums, diff, atol=1e-4)


def test_modes_ignore_the_other_channel() -> None:
    torch.manual_seed(0)
    image_only, ehr_only = PatientNet(MICRO, "image").eval(), PatientNet(MICRO, "ehr").eval()
    a, b = _inputs(seed=1), _inputs(seed=2)
    with torch.no_grad():
        assert torch.allclose(image_only(*a[:3], a[3])["edss"], image_only(*a[:3], b[3])["edss"])
        assert torch.allclose(ehr_only(*a[:3], a[3])["edss"], ehr_only(*b[:3], a[3])["edss"])


def test_temperature_scaling_recovers_temperature_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 4))
    y = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    t = fit_temperature((true_logits * 3.0).astype(np.float32), y)
    assert 2.5 < t < 3.5
    assert ece(softmax(true_logits * 3.0, t), y) < ece(softmax(true_logits * 3.0), y)


def test_ehr_encoding_mask_and_scaler() -> None:
    vec = ehr_vector({"age": 40.0, "sex": "F", "dmt": "natalizumab", "nfl": 12.0})
    x, m = raw_columns(vec)
    assert x.shape == m.shape == (N_COLUMNS,)
    assert vec.present.sum() == 4 and m.sum() == 1 + 1 + 10 + 1
    sc = EhrScaler.fit(np.stack([x, x + 1]), np.stack([m, m]))
    u = sc.transform(x, m)
    assert u.shape == (2 * N_COLUMNS,) and np.all(u[:N_COLUMNS][m == 0] == 0)
    assert len(schema_hash()) == 64
