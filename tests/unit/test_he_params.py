"""CKKS parameters: 128-bit security limits, depth and scale checks, and the settings section."""

from __future__ import annotations

import pytest

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.model.he import MAX_COEFF_BITS, HeParamError, HeParams, chain_primes


@pytest.mark.parametrize(("n", "limit"), sorted(MAX_COEFF_BITS.items()))
def test_security_limit_per_degree(n: int, limit: int) -> None:
    over = [30] * 5
    over[0] += limit + 1 - sum(over)
    with pytest.raises(HeParamError, match=rf"exceeds {limit} bits.*poly_modulus_degree={n}"):
        HeParams(n, tuple(over), 30).check()


def test_default_parameters_are_secure_and_deep_enough() -> None:
    p = HeParams().check()
    assert sum(p.coeff_mod_bit_sizes) <= MAX_COEFF_BITS[p.poly_modulus_degree]
    assert p.depth == 4


@pytest.mark.parametrize(("params", "names"), [
    (HeParams(8192, (44, 32, 32, 32, 32, 44), 21), "global_scale_bits"),
    (HeParams(8000, (44, 32, 32, 32, 44), 32), "poly_modulus_degree"),
    (HeParams(8192, (60, 40, 60), 40), "at least 5 primes"),
    (HeParams(8192, (44, 30, 32, 32, 32, 44), 32), "middle primes"),
    (HeParams(8192, (50, 32, 32, 32, 32, 40), 32), "key-switching"),
])
def test_bad_parameters_name_the_setting(params: HeParams, names: str) -> None:
    with pytest.raises(HeParamError, match=names):
        params.check()


def test_settings_refuse_insecure_modulus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_HE__ENABLED", "1")
    monkeypatch.setenv("MSGATE_HE__COEFF_MOD_BIT_SIZES", "[60, 40, 40, 40, 40, 60]")
    with pytest.raises(ConfigError, match=r"MSGATE_HE.*he\.coeff_mod_bit_sizes total 280 bits exceeds 218"):
        load_settings()


def test_settings_enable_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_HE__ENABLED", "true")
    s = load_settings()
    assert s.he.enabled and s.he.params() == HeParams()
    monkeypatch.delenv("MSGATE_HE__ENABLED")
    assert load_settings().he.enabled is False


def test_chain_primes_match_seal() -> None:
    """The primes the evaluator uses to undo TenSEAL's scale reset are the ones SEAL picked."""
    from msgate.model.he import make_context

    params = HeParams()
    primes = chain_primes(params)
    assert [q.bit_length() for q in primes] == list(params.coeff_mod_bit_sizes)
    assert all(q % (2 * params.poly_modulus_degree) == 1 for q in primes)
    data = make_context(params).seal_context().data.first_context_data()
    prod = 1
    for q in primes[:-1]:
        prod *= q
    assert data.total_coeff_modulus_bit_count() == prod.bit_length()
    assert data.total_coeff_modulus() == prod % (1 << 64)  # the binding exposes the low word
