"""Worker side of HE mode: public CKKS contexts only (it cannot decrypt), and no EHR values at all.

A worker loads each public context once per key id from ``MSGATE_HOME/keys/he/public/`` (checked
against the SHA-256 in its metadata, refused if it holds a secret key), evaluates packs with
:class:`msgate.model.he.Evaluator` for every member of the ensemble and MACs its result with the key's
result key. Image features (``z``, one per member) are plaintext here; the EHR input exists on this
host only as CKKS ciphertext, built by the key service from storage (:mod:`msgate.model.he_service`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from msgate.errors import ConfigError, KeyNotFound, TamperedData
from msgate.model import he
from msgate.model.he_keys import EncryptedPack, EncryptedResult, result_mac
from msgate.model.types import Case, ModelResult

if TYPE_CHECKING:
    import tenseal as ts

log = logging.getLogger(__name__)

READS_EHR = False
"""Read by the worker runtime: the case loader leaves the EHR alone (no snapshot, no field decryption)."""
PACK = 16  # cases per predict chunk; the key service packs them (bench/RESULTS.md)


class PublicKeyCache:
    """Public contexts by key id, loaded once (``load_seconds`` records the cold load)."""

    def __init__(self, public_dir: Path) -> None:
        self.dir = Path(public_dir)
        self._ctx: dict[str, tuple[ts.Context, he.HeParams, bytes]] = {}
        self.load_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, key_id: str) -> tuple[ts.Context, he.HeParams, bytes]:
        """(public context, parameters, result MAC key) of ``key_id``."""
        import tenseal as ts

        with self._lock:
            if key_id in self._ctx:
                return self._ctx[key_id]
            meta_path, ctx_path = self.dir / f"{key_id}.json", self.dir / f"{key_id}.ctx"
            if not meta_path.exists() or not ctx_path.exists():
                raise KeyNotFound(f"no public CKKS context for key {key_id!r} in {self.dir}")
            t0 = time.perf_counter()
            meta = json.loads(meta_path.read_text())
            blob = ctx_path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise TamperedData(f"public CKKS context {key_id} does not match its SHA-256", code="he_context")
            ctx = ts.context_from(blob)
            if ctx.is_private() or ctx.has_secret_key():
                raise ConfigError(f"CKKS context {key_id} holds a secret key; a worker must get the public one only")
            self.load_seconds[key_id] = time.perf_counter() - t0
            entry = (ctx, he.HeParams.from_dict(meta["params"]), base64.b64decode(meta["result_key"]))
            self._ctx[key_id] = entry
            return entry


class HeWorker:
    """Evaluates encrypted packs for one exported ensemble."""

    def __init__(self, model: he.HeModel, public_dir: Path) -> None:
        self.model = model
        self.keys = PublicKeyCache(public_dir)
        self._evaluators: dict[he.HeParams, he.Evaluator] = {}

    @classmethod
    def for_home(cls, model: he.HeModel, home: Path) -> HeWorker:
        return cls(model, Path(home) / "keys" / "he" / "public")

    def _evaluator(self, params: he.HeParams) -> he.Evaluator:
        if params not in self._evaluators:
            self._evaluators[params] = he.Evaluator(self.model, params)
        return self._evaluators[params]

    def evaluate(self, pack: EncryptedPack, z: np.ndarray) -> EncryptedResult:
        """Encrypted logits of a pack given its cases' image embeddings ``z`` [K, B, Z] (plaintext)."""
        import tenseal as ts

        ctx, params, result_key = self.keys.get(pack.key_id)
        lay = pack.layout
        zs = self.model.member_z(z)
        if zs.shape[1] != lay.batch or len(pack.case_ids) != lay.batch:
            raise ValueError(f"pack of {lay.batch} cases got {zs.shape[1]} image embeddings")
        if lay.n_features != self.model.n_features:
            raise ValueError("pack layout does not match this model (the EHR feature schema differs)")
        try:
            cts = [ts.ckks_vector_from(ctx, c) for c in pack.ciphertexts]
        except Exception:  # noqa: BLE001 - TenSEAL raises bare ValueError/RuntimeError on bad bytes
            raise TamperedData("HE input ciphertext does not parse", code="he_parse") from None
        outs = tuple(o.serialize() for o in self._evaluator(params).logits(lay, cts, zs))
        digests = tuple(hashlib.sha256(c).hexdigest() for c in pack.ciphertexts)
        tag = result_mac(result_key, request_id=pack.request_id, request_tag=pack.tag, digests=digests,
                         ciphertexts=outs)
        return EncryptedResult(pack.key_id, pack.request_id, pack.case_ids, lay, pack.tag, digests, outs, tag)

    def evaluate_wire(self, pack: dict[str, Any], z: list[list[list[float]]]) -> dict[str, Any]:
        """JSON in, JSON out."""
        return self.evaluate(EncryptedPack.from_wire(pack), np.asarray(z, np.float64)).to_wire()


