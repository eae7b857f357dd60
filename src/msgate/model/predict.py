"""The single model entry point for the workers: ``predict(cases) -> list[ModelResult]``.

Chain per batch: lesion model (``patient.lesionsrc.load_lesion_source``) -> MONAI preprocessing onto
the model grid -> patient network (eval mode) -> temperature-scaled EDSS and MS probabilities ->
MC-dropout uncertainty (fixed generator: deterministic) -> Grad-CAM heatmap mapped back to the FLAIR
grid -> exact per-feature EHR contributions to the EDSS estimate (EDSS points) -> flags.
Research software, not for diagnosis (docs/model-card.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from msgate.errors import ConfigError
from msgate.model.patient import checkpoint
from msgate.model.patient.calibration import normalised_entropy, sigmoid, softmax
from msgate.model.patient.ehr import missing_flags, raw_columns
from msgate.model.patient.explain import ehr_contributions, gradcam
from msgate.model.patient.lesionsrc import LesionOutput, LesionSource, lesion_features, load_lesion_source
from msgate.model.patient.preprocess import ModelInput, prepare, to_flair_grid
from msgate.model.types import Case, LesionFinding, ModelResult, Volume


@dataclass
class PatientModel:
    """A loaded checkpoint plus the lesion source and the decision thresholds."""

    ckpt: checkpoint.PatientCheckpoint
    lesions: LesionSource
    review_confidence: float = 0.5  # calibrated max probability below this -> "review"
    review_uncertainty: float = 0.8  # normalised MC-dropout entropy above this -> "review"
    mc_samples: int = 16
    batch_size: int = 4
    heatmaps: bool = True
    extra: dict[str, object] = field(default_factory=dict)
    device: str = "cpu"  # where the networks run (the worker's MSGATE_WORKERS__DEVICE)

    @property
    def name(self) -> str:
        return str(self.ckpt.meta.get("model_name", checkpoint.MODEL_NAME))

    @property
    def version(self) -> str:
        return f"{self.ckpt.meta.get('model_version', checkpoint.MODEL_VERSION)}+{self.ckpt.meta['preset']}"


_DEFAULT: PatientModel | None = None


def load_model(path: Path | str | None = None, *, review_confidence: float = 0.5,
               lesion_source: LesionSource | None = None, device: str | None = None) -> PatientModel:
    """Load the patient checkpoint (default: the packaged ``patient-tiny.pt``) and the lesion source it
    was trained with (``heuristic`` stand-in or the issue-6 lesion model; see ``lesionsrc``), on
    ``device`` (``cpu`` by default; the worker passes its resolved device, e.g. ``cuda``)."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    dev = str(device or "cpu")
    ckpt = checkpoint.load(path)
    for net in {id(n): n for n in (*ckpt.nets, ckpt.net)}.values():
        net.to(dev)
    source = lesion_source or load_lesion_source(str(ckpt.meta.get("lesion_source", "heuristic")), device=dev)
    expected, actual = str(ckpt.meta.get("lesion_checkpoint") or ""), str(getattr(source, "checkpoint", "") or "")
    if lesion_source is None and expected and actual and expected != actual:
        raise ConfigError(f"the patient model was trained on lesion features from lesion checkpoint {expected}, "
                          f"but lesion checkpoint {actual} is installed: its features would not match; install "
                          "the pair the patient checkpoint names, or retrain it (msgate train patient)")
    return PatientModel(ckpt, source, review_confidence, device=dev)


def _inputs(model: PatientModel, case: Case) -> tuple[LesionOutput, ModelInput, NDArray[np.float32], NDArray[np.float32]]:
    if "FLAIR" not in case.volumes:
        raise ValueError(f'Case "{case.case_id}" has no FLAIR volume; FLAIR is required.')
    if case.ehr is None:
        raise ValueError(f'Case "{case.case_id}" carries no EHR vector (withheld in HE mode); '
                         "the plaintext model needs it.")
    les = model.lesions(case.volumes)
    mi = prepare(case.volumes, les.labels, checkpoint.preset_from_meta(model.ckpt.meta))
    x, m = raw_columns(case.ehr)
    feats = lesion_features(les.findings, "QSM" in case.volumes)
    return les, mi, model.ckpt.scaler.transform(x, m), feats


