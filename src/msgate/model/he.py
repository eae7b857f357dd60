"""Homomorphic (CKKS) evaluation of the patient model's EHR branch and the fusion's EHR term.

The algebra. With ``u`` the model EHR input ``[standardised values, mask]`` plus a constant 1
(``x = [u; 1]``, so the hidden bias is folded into ``W1b = [W1 | b1]``), ``y = W1b x``,
``a = y + c y^2`` (:class:`~msgate.model.patient.encoders.PolyAct`), ``e = W2 a + b2``, the fusion gives
``out = A(z) + W diag(g) e`` with ``g = 2 sigmoid(G z)``. Given the image embedding ``z`` this is
``out = M a + o`` with the per-case *plaintext* readout ``M = W diag(g) W2`` and offset
``o = A(z) + W diag(g) b2``. Only ``x`` is encrypted. The worker evaluates
``M y + (c M) y^2 + o`` (the polynomial split across the readout, so ``c`` costs no level).

Packing (SIMD, several cases per ciphertext). Slots are ``n = N / 2``. A *lane* ``r = (b, j)``
indexes case ``b`` (of ``B``, padded to a power of two) and hidden unit ``j`` (``H`` = 32):
``R = B * H`` lanes. The key service writes feature ``f = c * G + g`` of case ``b`` into every lane of
case ``b`` in slot block ``g`` of ciphertext ``c`` (``G = min(n / R, 64)`` blocks of ``R`` lanes,
``C = ceil(F / G)`` ciphertexts: 1 for one case, 6 for 16 cases, F = 41). The worker multiplies
ciphertext ``c`` by the plaintext ``W1b[j, f]`` laid out the same way and adds the ``C`` products
(level 1), then sums the ``G`` blocks with TenSEAL's strided rotate-and-sum (``enc_matmul_plain`` with
a constant kernel: ``log2 G`` rotations, level 2), so lane ``(b, j)`` holds ``y[b, j]``. For each
output ``k`` it multiplies by the lane-wise ``M[b, k, j]`` and, after the one square, by
``c M[b, k, j]`` (levels 3 and 4), and adds the offset in the ``j = 0`` lane. The key service decrypts
the ``K`` = 6 output vectors and sums each case's ``H`` lanes in plaintext to get the logits. No TenSEAL
``mm`` (one rotation per input feature, ~350 ms measured for 65 inputs) is used: the only rotations are
the ``log2 G`` block sums (6 for one case, 3 for 16), and the plaintext shapes depend only on ``(B, G)``.
Every bias is folded or added after the last multiplication (reference/domain.md section 4).

Depth: ``W1b`` (1) + block sum (1, only when ``G > 1``) + square (1) + ``c M`` (1) = 4 rescales, hence
the default ``N = 8192``, coefficient moduli ``[42, 32, 32, 32, 32, 48]`` (218 of 218 bits allowed
for 128-bit security), scale ``2^32``. The key-switching (last) prime is the largest: rotation noise
scales with ``max(q_i) / P``; with ``[44, ..., 44]`` the 6 block-sum rotations of a single case left
an error of 7e-4 in ``y``, with ``P = 2^48`` and ``q_0 = 2^42`` it is 1e-5. ``q_0 / 2^32`` leaves a
range of +-512 for each decrypted lane.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import tenseal as ts

    from msgate.model.patient.network import PatientNet

Array = NDArray[np.float64]

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
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "global_scale_bits": self.global_scale_bits}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeParams:
        return cls(int(d["poly_modulus_degree"]), tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                   int(d["global_scale_bits"]))


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


# ---------------------------------------------------------------------------------------------------
# Export: trained modules -> evaluation form


@dataclass(frozen=True)
class HeModel:
    """The EHR encoder and the fusion in HE evaluation form (float64 numpy)."""

    w1b: Array  # [H, F]  first layer with the bias as the last column (input gets a constant 1)
    c: float  # PolyAct coefficient: a = y + c y^2
    w2: Array  # [E, H]
    b2: Array  # [E]
    gate_w: Array  # [E, Z]
    gate_b: Array  # [E]
    head_w: Array  # [O, Z]  image head A
    head_b: Array  # [O]
    ehr_w: Array  # [O, E]  W (no bias)

    @property
    def n_features(self) -> int:
        return int(self.w1b.shape[1])

    @property
    def hidden(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.head_w.shape[0])

    def readout(self, z: Array) -> tuple[Array, Array]:
        """Per-case ``M = W diag(g) W2`` [B, O, H] and offset ``A(z) + W diag(g) b2`` [B, O]."""
        z = np.asarray(z, np.float64)
        g = 2.0 / (1.0 + np.exp(-(z @ self.gate_w.T + self.gate_b)))  # [B, E]
        wg = self.ehr_w[None, :, :] * g[:, None, :]  # [B, O, E]
        m = wg @ self.w2  # [B, O, H]
        off = z @ self.head_w.T + self.head_b + wg @ self.b2
        return m, off

    def plain_logits(self, u: Array, z: Array) -> Array:
        """The same function in plaintext float64 (reference for the equivalence test)."""
        x = with_bias(u)
        y = x @ self.w1b.T
        a = y + self.c * y * y
        m, off = self.readout(z)
        return np.einsum("boh,bh->bo", m, a) + off  # type: ignore[no-any-return]


def with_bias(u: Array) -> Array:
    """Append the constant-1 column that carries the folded first-layer bias."""
    u = np.asarray(u, np.float64)
    return np.concatenate([u, np.ones((*u.shape[:-1], 1))], axis=-1)


def export(net: PatientNet) -> HeModel:
    """Export ``PatientNet.ehr`` (Linear, PolyAct, Linear) and ``PatientNet.fusion`` (eval weights)."""
    from msgate.model.patient.encoders import PolyAct

    lin1, act, lin2 = net.ehr.net[0], net.ehr.net[1], net.ehr.net[2]
    if not isinstance(act, PolyAct):
        raise TypeError("EhrEncoder is not Linear -> PolyAct -> Linear; it cannot run under CKKS")
    if net.mode != "multimodal":
        raise ValueError(f'HE mode needs a multimodal checkpoint, not mode "{net.mode}"')

    def a(t: Any) -> Array:
        return np.asarray(t.detach().cpu().double().numpy(), np.float64)

    fu = net.fusion
    return HeModel(w1b=np.concatenate([a(lin1.weight), a(lin1.bias)[:, None]], axis=1), c=float(act.c),
                   w2=a(lin2.weight), b2=a(lin2.bias), gate_w=a(fu.gate.weight), gate_b=a(fu.gate.bias),
                   head_w=a(fu.image_head.weight), head_b=a(fu.image_head.bias), ehr_w=a(fu.ehr_head.weight))


# ---------------------------------------------------------------------------------------------------
# Packing


@dataclass(frozen=True)
class Layout:
    """Slot layout of one pack of ``batch`` cases (see module docstring)."""

    batch: int
    n_features: int
    hidden: int
    slots: int

    @property
    def batch_pad(self) -> int:
        return _pow2(self.batch)

    @property
    def hidden_pad(self) -> int:
        return _pow2(self.hidden)

    @property
    def lanes(self) -> int:
        """``R``: one lane per (case, hidden unit), padded to powers of two."""
        return self.batch_pad * self.hidden_pad

    @property
    def blocks(self) -> int:
        """``G``: feature blocks per ciphertext (power of two, at most the next power of two of F)."""
        return max(1, min(self.slots // self.lanes, _pow2(self.n_features)))

    @property
    def n_ciphertexts(self) -> int:
        return math.ceil(self.n_features / self.blocks)

    @property
    def size(self) -> int:
        return self.lanes * self.blocks

    @property
    def rotations(self) -> int:
        return int(math.log2(self.blocks))

    def feature_index(self) -> NDArray[np.int64]:
        """[C, G]: feature of each (ciphertext, block); ``n_features`` marks padding."""
        f = np.arange(self.n_ciphertexts * self.blocks).reshape(self.n_ciphertexts, self.blocks)
        return np.where(f < self.n_features, f, self.n_features)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, int]:
        return {"batch": self.batch, "n_features": self.n_features, "hidden": self.hidden, "slots": self.slots}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(int(d["batch"]), int(d["n_features"]), int(d["hidden"]), int(d["slots"]))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def max_pack(hidden: int, slots: int) -> int:
    """How many cases fit into one pack (one lane per case and hidden unit)."""
    return max(1, slots // _pow2(hidden))


def make_layout(batch: int, n_features: int, hidden: int, slots: int) -> Layout:
    if batch < 1 or batch > max_pack(hidden, slots):
        raise ValueError(f"a pack holds 1..{max_pack(hidden, slots)} cases, not {batch}")
    return Layout(batch, n_features, hidden, slots)


def _blocks_of(layout: Layout, per_case_feature: Array) -> list[list[float]]:
    """[B, H, F+1] values -> the C slot vectors (block g of ciphertext c holds feature c G + g)."""
    full = np.zeros((layout.batch_pad, layout.hidden_pad, per_case_feature.shape[2]))
    full[: per_case_feature.shape[0], : per_case_feature.shape[1]] = per_case_feature
    lanes = full.reshape(layout.lanes, -1)  # [R, F+1]
    fi = layout.feature_index()
    return [lanes[:, fi[c]].T.reshape(-1).tolist() for c in range(layout.n_ciphertexts)]


def pack_inputs(layout: Layout, x: Array) -> list[list[float]]:
    """Key-service side: ``x`` [B, F] (bias column included) -> the C plaintext slot vectors to encrypt."""
    x = np.asarray(x, np.float64)
    if x.shape != (layout.batch, layout.n_features):
        raise ValueError(f"expected inputs of shape {(layout.batch, layout.n_features)}, got {x.shape}")
    xp = np.concatenate([x, np.zeros((layout.batch, 1))], axis=1)  # padding feature = 0
    return _blocks_of(layout, np.broadcast_to(xp[:, None, :], (layout.batch, layout.hidden, xp.shape[1])))


def weight_patterns(layout: Layout, w1b: Array) -> list[list[float]]:
    """Worker side: the C plaintexts ``W1b[j, f]`` in the input layout (cached per layout)."""
    wp = np.concatenate([w1b, np.zeros((w1b.shape[0], 1))], axis=1)  # [H, F+1]
    return _blocks_of(layout, np.broadcast_to(wp[None], (layout.batch, *wp.shape)))


def readout_patterns(layout: Layout, m: Array, off: Array, c: float) -> list[tuple[list[float], list[float], list[float]]]:
    """Worker side: per output ``k`` the lane-wise ``M[:, k, :]``, ``c M[:, k, :]`` and the offset
    (in the ``j = 0`` lane of each case)."""
    b, o, h = m.shape
    if b != layout.batch or h != layout.hidden:
        raise ValueError(f"readout of shape {m.shape} does not fit layout {layout.to_dict()}")
    out = []
    for k in range(o):
        mk = np.zeros((layout.batch_pad, layout.hidden_pad))
        mk[:b, :h] = m[:, k, :]
        ok = np.zeros((layout.batch_pad, layout.hidden_pad))
        ok[:b, 0] = off[:, k]
        flat = mk.reshape(-1)
        out.append((flat.tolist(), (c * flat).tolist(), ok.reshape(-1).tolist()))
    return out


def unpack_outputs(layout: Layout, outputs: Sequence[Sequence[float]]) -> Array:
    """Key-service side: decrypted output vectors (one per logit) -> logits [B, n_out] (sum over ``j``)."""
    cols = [np.asarray(v[: layout.lanes], np.float64).reshape(layout.batch_pad, layout.hidden_pad).sum(axis=1)
            for v in outputs]
    return np.stack(cols, axis=1)[: layout.batch]


# ---------------------------------------------------------------------------------------------------
# Encrypted evaluation (worker side: needs only the public context)


class Evaluator:
    """Evaluates packs under one public context; caches the weight plaintexts per layout.

    TenSEAL resets a ciphertext's scale to ``2^scale_bits`` after each rescale although the true scale
    is ``2^(2 scale_bits) / q`` (``q`` the dropped prime, ~1e-4 away from ``2^scale_bits``). Each
    plaintext factor is multiplied by ``q / 2^scale_bits`` of the rescale that follows it, which removes
    that systematic error exactly (the ``q`` are public parameters).
    """

    def __init__(self, model: HeModel, params: HeParams | None = None) -> None:
        self.model = model
        self.params = (params or HeParams()).check()
        data = chain_primes(self.params)[:-1]  # the last one is the key-switching prime
        scale = 2.0 ** self.params.global_scale_bits
        self._fix = [q / scale for q in reversed(data)]  # factor of the i-th rescale
        self._w_cache: dict[Layout, list[list[float]]] = {}

    def weights(self, layout: Layout) -> list[list[float]]:
        if layout not in self._w_cache:
            self._w_cache[layout] = (np.asarray(weight_patterns(layout, self.model.w1b)) * self._fix[0]).tolist()
        return self._w_cache[layout]

    @staticmethod
    def depth_needed(layout: Layout) -> int:
        return 4 if layout.blocks > 1 else 3

    def hidden(self, layout: Layout, cts: Sequence[ts.CKKSVector]) -> ts.CKKSVector:
        """``y[b, j]`` in lane ``(b, j)``: sum of the C products, then the G-block sum."""
        if len(cts) != layout.n_ciphertexts:
            raise ValueError(f"layout needs {layout.n_ciphertexts} ciphertexts, got {len(cts)}")
        acc = None
        for ct, w in zip(cts, self.weights(layout), strict=True):
            if ct.size() != layout.size:
                raise ValueError(f"ciphertext holds {ct.size()} slots, the layout {layout.size}")
            term = ct * w
            acc = term if acc is None else acc + term
        assert acc is not None
        if layout.blocks > 1:
            acc = acc.enc_matmul_plain([self._fix[1]] * layout.blocks, layout.lanes)
        return acc

    def logits(self, layout: Layout, cts: Sequence[ts.CKKSVector], z: Array) -> list[ts.CKKSVector]:
        """One encrypted vector per output ``k``: lane-wise ``M_k y + c M_k y^2 + o_k`` (the key service
        sums each case's ``H`` lanes)."""
        if self.depth_needed(layout) > self.params.depth:
            raise HeParamError(f"this pack needs {self.depth_needed(layout)} rescales; he.coeff_mod_bit_sizes "
                               f"gives {self.params.depth}")
        used = 2 if layout.blocks > 1 else 1
        m, off = self.model.readout(z)
        pats = readout_patterns(layout, m * self._fix[used], off, self.model.c * self._fix[used + 1])
        y = self.hidden(layout, cts)
        y2 = y.square()
        outs = []
        for mk, cmk, ok in pats:
            out = y2 * cmk
            out += y * mk
            out += ok
            outs.append(out)
        return outs


# ---------------------------------------------------------------------------------------------------
# Equivalence run: ``python -m msgate.model.he evaluate``


def random_model(seed: int = 0) -> tuple[PatientNet, HeModel]:
    """A randomly initialised multimodal ``PatientNet`` (tiny preset) and its export: the HE math check
    used until a trained checkpoint is shipped."""
    import torch

    from msgate.model.patient.network import PatientNet
    from msgate.model.patient.presets import get_preset

    torch.manual_seed(seed)
    net = PatientNet(get_preset("tiny")).eval()
    return net, export(net)


def synthetic_inputs(n: int, n_columns: int, z_dim: int, seed: int = 1) -> tuple[Array, Array]:
    """Standardised EHR inputs with random missingness ([values, mask]) and image embeddings."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, n_columns)) > 0.2).astype(np.float64)
    vals = np.clip(rng.normal(size=(n, n_columns)), -5, 5) * mask
    z = np.maximum(rng.normal(size=(n, z_dim)), 0.0)  # image_mlp ends in ReLU
    return np.concatenate([vals, mask], axis=1), z


def _torch_logits(net: PatientNet, u: Array, z: Array) -> Array:
    import torch

    with torch.no_grad():
        e = net.ehr_embedding(torch.as_tensor(u, dtype=torch.float32))
        out = net.fusion(torch.as_tensor(z, dtype=torch.float32), e)
    return np.asarray(out.double().numpy(), np.float64)


def cohort_inputs(net: PatientNet, path: str, scaler: Any = None) -> tuple[Array, Array]:
    """``(u, z)`` of a held-out synthetic cohort cache (``patient.synthdata.build_cache`` ``.npz``):
    standardised EHR inputs (the checkpoint's scaler, else one fitted on the cache) and image embeddings."""
    import torch

    from msgate.model.patient.ehr import EhrScaler

    d = np.load(path)
    sc = scaler or EhrScaler.fit(d["ehr_x"], d["ehr_m"])
    u = sc.transform(d["ehr_x"], d["ehr_m"]).astype(np.float64)
    zs = []
    with torch.no_grad():
        for s in range(0, len(u), 16):
            zs.append(net.image_embedding(torch.as_tensor(d["image"][s:s + 16].astype(np.float32)),
                                          torch.as_tensor(d["present"][s:s + 16].astype(np.float32)),
                                          torch.as_tensor(d["lesion"][s:s + 16].astype(np.float32))).double().numpy())
    return u, np.concatenate(zs)


def compare(n: int = 200, batch: int = 16, checkpoint: str | None = None, seed: int = 1,
            data: str | None = None) -> dict[str, Any]:
    """Run ``n`` cases (or the cohort cache ``data``) through the plaintext network and the HE path."""
    import tenseal as ts

    from msgate.model.patient.calibration import sigmoid, softmax

    t_edss = t_ms = 1.0
    scaler = None
    if checkpoint:
        from msgate.model.patient import checkpoint as ck

        loaded = ck.load(checkpoint)
        net, model, t_edss, t_ms = loaded.net, export(loaded.net), loaded.t_edss, loaded.t_ms
        scaler = loaded.scaler
        source = f"checkpoint {checkpoint}"
    else:
        net, model = random_model()
        source = "randomly initialised PatientNet (tiny preset)"
    if data:
        u, z = cohort_inputs(net, data, scaler)
        n, source = len(u), f"{source}; cohort cache {data}"
    else:
        u, z = synthetic_inputs(n, (model.n_features - 1) // 2, model.gate_w.shape[1], seed)
    params = HeParams()
    ctx = make_context(params)
    pub = ctx.copy()
    pub.make_context_public()
    ev = Evaluator(model, params)
    he = np.zeros((n, model.n_out))
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        xb, zb = with_bias(u[s:s + batch]), z[s:s + batch]
        lay = make_layout(len(xb), model.n_features, model.hidden, params.slots)
        cts = [ts.ckks_vector_from(pub, ts.ckks_vector(ctx, v).serialize()) for v in pack_inputs(lay, xb)]
        res = [o.serialize() for o in ev.logits(lay, cts, zb)]
        he[s:s + batch] = unpack_outputs(lay, [ts.ckks_vector_from(ctx, r).decrypt() for r in res])
    elapsed = time.perf_counter() - t0
    plain = _torch_logits(net, u, z)
    p_plain, p_he = softmax(plain[:, :4], t_edss), softmax(he[:, :4], t_edss)
    ms_plain, ms_he = sigmoid(plain[:, 5], t_ms), sigmoid(he[:, 5], t_ms)
    return {"source": source, "cases": n, "batch": batch, "params": params.to_dict(),
            "same_class": float(np.mean(p_plain.argmax(1) == p_he.argmax(1))),
            "max_abs_dprob_edss": float(np.abs(p_plain - p_he).max()),
            "max_abs_dprob_ms": float(np.abs(ms_plain - ms_he).max()),
            "max_abs_dlogit": float(np.abs(plain - he).max()),
            "max_abs_logit": float(np.abs(plain).max()), "seconds": round(elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msgate.model.he",
                                description="HE equivalence run: plaintext vs CKKS on synthetic cases")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--cases", type=int, default=200)
    ev.add_argument("--batch", type=int, default=16)
    ev.add_argument("--checkpoint", default=None, help="patient checkpoint; default: random init of the architecture")
    ev.add_argument("--data", default=None, help="held-out cohort cache (.npz from patient.synthdata.build_cache)")
    args = p.parse_args(argv)
    report = compare(args.cases, args.batch, args.checkpoint, data=args.data)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    ok = report["same_class"] == 1.0 and max(report["max_abs_dprob_edss"], report["max_abs_dprob_ms"]) <= 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
