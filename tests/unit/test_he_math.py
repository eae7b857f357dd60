"""HE evaluation form and packing: export, layouts, and a small encrypted-vs-plaintext check."""

from __future__ import annotations

import numpy as np
import pytest

from msgate.model import he


def test_export_reproduces_the_torch_network() -> None:
    net, model = he.random_model(seed=3)
    u, z = he.synthetic_inputs(16, (model.n_features - 1) // 2, model.gate_w.shape[1], seed=3)
    np.testing.assert_allclose(model.plain_logits(u, z), he._torch_logits(net, u, z), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 16])
def test_layout_fits_the_slots(batch: int) -> None:
    lay = he.make_layout(batch, 41, 32, 4096)
    assert lay.size <= 4096 and lay.blocks * lay.n_ciphertexts >= 41
    assert lay.blocks & (lay.blocks - 1) == 0


def test_pack_too_big_is_refused() -> None:
    with pytest.raises(ValueError, match="1..128"):
        he.make_layout(129, 41, 32, 4096)


def test_packing_cuts_ciphertexts_and_rotations() -> None:
    one, sixteen = he.make_layout(1, 41, 32, 4096), he.make_layout(16, 41, 32, 4096)
    assert (one.n_ciphertexts, one.rotations) == (1, 6)
    assert (sixteen.n_ciphertexts, sixteen.rotations) == (6, 3)


def test_packing_algebra_in_plaintext() -> None:
    """Simulate the evaluator's slot arithmetic with numpy: the layout itself is exact."""
    _, model = he.random_model(seed=4)
    u, z = he.synthetic_inputs(3, (model.n_features - 1) // 2, model.gate_w.shape[1], seed=4)
    lay = he.make_layout(3, model.n_features, model.hidden, 4096)
    x = he.with_bias(u)
    acc = sum(np.asarray(c) * np.asarray(w) for c, w in zip(he.pack_inputs(lay, x),
                                                            he.weight_patterns(lay, model.w1b), strict=True))
    y = np.asarray(acc).reshape(lay.blocks, lay.lanes).sum(0)
    m, off = model.readout(z)
    outs = [np.asarray(mk) * y + np.asarray(cmk) * y * y + np.asarray(ok)
            for mk, cmk, ok in he.readout_patterns(lay, m, off, model.c)]
    np.testing.assert_allclose(he.unpack_outputs(lay, outs), model.plain_logits(u, z), atol=1e-9)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_encrypted_evaluation_small(batch: int) -> None:
    report = he.compare(n=batch, batch=batch)
    assert report["same_class"] == 1.0
    assert report["max_abs_dlogit"] < 1e-4
