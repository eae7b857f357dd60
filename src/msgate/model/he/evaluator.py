"""Encrypted evaluation of a pack (worker side: needs only the public context).

For each lane group (:mod:`msgate.model.he.packing`) the worker computes the hidden layer ``y`` of its
members from the shared input ciphertexts (level 1, then the block sum: level 2). The activation and
readout ``M_k (y + c y^2)`` are rewritten as ``c M_k (y + 1/(2c))^2 - M_k / (4c)``: a plaintext shift,
one square (level 3) and one product per output ``k`` (level 4), where ``M_k`` holds each member's
readout divided by the ensemble size; the constant ``- sum_j M_k[j] / (4 c_j)`` is plaintext and joins
the offset. The groups' outputs are added, and the offset goes into the ``j = 0`` lane of each case. The key service decrypts the
``K`` output vectors and sums each case's lanes, which gives the ensemble's logits. No TenSEAL ``mm``
(one rotation per input feature) is used, and every bias is folded or added after the last
multiplication (reference/domain.md section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from msgate.model.he.circuit import Array, HeModel
from msgate.model.he.packing import (
    Layout,
    lane_groups,
    offset_patterns,
    readout_patterns,
    shift_pattern,
    weight_patterns,
)
from msgate.model.he.params import HeParamError, HeParams, chain_primes

if TYPE_CHECKING:
    import tenseal as ts


class Evaluator:
    """Evaluates packs under one public context; caches the weight plaintexts per layout and group.

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
        self._w_cache: dict[tuple[Layout, int], list[list[float]]] = {}

    def groups(self, layout: Layout) -> list[list[int]]:
        return lane_groups(self.model.widths, layout.hidden)

    def weights(self, layout: Layout, group: int) -> list[list[float]]:
        key = (layout, group)
        if key not in self._w_cache:
            members = [self.model.members[i] for i in self.groups(layout)[group]]
            w1b = np.concatenate([m.w1b for m in members])
            self._w_cache[key] = (np.asarray(weight_patterns(layout, w1b)) * self._fix[0]).tolist()
        return self._w_cache[key]

    @staticmethod
    def depth_needed(layout: Layout) -> int:
        return 4 if layout.blocks > 1 else 3

    def hidden(self, layout: Layout, cts: Sequence[ts.CKKSVector], group: int = 0) -> ts.CKKSVector:
        """``y[b, j]`` of one lane group in lane ``(b, j)``: sum of the C products, then the block sum."""
        if len(cts) != layout.n_ciphertexts:
            raise ValueError(f"layout needs {layout.n_ciphertexts} ciphertexts, got {len(cts)}")
        acc = None
        for ct, w in zip(cts, self.weights(layout, group), strict=True):
            if ct.size() != layout.size:
                raise ValueError(f"ciphertext holds {ct.size()} slots, the layout {layout.size}")
            term = ct * w
            acc = term if acc is None else acc + term
        assert acc is not None
        if layout.blocks > 1:
            acc = acc.enc_matmul_plain([self._fix[1]] * layout.blocks, layout.lanes)
        return acc

    def logits(self, layout: Layout, cts: Sequence[ts.CKKSVector], z: Array) -> list[ts.CKKSVector]:
        """One encrypted vector per output ``k``: lane-wise ``c M_k (y + 1/(2c))^2`` over all lane groups,
        plus the offset less ``sum_j M_k[j] / (4 c_j)`` (the key service sums each case's lanes).
        ``z``: image embeddings [K, B, Z]."""
        if self.depth_needed(layout) > self.params.depth:
            raise HeParamError(f"this pack needs {self.depth_needed(layout)} rescales; he.coeff_mod_bit_sizes "
                               f"gives {self.params.depth}")
        zs = self.model.member_z(z)
        if zs.shape[1] != layout.batch:
            raise ValueError(f"pack of {layout.batch} cases got {zs.shape[1]} image embeddings")
        fix = self._fix[2 if layout.blocks > 1 else 1] * self._fix[3 if layout.blocks > 1 else 2]
        ms, off = self.model.readouts(zs)
        members = self.model.members
        const = sum(ms[i].sum(axis=2) / (4.0 * members[i].c) for i in range(len(members)))
        offsets = offset_patterns(layout, off - const)
        outs: list[ts.CKKSVector] = []
        for g, group in enumerate(self.groups(layout)):
            c = np.concatenate([np.full(members[i].hidden, members[i].c) for i in group])
            m = np.concatenate([ms[i] for i in group], axis=2)
            s2 = (self.hidden(layout, cts, g) + shift_pattern(layout, c)).square()
            for k, cmk in enumerate(readout_patterns(layout, m * fix, c)):
                out = s2 * cmk
                if g == 0:
                    out += offsets[k]
                    outs.append(out)
                else:
                    outs[k] += out
        return outs
