"""Make docs/img/synth-montage.png and docs/img/synth-histograms.png (run once, commit the PNGs).

    .venv/bin/python docs/make_synth_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy  # noqa: E402
from msgate.model.synth.cohort import CohortConfig, simulate_subject, subject_rng, _diagnosis  # noqa: E402
from msgate.model.synth.latent import sample_latent  # noqa: E402
from msgate.model.synth.lesions import place_lesions, sample_specs  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"


def _slice_of(sub, role: str, z_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice of a series at world z, and the lesion mask slice at the same z."""
    s = next(x for p, x in zip(sub.plans, sub.series) if p.role == role)
    k = int(round((z_mm - s.affine[2, 3]) / s.affine[2, 2]))
    img = s.pixels[:, :, k].astype(np.float32) * s.slope + s.intercept
    km = int(round((z_mm - sub.anatomy.affine[2, 3]) / sub.anatomy.affine[2, 2]))
    mask = sub.lesions.labels[:, :, km] > 0
    if mask.shape != img.shape:
        mask = np.zeros_like(img, bool)
    return img.T, mask.T


def montage(n: int = 4) -> None:
    """FLAIR / QSM / T1 of n subjects (1 mm), lesions outlined in red."""
    cfg = CohortConfig(Path("/tmp"), seed=2026, resolution=1, protocol="3d")
    subs = [simulate_subject(cfg, i) for i in range(1, n + 1)]
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n))
    for r, sub in enumerate(subs):
        z = float(sub.anatomy.affine[2, 3] + sub.anatomy.affine[2, 2] * np.argmax((sub.lesions.labels > 0).sum((0, 1))))
        for c, role in enumerate(("FLAIR", "QSM", "T1")):
            img, mask = _slice_of(sub, role, z)
            ax = axes[r, c]
            lim = (-0.08, 0.12) if role == "QSM" else (0, np.percentile(img, 99.5))
            ax.imshow(img, cmap="gray", origin="lower", vmin=lim[0], vmax=lim[1])
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="r", linewidths=0.5)
            ax.set_axis_off()
            lat = sub.latent
            ax.set_title(f"{role}  {lat.phenotype} EDSS {lat.edss:g}, rim+ {sum(l.rim for l in sub.lesions.lesions)}", fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "synth-montage.png", dpi=80)


def histograms(n: int = 300) -> None:
    """EDSS and lesion load over n subjects (2 mm grid, default mix)."""
    tpl = load_template(2)
    mix = {"ms": 0.7, "csvd": 0.3}
    rows = []
    for i in range(1, n + 1):
        rng = subject_rng(1, i)
        lat = sample_latent(_diagnosis(mix, rng), rng)
        an = make_anatomy(tpl, WarpParams.sample(rng), lat.atrophy, rng)
        maps = place_lesions(sample_specs(lat, rng), an, rng)
        rows.append((lat.diagnosis, lat.edss, sum(les.volume_mm3 for les in maps.lesions) / 1000.0))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for dx, col in (("ms", "tab:blue"), ("csvd", "tab:orange")):
        e = [r[1] for r in rows if r[0] == dx]
        v = [r[2] for r in rows if r[0] == dx]
        a.hist(e, bins=np.arange(-0.25, 10.0, 0.5), alpha=0.6, color=col, label=f"{dx} (n={len(e)})")
        b.hist(v, bins=30, alpha=0.6, color=col, label=dx)
    a.set_xlabel("EDSS"), a.set_ylabel("subjects"), a.legend()
    b.set_xlabel("lesion load (mL)"), b.legend()
    fig.tight_layout()
    fig.savefig(IMG / "synth-histograms.png", dpi=80)


if __name__ == "__main__":
    IMG.mkdir(exist_ok=True)
    montage()
    histograms()
