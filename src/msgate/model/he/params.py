"""CKKS parameters: the 128-bit security limits, the depth this circuit needs, SEAL's primes, contexts.

Default ``N = 8192``, coefficient moduli ``[42, 32, 32, 32, 32, 48]`` (218 of 218 bits allowed for
128-bit security), scale ``2^32``: four rescales (see :mod:`msgate.model.he.evaluator`). The
key-switching (last) prime is the largest: rotation noise scales with ``max(q_i) / P``; with
``[44, ..., 44]`` the block-sum rotations of a single case left an error of 7e-4 in the hidden layer,
with ``P = 2^48`` and ``q_0 = 2^42`` it is 1e-5. ``q_0 / 2^32`` leaves a range of +-512 for each
decrypted slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tenseal as ts

MAX_COEFF_BITS: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient modulus for 128-bit classical security (HomomorphicEncryption.org standard)."""
DEFAULT_N = 8192
DEFAULT_COEFF_BITS: tuple[int, ...] = (42, 32, 32, 32, 32, 48)
DEFAULT_SCALE_BITS = 32


class HeParamError(ValueError):
    """CKKS parameters that are insecure or cannot carry the circuit; the message names the setting."""


@dataclass(frozen=True)
class HeParams:
    """CKKS parameters. ``check`` enforces the 128-bit limits and the depth of this circuit."""

    poly_modulus_degree: int = DEFAULT_N
    coeff_mod_bit_sizes: tuple[int, ...] = DEFAULT_COEFF_BITS
    global_scale_bits: int = DEFAULT_SCALE_BITS

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 2

    def check(self, *, prefix: str = "he") -> HeParams:
        """Raise :class:`HeParamError` naming the setting when the parameters are unusable."""
        n, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.global_scale_bits
        if n not in MAX_COEFF_BITS:
            raise HeParamError(f"{prefix}.poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, not {n}")
        if sum(bits) > MAX_COEFF_BITS[n]:
            raise HeParamError(
                f"{prefix}.coeff_mod_bit_sizes total {sum(bits)} bits exceeds {MAX_COEFF_BITS[n]} bits, the "
                f"128-bit security limit for {prefix}.poly_modulus_degree={n}")
        if len(bits) < 5:
            raise HeParamError(f"{prefix}.coeff_mod_bit_sizes needs at least 5 primes (3 rescales); got {len(bits)}")
        if any(b > 60 or b < 20 for b in bits):
            raise HeParamError(f"{prefix}.coeff_mod_bit_sizes: every prime must be 20..60 bits; got {list(bits)}")
        if scale < 30:
            raise HeParamError(f"{prefix}.global_scale_bits must be >= 30 (smaller scales give garbage); got {scale}")
        if any(b < scale for b in bits[1:-1]):
            raise HeParamError(f"{prefix}.coeff_mod_bit_sizes: middle primes must be >= "
                               f"{prefix}.global_scale_bits={scale}; got {list(bits)}")
        if bits[-1] < max(bits[:-1]):
            raise HeParamError(f"{prefix}.coeff_mod_bit_sizes: the last (key-switching) prime must be the largest, "
                               f"or rotations get noisy; got {list(bits)}")
        if bits[0] < scale + 8:
            raise HeParamError(f"{prefix}.coeff_mod_bit_sizes: the first prime needs >= 8 bits above the scale "
                               f"for the output range; got {bits[0]} with scale {scale}")
        need = circuit_depth()
        if self.depth < need:  # 5 primes passed before, and every job then failed as a "model error"
            raise HeParamError(
                f"{prefix}.coeff_mod_bit_sizes (MSGATE_{prefix.upper()}__COEFF_MOD_BIT_SIZES) gives {self.depth} "
                f"rescales; the circuit needs {need}: at least {need + 2} primes, e.g. {list(DEFAULT_COEFF_BITS)}; "
                f"got {list(bits)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "global_scale_bits": self.global_scale_bits}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeParams:
        return cls(int(d["poly_modulus_degree"]), tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                   int(d["global_scale_bits"]))


def circuit_depth() -> int:
    """Rescales the deepest pack needs, from :meth:`msgate.model.he.Evaluator.depth_needed` (a pack whose
    ciphertexts hold several feature blocks needs the block sum's level; one block does not)."""
    from msgate.model.he.evaluator import Evaluator
    from msgate.model.he.packing import Layout

    return max(Evaluator.depth_needed(Layout(1, n_features, 1, DEFAULT_N // 2)) for n_features in (1, 2))


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:  # deterministic for n < 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def chain_primes(params: HeParams) -> list[int]:
    """The primes SEAL's ``CoeffModulus::Create`` picks (largest ``k 2N + 1`` below ``2^bits`` per size,
    handed out smallest first), so the evaluator can undo TenSEAL's scale reset after each rescale."""
    factor = 2 * params.poly_modulus_degree
    table: dict[int, list[int]] = {}
    for bits in sorted(set(params.coeff_mod_bit_sizes)):
        want, found, v = params.coeff_mod_bit_sizes.count(bits), [], (1 << bits) - factor + 1
        while len(found) < want:
            if _is_prime(v):
                found.append(v)
            v -= factor
        table[bits] = found
    return [table[bits].pop() for bits in params.coeff_mod_bit_sizes]


def make_context(params: HeParams) -> ts.Context:
    """A fresh private CKKS context with relinearisation and power-of-two Galois keys."""
    import tenseal as ts

    params.check()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.global_scale_bits
    ctx.generate_galois_keys()
    return ctx
