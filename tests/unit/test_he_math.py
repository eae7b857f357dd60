"""HE evaluation form and packing: export, layouts, and a small encrypted-vs-plaintext check."""

from __future__ import annotations

import numpy as np
import pytest

from msgate.model import he


@pytest.mark.parametrize("members", [1, 3])
def test_export_reproduces_the_torch_ensemble(members: int) -> None:
    nets, model = he.random_model(seed=3, members=members)
    assert model.n_members == members and model.widths == (32,) * members
    u, z = he.synthetic_inputs(16, model, seed=3)
    np.testing.assert_allclose(model.plain_logits(u, z), he.torch_logits(nets, u, z), atol=1e-5)


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


@pytest.mark.parametrize("width", [32, 64, 96])
def test_packing_algebra_in_plaintext(width: int) -> None:
    """Simulate the evaluator's slot arithmetic with numpy for 3 members in lane groups of ``width``:
    the layout, the completed square and the ensemble readout are exact."""
    _, model = he.random_model(seed=4, members=3)
    u, z = he.synthetic_inputs(3, model, seed=4)
    lay = he.make_layout(3, model.n_features, width, 4096)
    x = he.with_bias(u)
    ms, off = model.readouts(z)
    const = sum(ms[i].sum(axis=2) / (4 * model.members[i].c) for i in range(model.n_members))
    outs = [np.asarray(o) for o in he.offset_patterns(lay, off - const)]
    for g, members in enumerate(he.lane_groups(model.widths, width)):
        w1b = np.concatenate([model.members[i].w1b for i in members])
        acc = sum(np.asarray(c) * np.asarray(w) for c, w in zip(he.pack_inputs(lay, x),
                                                                he.weight_patterns(lay, w1b), strict=True))
        y = np.asarray(acc).reshape(lay.blocks, lay.lanes).sum(0)
        m = np.concatenate([ms[i] for i in members], axis=2)
        c = np.concatenate([np.full(model.members[i].hidden, model.members[i].c) for i in members])
        s2 = (y + np.asarray(he.shift_pattern(lay, c))) ** 2
        for k, cmk in enumerate(he.readout_patterns(lay, m, c)):
            outs[k] = outs[k] + np.asarray(cmk) * s2
    np.testing.assert_allclose(he.unpack_outputs(lay, outs), model.plain_logits(u, z), atol=1e-9)


def test_lane_groups_and_the_width_choice() -> None:
    assert he.lane_groups((32, 32, 32), 32) == [[0], [1], [2]]
    assert he.lane_groups((32, 32, 32), 64) == [[0, 1], [2]]
    assert he.lane_groups((32, 32, 32), 96) == [[0, 1, 2]]
    with pytest.raises(ValueError):
        he.lane_groups((32, 48), 40)
    # one case: every member in one group (fewest rotations); 16 cases: one group per member (fewest inputs)
    assert he.choose_width(1, (32, 32, 32), 41, 4096) == 96
    assert he.choose_width(16, (32, 32, 32), 41, 4096) == 32
    assert he.choose_width(16, (32,), 41, 4096) == 32
    # the choice never exceeds the slots: 40 cases cannot share 128-lane groups
    assert he.choose_width(40, (32, 32, 32), 41, 4096) in (32, 64)


@pytest.mark.parametrize(("batch", "members"), [(1, 1), (3, 3), (16, 3)])
def test_encrypted_evaluation_small(batch: int, members: int) -> None:
    """Encrypt, evaluate with the public context, decrypt: against the plaintext ensemble in float64."""
    import tenseal as ts

    _, model = he.random_model(seed=5, members=members)
    u, z = he.synthetic_inputs(batch, model, seed=5)
    params = he.HeParams()
    ctx = he.make_context(params)
    pub = ctx.copy()
    pub.make_context_public()
    width = he.choose_width(batch, model.widths, model.n_features, params.slots)
    lay = he.make_layout(batch, model.n_features, width, params.slots)
    cts = [ts.ckks_vector_from(pub, ts.ckks_vector(ctx, v).serialize()) for v in he.pack_inputs(lay, he.with_bias(u))]
    outs = he.Evaluator(model, params).logits(lay, cts, z)
    got = he.unpack_outputs(lay, [ts.ckks_vector_from(ctx, o.serialize()).decrypt() for o in outs])
    np.testing.assert_allclose(got, model.plain_logits(u, z), atol=1e-4)