# ---------------------------------------------------------------------------------------------------
# Worker model plug-in (the runtime picks it when ``MSGATE_HE__ENABLED`` is set): the same
# ``load_model`` / ``predict(cases, model)`` contract as ``msgate.model.predict``, with cases that
# carry no EHR (``Case.ehr is None``); the EHR-dependent outputs come from CKKS.


class KeyClient(Protocol):
    """What the worker needs from the key service: packs by job id, and the opened result."""

    def encrypt_jobs(self, job_ids: list[str], *, model: str, max_batch: int | None = None) -> list[EncryptedPack]: ...

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]: ...


@dataclass
class HePatientModel:
    """The plaintext patient model (its image side), the ensemble's HE export and the key client."""

    plain: Any  # msgate.model.predict.PatientModel
    worker: HeWorker
    keys: KeyClient
    fingerprint: str

    @property
    def version(self) -> str:
        return f"{self.plain.version}+he"


_LOADED: HePatientModel | None = None


def load_model(path: Path | str | None = None, *, home: Path | None = None, keys: KeyClient | None = None,
               plain: Any = None) -> HePatientModel:
    """Load the patient checkpoint, export every member's EHR branch and open the key client: by default
    the key service over the broker (the embedded transport too; ``serve --role all`` runs the keys role)."""
    global _LOADED
    from msgate.config import load_settings
    from msgate.model import predict as plain_predict
    from msgate.model.he_rpc import BrokerKeyClient
    from msgate.model.he_service import model_spec

    settings = load_settings()
    home = Path(home) if home is not None else settings.home
    pm = plain if plain is not None else plain_predict.load_model(path)
    model = HePatientModel(pm, HeWorker.for_home(he.export(pm.ckpt.nets), home), keys or BrokerKeyClient(settings),
                           model_spec(pm.ckpt).fingerprint)
    _LOADED = model
    return model


def warm_up() -> None:
    """Warm the image side on a toy volume (a full predict needs a job the key service can read)."""
    if _LOADED is None:
        return
    from msgate.model.types import Volume

    rng = np.random.default_rng(0)
    flair = Volume(rng.random((16, 32, 32), dtype=np.float32) * 100, np.diag([1.0, 1.0, 3.0, 1.0]), "FLAIR")
    try:
        _image_side(_LOADED, [Case("warm-up", {"FLAIR": flair}, None)])
    except Exception:  # a model that cannot run a toy case still serves real ones; the log says so
        log.warning("model warm-up failed", exc_info=True)


def predict(cases: list[Case], model: HePatientModel | None = None) -> list[ModelResult]:
    """``ModelResult`` per case with EDSS probabilities, EDSS estimate and P(MS) of the whole ensemble
    evaluated under CKKS; ``case_id`` must be the job id (the key service reads the job's EHR).

    Differences from the plaintext path, flagged ``he``: the uncertainty is the normalised entropy of
    the calibrated probabilities (MC dropout would need the plaintext EHR embedding), per-feature EHR
    contributions are left empty (they are functions of the plaintext values), Grad-CAM explains the
    image with the EHR input masked out, and the missing-EHR flags come from the scheduler's plan.
    """
    model = model or _LOADED or load_model()
    out: list[ModelResult] = []
    for s in range(0, len(cases), PACK):
        out.extend(_predict_pack(model, cases[s:s + PACK]))
    return out


