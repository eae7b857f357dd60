"""Temperature scaling (Guo et al. 2017), expected calibration error and predictive entropy."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray


def fit_temperature(logits: NDArray[np.float32], labels: NDArray[np.int64], binary: bool = False) -> float:
    """Scalar T > 0 minimising the validation NLL of ``logits / T`` (LBFGS on log T)."""
    lg = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        scaled = lg / log_t.exp()
        if binary:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scaled, y.double())
        else:
            loss = torch.nn.functional.cross_entropy(scaled, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def softmax(logits: NDArray[np.floating], temperature: float = 1.0) -> NDArray[np.float64]:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def sigmoid(x: NDArray[np.floating] | float, temperature: float = 1.0) -> NDArray[np.float64]:
    """Logistic function of ``x / temperature``."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64) / temperature))  # type: ignore[no-any-return]


def ece(probs: NDArray[np.floating], labels: NDArray[np.integer], n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(probs: NDArray[np.floating], labels: NDArray[np.integer], n_bins: int = 10
                ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Per-bin mean confidence, accuracy and count (for the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    c, a, n = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        c.append(conf[sel].mean() if sel.any() else np.nan)
        a.append(correct[sel].mean() if sel.any() else np.nan)
        n.append(int(sel.sum()))
    return np.asarray(c), np.asarray(a), np.asarray(n)


def normalised_entropy(probs: NDArray[np.floating]) -> NDArray[np.float64]:
    """Entropy of each row divided by log(K): 0 (certain) .. 1 (uniform)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])  # type: ignore[no-any-return]


def fit_temperature_bias(logits: NDArray[np.float32], labels: NDArray[np.int64]) -> tuple[float, NDArray[np.float64]]:
    """Scalar T and per-class offsets ``b`` (``b[0] = 0``) minimising the NLL of ``softmax(logits / T + b)``:
    temperature scaling plus a prior (class-frequency) correction, e.g. after class-weighted training."""
    lg = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(lg.shape[1] - 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.1, max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        off = torch.cat([b.new_zeros(1), b])
        loss = torch.nn.functional.cross_entropy(lg / log_t.exp() + off, y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(np.clip(log_t.exp().item(), 0.05, 20.0))
    return t, np.concatenate([[0.0], b.detach().numpy()])
