"""The patient ensemble's EHR branch and fusion in HE evaluation form (float64 numpy, no torch).

Per member ``m``, with ``u`` the model EHR input ``[standardised values, mask]`` plus a constant 1
(``x = [u; 1]``, so the hidden bias is folded into ``W1b = [W1 | b1]``): ``y = W1b x``,
``a = y + c y^2`` (:class:`~msgate.model.patient.encoders.PolyAct`), ``e = W2 a + b2``, and the fusion
gives ``out = A(z) + W diag(g) e`` with ``g = 2 sigmoid(G z)``. Given the member's image embedding
``z`` this is ``out = M a + o`` with the per-case *plaintext* readout ``M = W diag(g) W2`` and offset
``o = A(z) + W diag(g) b2``. The ensemble averages the members' outputs, so its logits are
``sum_m (M_m / K) a_m + mean_m o_m``: one readout row per member hidden unit, all of them applied to
the *same* encrypted ``x``. Only ``x`` is encrypted; ``z`` (and so ``M``, ``o``) is plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from msgate.model.patient.network import PatientNet

Array = NDArray[np.float64]


@dataclass(frozen=True)
class HeMember:
    """One member's EHR encoder and fusion weights."""

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
    def hidden(self) -> int:
        return int(self.w1b.shape[0])

    def readout(self, z: Array) -> tuple[Array, Array]:
        """Per-case ``M = W diag(g) W2`` [B, O, H] and offset ``A(z) + W diag(g) b2`` [B, O]."""
        z = np.asarray(z, np.float64)
        g = 2.0 / (1.0 + np.exp(-(z @ self.gate_w.T + self.gate_b)))  # [B, E]
        wg = self.ehr_w[None, :, :] * g[:, None, :]  # [B, O, E]
        m = wg @ self.w2  # [B, O, H]
        off = z @ self.head_w.T + self.head_b + wg @ self.b2
        return m, off

    def plain_logits(self, x: Array, z: Array) -> Array:
        """This member's outputs from ``x`` (bias column included), in plaintext float64."""
        y = x @ self.w1b.T
        m, off = self.readout(z)
        return np.einsum("boh,bh->bo", m, y + self.c * y * y) + off  # type: ignore[no-any-return]


@dataclass(frozen=True)
class HeModel:
    """The ensemble (one or more members with the same inputs and outputs)."""

    members: tuple[HeMember, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an HE model needs at least one member")
        shapes = {(m.w1b.shape[1], m.head_w.shape[0], m.gate_w.shape[1]) for m in self.members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members differ in inputs, outputs or image width: {sorted(shapes)}")

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def n_features(self) -> int:
        """Encrypted inputs per case, the bias column included."""
        return int(self.members[0].w1b.shape[1])

    @property
    def n_columns(self) -> int:
        """EHR columns (the input is ``[values, mask]``, ``2 * n_columns`` wide before the bias)."""
        return (self.n_features - 1) // 2

    @property
    def n_out(self) -> int:
        return int(self.members[0].head_w.shape[0])

    @property
    def z_dim(self) -> int:
        return int(self.members[0].gate_w.shape[1])

    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden units per member (the lanes each member needs per case)."""
        return tuple(m.hidden for m in self.members)

    def member_z(self, z: Array) -> Array:
        """Image embeddings as ``[K, B, Z]``; a ``[B, Z]`` array is accepted for a one-member model."""
        z = np.asarray(z, np.float64)
        if z.ndim == 2 and self.n_members == 1:
            z = z[None]
        if z.ndim != 3 or z.shape[0] != self.n_members or z.shape[2] != self.z_dim:
            raise ValueError(f"expected image embeddings [{self.n_members}, B, {self.z_dim}], got {z.shape}")
        return z

    def readouts(self, z: Array) -> tuple[list[Array], Array]:
        """Per member ``M_m / K`` [B, O, H_m], and the ensemble offset ``mean_m o_m`` [B, O]."""
        zs = self.member_z(z)
        parts = [m.readout(zm) for m, zm in zip(self.members, zs, strict=True)]
        k = float(self.n_members)
        return [mm / k for mm, _ in parts], np.mean([off for _, off in parts], axis=0)

    def plain_logits(self, u: Array, z: Array) -> Array:
        """The ensemble in plaintext float64 (the reference the encrypted path must reproduce)."""
        x, zs = with_bias(u), self.member_z(z)
        return np.mean([m.plain_logits(x, zm) for m, zm in zip(self.members, zs, strict=True)],  # type: ignore[no-any-return]
                       axis=0)


def with_bias(u: Array) -> Array:
    """Append the constant-1 column that carries the folded first-layer bias."""
    u = np.asarray(u, np.float64)
    return np.concatenate([u, np.ones((*u.shape[:-1], 1))], axis=-1)


def export_member(net: PatientNet) -> HeMember:
    """Export ``PatientNet.ehr`` (Linear, PolyAct, Linear) and ``PatientNet.fusion`` (eval weights)."""
    from msgate.model.patient.encoders import PolyAct

    lin1, act, lin2 = net.ehr.net[0], net.ehr.net[1], net.ehr.net[2]
    if not isinstance(act, PolyAct):
        raise TypeError("EhrEncoder is not Linear -> PolyAct -> Linear; it cannot run under CKKS")
    if net.mode != "multimodal":
        raise ValueError(f'HE mode needs a multimodal checkpoint, not mode "{net.mode}"')
    if float(act.c) == 0.0:
        raise ValueError("PolyAct coefficient c = 0: the HE readout completes the square in y + c y^2")

    def a(t: Any) -> Array:
        return np.asarray(t.detach().cpu().double().numpy(), np.float64)

    fu = net.fusion
    return HeMember(w1b=np.concatenate([a(lin1.weight), a(lin1.bias)[:, None]], axis=1), c=float(act.c),
                    w2=a(lin2.weight), b2=a(lin2.bias), gate_w=a(fu.gate.weight), gate_b=a(fu.gate.bias),
                    head_w=a(fu.image_head.weight), head_b=a(fu.image_head.bias), ehr_w=a(fu.ehr_head.weight))


def export(nets: PatientNet | Sequence[PatientNet]) -> HeModel:
    """Export every member of a checkpoint's ensemble (``PatientCheckpoint.nets``), or one network."""
    from torch import nn

    members = [nets] if isinstance(nets, nn.Module) else list(nets)
    return HeModel(tuple(export_member(n) for n in members))