def _image_side(model: HePatientModel, cases: list[Case]) -> tuple[list[Any], Any, Any, Any, np.ndarray]:
    """Lesions, model inputs, and the image embedding of every member ([K, B, Z]) — no EHR involved."""
    import torch

    from msgate.model.patient import checkpoint
    from msgate.model.patient.lesionsrc import lesion_features
    from msgate.model.patient.preprocess import prepare

    pm = model.plain
    preset = checkpoint.preset_from_meta(pm.ckpt.meta)
    prepared = []
    for case in cases:
        if "FLAIR" not in case.volumes:
            raise ValueError(f'Case "{case.case_id}" has no FLAIR volume; FLAIR is required.')
        les = pm.lesions(case.volumes)
        prepared.append((les, prepare(case.volumes, les.labels, preset),
                         lesion_features(les.findings, "QSM" in case.volumes)))
    image = torch.as_tensor(np.stack([p[1].image for p in prepared]))
    present = torch.as_tensor(np.stack([p[1].present for p in prepared]))
    lesion = torch.as_tensor(np.stack([p[2] for p in prepared]))
    with torch.no_grad():
        z = np.stack([n.eval().image_embedding(image, present, lesion).double().numpy() for n in pm.ckpt.nets])
    return prepared, image, present, lesion, z


def _outcomes(model: HePatientModel, ids: list[str], z: np.ndarray) -> dict[str, dict[str, Any]]:
    ck = model.plain.ckpt
    got: dict[str, dict[str, Any]] = {}
    for pack in model.keys.encrypt_jobs(ids, model=model.fingerprint, max_batch=len(ids)):
        rows = [ids.index(c) for c in pack.case_ids]
        for o in model.keys.finalize(model.worker.evaluate(pack, z[:, rows]), t_edss=ck.t_edss, t_ms=ck.t_ms):
            got[str(o["case_id"])] = o
    return got


def _heatmaps(model: HePatientModel, image: Any, present: Any, lesion: Any) -> np.ndarray | None:
    import torch

    from msgate.model.patient.explain import gradcam

    pm = model.plain
    if not pm.heatmaps or pm.ckpt.net.mode == "ehr":
        return None
    layer = str(pm.ckpt.meta["preset_config"]["gradcam_layer"])
    no_ehr = torch.zeros(image.shape[0], pm.ckpt.net.ehr.net[0].in_features)
    return np.mean([gradcam(n, image, present, lesion, no_ehr, "edss", layer) for n in pm.ckpt.nets], axis=0)


def _predict_pack(model: HePatientModel, cases: list[Case]) -> list[ModelResult]:
    from msgate.model.patient.calibration import normalised_entropy
    from msgate.model.patient.preprocess import to_flair_grid

    pm = model.plain
    prepared, image, present, lesion, z = _image_side(model, cases)
    ids = [c.case_id for c in cases]
    got = _outcomes(model, ids, z)
    probs = np.asarray([got[i]["edss_probabilities"] for i in ids])
    unc = normalised_entropy(probs)
    heat = _heatmaps(model, image, present, lesion)
    results = []
    for i, case in enumerate(cases):
        les, mi = prepared[i][0], prepared[i][1]
        conf = float(probs[i].max())
        flags = [f for f, role in (("qsm_absent", "QSM"), ("t1_absent", "T1")) if role not in case.volumes]
        if conf < pm.review_confidence or float(unc[i]) > pm.review_uncertainty:
            flags.append("review")
        results.append(ModelResult(
            case_id=case.case_id, model_name=pm.name, model_version=model.version,
            edss_probabilities=tuple(float(p) for p in probs[i]), edss_estimate=float(got[ids[i]]["edss"]),
            confidence=conf, uncertainty=float(unc[i]), p_ms=float(got[ids[i]]["p_ms"]), lesions=les.findings,
            lesion_mask=les.labels.astype(np.int16),
            heatmap=None if heat is None else to_flair_grid(heat[i], mi.affine_ras, case.flair),
            ehr_contributions={}, flags=(*flags, "he")))
    return results
