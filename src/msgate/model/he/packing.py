"""SIMD packing: several cases, and several ensemble members, per CKKS ciphertext.

Slots are ``n = N / 2``. A *lane* ``r = (b, j)`` indexes case ``b`` (of ``B``, padded to a power of
two) and hidden unit ``j`` of a *lane group*: the hidden units of one or more ensemble members side
by side (``hidden`` = the group's width, padded to a power of two), so ``R = B * hidden`` lanes. The
key service writes feature ``f = c * G + g`` of case ``b`` into every lane of case ``b`` in slot block
``g`` of ciphertext ``c`` (``G = min(n / R, 64)`` blocks, ``C = ceil(F / G)`` ciphertexts). The worker
multiplies ciphertext ``c`` by the plaintext ``W1b[j, f]`` of the group's members laid out the same
way, adds the ``C`` products, and sums the ``G`` blocks (``log2 G`` rotations), so lane ``(b, j)``
holds ``y[b, j]``. Every group reuses the same input ciphertexts with its own weights.

How wide a group should be is a trade (:func:`choose_width`): one group holding every member needs
the fewest operations on the worker but replicates each feature over more lanes, so more input
ciphertexts to encrypt, send and parse; one group per member needs ``K`` times the block sums,
squares and readouts but the fewest input ciphertexts. One case: a group of all 3 members of the
shipped ensemble (2 ciphertexts, 5 rotations); 16 cases: one group per member (6 ciphertexts,
3 rotations each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

COST_MS: dict[str, float] = {"input_ciphertext": 30.0, "product": 8.0, "rotation": 5.0, "group": 43.0}
"""Cost of a pack's operations in ms at N = 8192 (medians of 15 on the shared 2-core EPYC at a load
average of 8, so about 3x the idle cost): encrypt + serialize + parse of one input ciphertext, one
plaintext product on a full ciphertext, one rotation of the block sum, and a lane group's fixed part
(the block sum's product, the shift, the square and the 6 readout products). Only their ratios
matter: they choose the lane-group width, and bench/he.py --all-widths checks the choice."""


@dataclass(frozen=True)
class Layout:
    """Slot layout of one pack of ``batch`` cases; ``hidden`` is the width of one lane group."""

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
        """``R``: one lane per (case, hidden unit of the group), padded to powers of two."""
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
    """How many cases fit into one pack (one lane per case and hidden unit of a group)."""
    return max(1, slots // _pow2(hidden))


def make_layout(batch: int, n_features: int, hidden: int, slots: int) -> Layout:
    if batch < 1 or batch > max_pack(hidden, slots):
        raise ValueError(f"a pack holds 1..{max_pack(hidden, slots)} cases, not {batch}")
    return Layout(batch, n_features, hidden, slots)


def lane_groups(widths: Sequence[int], hidden: int) -> list[list[int]]:
    """Members (indices) per lane group: consecutive members while their widths fit ``hidden``."""
    if not widths or max(widths) > hidden:
        raise ValueError(f"a lane group of width {hidden} cannot hold members of widths {list(widths)}")
    groups: list[list[int]] = [[]]
    used = 0
    for i, w in enumerate(widths):
        if used + w > hidden:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += w
    return groups


def pack_cost(layout: Layout, widths: Sequence[int]) -> float:
    """Estimated cost of one pack (:data:`COST_MS`), end to end."""
    k = len(lane_groups(widths, layout.hidden))
    c = layout.n_ciphertexts
    per_group = c * COST_MS["product"] + layout.rotations * COST_MS["rotation"] + COST_MS["group"]
    return c * COST_MS["input_ciphertext"] + k * per_group


def choose_width(batch: int, widths: Sequence[int], n_features: int, slots: int) -> int:
    """The lane-group width with the lowest :func:`pack_cost` for a pack of ``batch`` cases."""
    candidates = sorted({sum(widths[i:j]) for i in range(len(widths)) for j in range(i + 1, len(widths) + 1)})
    best: tuple[float, int] | None = None
    for width in (w for w in candidates if w >= max(widths) and batch <= max_pack(w, slots)):
        cost = pack_cost(Layout(batch, n_features, width, slots), widths)
        if best is None or cost < best[0]:
            best = (cost, width)
    if best is None:
        raise ValueError(f"{batch} cases do not fit one pack of {slots} slots with members {list(widths)}")
    return best[1]


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
    """Worker side: the C plaintexts ``W1b[j, f]`` of one lane group ([width, F]) in the input layout."""
    if w1b.shape[0] > layout.hidden or w1b.shape[1] != layout.n_features:
        raise ValueError(f"weights of shape {w1b.shape} do not fit layout {layout.to_dict()}")
    wp = np.concatenate([w1b, np.zeros((w1b.shape[0], 1))], axis=1)  # [H, F+1]
    return _blocks_of(layout, np.broadcast_to(wp[None], (layout.batch, *wp.shape)))


def lane_pattern(layout: Layout, values: Array) -> list[float]:
    """Per-lane plaintext from ``values`` [B, h] (h <= the group width); zero in the padding lanes."""
    b, h = values.shape
    if b != layout.batch or h > layout.hidden:
        raise ValueError(f"lane values of shape {values.shape} do not fit layout {layout.to_dict()}")
    full = np.zeros((layout.batch_pad, layout.hidden_pad))
    full[:b, :h] = values
    return full.reshape(-1).tolist()  # type: ignore[no-any-return]


def shift_pattern(layout: Layout, c: Array) -> list[float]:
    """``1 / (2 c_j)`` in every case's lanes: ``y + c y^2 = c (y + 1/(2c))^2 - 1/(4c)``, so one square
    and one product per output replace the two products of ``M y + c M y^2``."""
    c = np.asarray(c, np.float64)
    return lane_pattern(layout, np.broadcast_to(1.0 / (2.0 * c), (layout.batch, len(c))))


def readout_patterns(layout: Layout, m: Array, c: Array) -> list[list[float]]:
    """Worker side, one lane group: per output ``k`` the lane-wise ``c_j M[:, k, j]`` (``c`` per lane:
    each member's PolyAct coefficient), applied to ``(y + 1/(2c))^2``."""
    if m.ndim != 3 or m.shape[2] != np.shape(c)[0]:
        raise ValueError(f"readout of shape {m.shape} does not match {np.shape(c)[0]} lanes")
    return [lane_pattern(layout, m[:, k, :] * np.asarray(c)[None, :]) for k in range(m.shape[1])]


def offset_patterns(layout: Layout, off: Array) -> list[list[float]]:
    """Per output ``k`` the plaintext offset of each case in its ``j = 0`` lane."""
    out = []
    for k in range(off.shape[1]):
        lanes = np.zeros((layout.batch, 1))
        lanes[:, 0] = off[:, k]
        out.append(lane_pattern(layout, lanes))
    return out


def unpack_outputs(layout: Layout, outputs: Sequence[Sequence[float]]) -> Array:
    """Key-service side: decrypted output vectors (one per logit) -> logits [B, n_out] (sum over ``j``)."""
    cols = [np.asarray(v[: layout.lanes], np.float64).reshape(layout.batch_pad, layout.hidden_pad).sum(axis=1)
            for v in outputs]
    return np.stack(cols, axis=1)[: layout.batch]
