"""Equivalence of the encrypted path with the plaintext ensemble (``msgate evaluate --he``).

Both paths see the same cases: the plaintext path is the torch ensemble as ``predict`` runs it (each
member's ``fusion(z_m, ehr_embedding(u))``, averaged); the HE path is the production code end to end
(key service encrypt + MAC -> worker with the public context only -> key service verify, decrypt,
softmax and temperature). Inputs, by preference: a held-out synthetic cohort cache
(``patient.synthdata.build_cache``: simulated MRI through the lesion model, and the EHR), or EHR drawn
from the synthetic cohort generator with the members' image embeddings of noise volumes (cheap; the
HE path is exact in ``z``, which is plaintext on both sides), or random inputs for an untrained net.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgate.model.he.circuit import Array, HeModel, export

if TYPE_CHECKING:
    from msgate.model.he_keys import HeKeys
    from msgate.model.patient.network import PatientNet

LIMIT_DPROB = 1e-3


def random_model(seed: int = 0, members: int = 1) -> tuple[list[PatientNet], HeModel]:
    """Randomly initialised multimodal ``PatientNet`` members (tiny preset) and their export: the HE
    math check without a trained checkpoint."""
    import torch

    from msgate.model.patient.network import PatientNet
    from msgate.model.patient.presets import get_preset

    torch.manual_seed(seed)
    nets = [PatientNet(get_preset("tiny")).eval() for _ in range(members)]
    return nets, export(nets)


def synthetic_inputs(n: int, model: HeModel, seed: int = 1) -> tuple[Array, Array]:
    """Random standardised EHR inputs with missingness ([values, mask]) and image embeddings [K, n, Z]."""
    rng = np.random.default_rng(seed)
    cols = model.n_columns
    mask = (rng.random((n, cols)) > 0.2).astype(np.float64)
    vals = np.clip(rng.normal(size=(n, cols)), -5, 5) * mask
    z = np.maximum(rng.normal(size=(model.n_members, n, model.z_dim)), 0.0)  # image_mlp ends in ReLU
    return np.concatenate([vals, mask], axis=1), z


def torch_logits(nets: list[PatientNet], u: Array, z: Array) -> Array:
    """The plaintext ensemble (float32 torch, as ``predict``): mean over members of the fusion output."""
    import torch

    ut = torch.as_tensor(u, dtype=torch.float32)
    with torch.no_grad():
        outs = [n.fusion(torch.as_tensor(zm, dtype=torch.float32), n.ehr_embedding(ut)).double().numpy()
                for n, zm in zip(nets, np.asarray(z), strict=True)]
    return np.mean(outs, axis=0)  # type: ignore[no-any-return]


def _embeddings(nets: list[PatientNet], image: Array, present: Array, lesion: Array) -> Array:
    import torch

    out = []
    with torch.no_grad():
        for n in nets:
            zs = [n.image_embedding(torch.as_tensor(image[s:s + 16], dtype=torch.float32),
                                    torch.as_tensor(present[s:s + 16], dtype=torch.float32),
                                    torch.as_tensor(lesion[s:s + 16], dtype=torch.float32)).double().numpy()
                  for s in range(0, len(image), 16)]
            out.append(np.concatenate(zs))
    return np.stack(out)


def cohort_inputs(nets: list[PatientNet], path: Path, scaler: Any, n: int | None = None) -> tuple[Array, Array]:
    """``(u, z)`` of the first ``n`` cases (all without ``n``) of a held-out cohort cache: EHR standardised
    with ``scaler``, members' image embeddings."""
    with np.load(path) as d:
        u = scaler.transform(d["ehr_x"][:n], d["ehr_m"][:n]).astype(np.float64)
        z = _embeddings(nets, d["image"][:n], d["present"][:n], d["lesion"][:n])
    return u, z