def _mc_probs(model: PatientModel, zs: list[torch.Tensor], es: list[torch.Tensor]) -> NDArray[np.float64]:
    """Mean over MC-dropout passes of the softmax of the member-averaged EDSS logits (fixed masks)."""
    nets = model.ckpt.nets
    gen = torch.Generator().manual_seed(0)
    probs = []
    with torch.no_grad():
        for _ in range(model.mc_samples):
            logits = torch.zeros(zs[0].shape[0], 4, device=zs[0].device)
            for net, z, e in zip(nets, zs, es):
                keep = (torch.rand(z.shape[1:], generator=gen) >= net.drop.p).float() / (1.0 - net.drop.p)
                logits += net.fusion(z * keep.to(z.device), e)[:, :4] / len(nets)
            probs.append(softmax(logits.cpu().numpy(), model.ckpt.t_edss))
    return np.mean(probs, axis=0)  # type: ignore[no-any-return]


def _mean_dicts(rows: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    return [{k: float(np.mean([r[i][k] for r in rows])) for k in rows[0][i]} for i in range(len(rows[0]))]


MIN_HEAD_FOOT_MM = 100.0
"""A FLAIR that spans less than this head to foot does not hold the brain: on a 3-slice slab the lesion
network labelled the whole slab as one 100 mL lesion. Such a result is flagged for review."""


def head_foot_extent(volume: Volume) -> float:
    """The volume's extent along the patient's head-foot axis (LPS z), in mm, voxel centre to centre."""
    k, r, c = volume.data.shape
    corners = np.array([[i, j, m, 1.0] for i in (0, c - 1) for j in (0, r - 1) for m in (0, k - 1)])
    z = (volume.affine_lps @ corners.T)[2]
    return float(z.max() - z.min())


QSM_PPM_P99_MAX = 5.0
"""Brain susceptibility is within about +-0.5 ppm (veins and iron-rich nuclei reach ~1): a 99th percentile
of |QSM| above this is a map in other units (ppb, or scaled integers without their rescale), on which
every lesion would look paramagnetic."""


def qsm_scale_suspect(qsm: Volume) -> bool:
    return float(np.percentile(np.abs(qsm.data[::2, ::2, ::2]), 99)) > QSM_PPM_P99_MAX


def _flags(case: Case, confidence: float, uncertainty: float, model: PatientModel,
           findings: tuple[LesionFinding, ...] = ()) -> tuple[str, ...]:
    flags = [f for f, role in (("qsm_absent", "QSM"), ("t1_absent", "T1")) if role not in case.volumes]
    if "QSM" in case.volumes and any(f.rim_probability is None for f in findings):
        flags.append("qsm_partial_coverage")  # lesions outside the QSM field of view: not assessed
    if "QSM" in case.volumes and qsm_scale_suspect(case.volumes["QSM"]):
        flags.append("qsm_scale_suspect")
    partial = head_foot_extent(case.flair) < MIN_HEAD_FOOT_MM
    if partial:
        flags.append("partial_coverage")
    flags += missing_flags(case.ehr) if case.ehr is not None else []
    if (not (np.isfinite(confidence) and np.isfinite(uncertainty))  # NaN compares False: never "review"
            or partial or "qsm_scale_suspect" in flags
            or confidence < model.review_confidence or uncertainty > model.review_uncertainty):
        flags.append("review")
    return tuple(flags)


def _predict_batch(model: PatientModel, cases: list[Case]) -> list[ModelResult]:
    net = model.ckpt.net.eval()
    prepared = [_inputs(model, c) for c in cases]
    dev = model.device
    image = torch.as_tensor(np.stack([p[1].image for p in prepared])).to(dev)
    present = torch.as_tensor(np.stack([p[1].present for p in prepared])).to(dev)
    ehr = torch.as_tensor(np.stack([p[2] for p in prepared])).to(dev)
    lesion = torch.as_tensor(np.stack([p[3] for p in prepared])).to(dev)
    nets = model.ckpt.nets
    with torch.no_grad():
        zs = [n.image_embedding(image, present, lesion) for n in nets]
        es = [n.ehr_embedding(ehr) for n in nets]
        outs = [n.heads(z, e) for n, z, e in zip(nets, zs, es)]
    out = {k: torch.stack([o[k] for o in outs]).mean(0).cpu() for k in ("edss_logits", "edss", "ms_logit")}
    probs = softmax(out["edss_logits"].numpy(), model.ckpt.t_edss)
    p_ms = sigmoid(out["ms_logit"].numpy(), model.ckpt.t_ms)
    unc = normalised_entropy(_mc_probs(model, zs, es))
    contribs = _mean_dicts([ehr_contributions(n, z, ehr, "edss") for n, z in zip(nets, zs)])
    heat = None
    if model.heatmaps and net.mode != "ehr":
        layer = str(model.ckpt.meta["preset_config"]["gradcam_layer"])
        heat = np.mean([gradcam(n, image, present, lesion, ehr, "edss", layer, class_idx=None) for n in nets], axis=0)
    results = []
    for i, case in enumerate(cases):
        les, mi = prepared[i][0], prepared[i][1]
        conf = float(probs[i].max())
        results.append(ModelResult(
            case_id=case.case_id, model_name=model.name, model_version=model.version,
            edss_probabilities=tuple(float(p) for p in probs[i]),
            edss_estimate=float(np.clip(np.round(float(out["edss"][i]) * 2) / 2, 0.0, 9.5)),
            confidence=conf, uncertainty=float(unc[i]), p_ms=float(p_ms[i]), lesions=les.findings,
            lesion_mask=les.labels.astype(np.int16),
            heatmap=None if heat is None else to_flair_grid(heat[i], mi.affine_ras, case.flair),
            ehr_contributions=contribs[i], flags=_flags(case, conf, float(unc[i]), model, les.findings)))
    return results


def predict(cases: list[Case], model: PatientModel | None = None) -> list[ModelResult]:
    """One ``ModelResult`` per case, in order; batched; deterministic in eval mode."""
    global _DEFAULT
    if model is None:
        if _DEFAULT is None:
            _DEFAULT = load_model()
        model = _DEFAULT
    out: list[ModelResult] = []
    for s in range(0, len(cases), model.batch_size):
        out.extend(_predict_batch(model, cases[s:s + model.batch_size]))
    return out


def explain_heatmaps(case: Case, model: PatientModel | None = None) -> dict[str, NDArray[np.float32]]:
    """Grad-CAM maps of both heads ("edss": predicted bin, "diagnosis": predicted MS/cSVD class),
    member-averaged and resampled onto the FLAIR grid ([k, r, c], 0..1). ``ModelResult.heatmap`` is "edss"."""
    model = model or load_model()
    _, mi, ehr_in, feats = _inputs(model, case)
    args = (torch.as_tensor(mi.image[None]), torch.as_tensor(mi.present[None]), torch.as_tensor(feats[None]),
            torch.as_tensor(ehr_in[None]))
    layer = str(model.ckpt.meta["preset_config"]["gradcam_layer"])
    out: dict[str, NDArray[np.float32]] = {}
    for head in ("edss", "diagnosis"):
        maps = [gradcam(n, *args, head=head, layer=layer)[0] for n in model.ckpt.nets]
        out[head] = to_flair_grid(np.mean(maps, axis=0).astype(np.float32), mi.affine_ras, case.flair)
    return out