def generator_inputs(nets: list[PatientNet], scaler: Any, n: int, seed: int, grid: tuple[int, ...]) -> tuple[Array, Array]:
    """EHR of ``n`` subjects from the synthetic cohort generator (70 % MS, missing rate 0.1), and the
    members' image embeddings of noise volumes on the model grid."""
    from datetime import date

    from msgate.model.patient.ehr import ehr_vector, raw_columns
    from msgate.model.patient.lesionsrc import LESION_FEATURES
    from msgate.model.synth.ehr import sample_ehr
    from msgate.model.synth.latent import sample_latent

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        lat = sample_latent("ms" if rng.random() < 0.7 else "csvd", rng)
        obs = sample_ehr(lat, date(2026, 6, 1), 0.1, rng)
        x, m = raw_columns(ehr_vector({o.name: o.value for o in obs}))
        rows.append(scaler.transform(x, m))
    image = np.abs(rng.normal(size=(n, 4, *grid))).astype(np.float32)
    present = (rng.random((n, 2)) > 0.3).astype(np.float32)
    lesion = np.abs(rng.normal(size=(n, len(LESION_FEATURES)))).astype(np.float32)
    return np.stack(rows).astype(np.float64), _embeddings(nets, image, present, lesion)


def he_logits(model: HeModel, u: Array, z: Array, *, batch: int, t_edss: float = 1.0, t_ms: float = 1.0,
              keys: HeKeys | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Outcomes per case id through the production key service and worker (``keys``, or a fresh key in
    a temporary home)."""
    if keys is None:
        from msgate.model.he.params import HeParams
        from msgate.model.he_keys import HeKeys
        from msgate.storage import keyring

        with tempfile.TemporaryDirectory(prefix="msgate-he-eq-") as tmp:
            fresh = HeKeys(Path(tmp), keyring.init(Path(tmp) / "keys" / "keyring.json"))
            fresh.generate(HeParams())
            return he_logits(model, u, z, batch=batch, t_edss=t_edss, t_ms=t_ms, keys=fresh)
    from msgate.model.he_worker import HeWorker

    ids = [f"case-{i}" for i in range(len(u))]
    got: dict[str, dict[str, Any]] = {}
    stats = {"packs": 0, "bytes_in": 0, "bytes_out": 0}
    worker, zs = HeWorker(model, keys.public_dir), model.member_z(z)
    for pack in keys.encrypt(u, ids, widths=model.widths, max_batch=batch):
        rows = [ids.index(c) for c in pack.case_ids]
        res = worker.evaluate(pack, zs[:, rows])
        stats["packs"] += 1
        stats["bytes_in"] += pack.nbytes
        stats["bytes_out"] += res.nbytes
        raw = keys.open_result(res)  # unrounded logits, for the report only (finalize rounds)
        for i, out in enumerate(keys.finalize(res, t_edss=t_edss, t_ms=t_ms)):
            got[str(out["case_id"])] = {**out, "logits": raw[i].tolist()}
    return got, stats


def compare(*, checkpoint: str | Path | None = None, n: int | None = None, batch: int = 16, data: Path | None = None,
            inputs: str = "generator", seed: int = 2026, random_members: int = 3,
            keys: HeKeys | None = None) -> dict[str, Any]:
    """Run the cases through the plaintext ensemble and the HE path; the equivalence numbers.

    ``inputs``: "cohort" (``data``, a cache file), "generator" or "random". ``n`` cases: by default the
    whole cache, or 200 generated ones. Without a checkpoint file the model is a randomly initialised
    ensemble of ``random_members`` members."""
    from msgate.model.patient import checkpoint as ck
    from msgate.model.patient.calibration import sigmoid, softmax

    path = Path(checkpoint) if checkpoint is not None else ck.DEFAULT_PATH
    if path.is_file():
        loaded = ck.load(path)
        nets, scaler, t_edss, t_ms = loaded.nets, loaded.scaler, loaded.t_edss, loaded.t_ms
        grid, model = tuple(ck.preset_from_meta(loaded.meta).grid), export(loaded.nets)
        source = f"checkpoint {path.name} ({len(nets)} members)"
    else:
        from msgate.model.patient.ehr import N_COLUMNS, EhrScaler
        from msgate.model.patient.presets import get_preset

        nets, model = random_model(seed=11, members=random_members)
        scaler = EhrScaler(np.zeros(N_COLUMNS, np.float32), np.ones(N_COLUMNS, np.float32))
        t_edss = t_ms = 1.0
        grid, source = tuple(get_preset("tiny").grid), f"randomly initialised PatientNet x{random_members}"
    count = 200 if n is None else n
    if data is not None:
        u, z = cohort_inputs(nets, data, scaler, n)
        source += f"; first {len(u)} cases of held-out cohort cache {data}"
    elif inputs == "generator":
        u, z = generator_inputs(nets, scaler, count, seed, grid)
        source += f"; EHR of {count} subjects of the synthetic cohort generator (seed {seed}), noise-image embeddings"
    else:
        u, z = synthetic_inputs(count, model, seed)
        source += f"; {count} random inputs (seed {seed})"
    t0 = time.perf_counter()
    got, stats = he_logits(model, u, z, batch=batch, t_edss=t_edss, t_ms=t_ms, keys=keys)
    elapsed = time.perf_counter() - t0
    ids = [f"case-{i}" for i in range(len(u))]
    plain = torch_logits(nets, u, z)
    p_plain, ms_plain = softmax(plain[:, :4], t_edss), sigmoid(plain[:, 5], t_ms)
    p_he = np.asarray([got[i]["edss_probabilities"] for i in ids])
    ms_he = np.asarray([got[i]["p_ms"] for i in ids])
    edss_he = np.asarray([got[i]["edss"] for i in ids])
    return {"source": source, "members": model.n_members, "cases": len(u), "batch": batch, **stats,
            "same_class": float(np.mean(p_plain.argmax(1) == p_he.argmax(1))),
            "same_diagnosis": float(np.mean((ms_plain >= 0.5) == (ms_he >= 0.5))),
            "max_abs_dprob_edss": float(np.abs(p_plain - p_he).max()),
            "max_abs_dprob_ms": float(np.abs(ms_plain - ms_he).max()),
            "max_abs_dlogit": float(np.abs(plain - np.asarray([got[i]["logits"] for i in ids])).max()),
            "same_edss_estimate": float(np.mean(np.clip(np.round(plain[:, 4] * 2) / 2, 0.0, 9.5) == edss_he)),
            "max_abs_logit": float(np.abs(plain).max()), "seconds": round(elapsed, 2)}


def passed(report: dict[str, Any]) -> bool:
    """100 % same class and max |delta probability| within :data:`LIMIT_DPROB`."""
    return bool(report["same_class"] == 1.0
                and max(report["max_abs_dprob_edss"], report["max_abs_dprob_ms"]) <= LIMIT_DPROB)


def held_out_cache(*, cache_dir: Path, seed: int, n: int, checkpoint: str | Path | None = None) -> Path:
    """The held-out synthetic cohort cache (simulated MRI of cohort ``seed``, a seed no training used)
    for ``msgate evaluate --he``; built once with the checkpoint's preset and lesion source, then reused."""
    from msgate.model.patient import checkpoint as ck
    from msgate.model.patient.synthdata import build_cache

    meta = ck.load(checkpoint).meta
    path = cache_dir / f"he-test-s{seed}-n{n}-{meta.get('lesion_source', 'heuristic')}.npz"
    if not path.is_file():
        build_cache(path, seed, n, str(meta["preset"]), lesion_kind=str(meta.get("lesion_source", "heuristic")))
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """``he-equivalence.json`` in ``out_dir`` (the numbers, the inputs, pass or fail)."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "he-equivalence.json"
    path.write_text(json.dumps({**report, "passed": passed(report), "limit_dprob": LIMIT_DPROB}, indent=2) + "\n")
    return path
