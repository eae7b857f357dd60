"""Worker-side HE evaluator: public CKKS contexts only (it cannot decrypt).

A worker loads each public context once per key id from ``MSGATE_HOME/keys/he/public/`` (checked
against the SHA-256 in its metadata, refused if it holds a secret key), evaluates packs with
:class:`msgate.model.he.Evaluator` and MACs its result with the key's result key. Image features
(``z``) are plaintext here; only the EHR input is encrypted.
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
    """Evaluates encrypted packs for one exported model."""

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
        """Encrypted logits of a pack given its cases' image embeddings ``z`` [B, Z] (plaintext)."""
        import tenseal as ts

        ctx, params, result_key = self.keys.get(pack.key_id)
        lay = pack.layout
        if z.shape[0] != lay.batch or len(pack.case_ids) != lay.batch:
            raise ValueError(f"pack of {lay.batch} cases got {z.shape[0]} image embeddings")
        if lay.n_features != self.model.n_features or lay.hidden != self.model.hidden:
            raise ValueError("pack layout does not match this model (feature schema or EHR width differs)")
        try:
            cts = [ts.ckks_vector_from(ctx, c) for c in pack.ciphertexts]
        except Exception:  # noqa: BLE001 - TenSEAL raises bare ValueError/RuntimeError on bad bytes
            raise TamperedData("HE input ciphertext does not parse", code="he_parse") from None
        outs = tuple(o.serialize() for o in self._evaluator(params).logits(lay, cts, np.asarray(z, np.float64)))
        digests = tuple(hashlib.sha256(c).hexdigest() for c in pack.ciphertexts)
        tag = result_mac(result_key, request_id=pack.request_id, request_tag=pack.tag, digests=digests,
                         ciphertexts=outs)
        return EncryptedResult(pack.key_id, pack.request_id, pack.case_ids, lay, pack.tag, digests, outs, tag)

    def evaluate_wire(self, pack: dict[str, Any], z: list[list[float]]) -> dict[str, Any]:
        """JSON in, JSON out (the Celery task body)."""
        return self.evaluate(EncryptedPack.from_wire(pack), np.asarray(z, np.float64)).to_wire()


# ---------------------------------------------------------------------------------------------------
# Worker model plug-in: ``MSGATE_WORKERS__MODEL_MODULE=msgate.model.he_worker`` (the runtime picks it
# when ``MSGATE_HE__ENABLED`` is set). Same ``load_model`` / ``predict(cases, model)`` contract as
# ``msgate.model.predict``; the image side is unchanged, the EHR-dependent outputs come from CKKS.


PACK = 16  # cases per CKKS pack: 6 input ciphertexts, 3 rotations (bench/RESULTS.md)


class KeyClient(Protocol):
    """What the worker needs from the key service (in process here; over the broker when split)."""

    def encrypt(self, u: np.ndarray, case_ids: list[str], *, max_batch: int | None = None) -> list[EncryptedPack]: ...

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]: ...


class BrokerKeyClient:
    """:class:`KeyClient` over the broker: the worker process never holds the CKKS secret key."""

    def __init__(self, settings: Any, *, timeout: float = 60.0) -> None:
        import uuid

        self.settings = settings
        self.timeout = timeout
        self.reply_to = f"msgate.he-reply.{uuid.uuid4().hex}"  # one reply queue per client (process)
        self._lock = threading.Lock()

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        import uuid

        from msgate.errors import Transient
        from msgate.model.he_keys import REQUEST_QUEUE, broker_connection

        corr = uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout
        with self._lock, broker_connection(self.settings) as conn, conn.SimpleQueue(self.reply_to) as replies:
            with conn.SimpleQueue(REQUEST_QUEUE) as q:
                q.put({**req, "corr": corr, "reply_to": self.reply_to})
            while True:  # a late answer to an earlier, timed-out call is dropped
                try:
                    msg = replies.get(block=True, timeout=max(0.1, deadline - time.monotonic()))
                except replies.Empty:
                    raise Transient(f"the HE key service did not answer within {self.timeout:.0f} s",
                                    code="he_timeout") from None
                msg.ack()
                body: dict[str, Any] = msg.payload
                if body.get("corr") == corr:
                    break
        if body.get("corr") != corr:
            raise TamperedData("HE key service reply does not match the request", code="he_corr")
        if "error" in body:
            code = str(body.get("code"))
            if code.startswith(("he_request_mac", "he_result_mac", "he_parse", "tampered")):
                raise TamperedData(str(body["error"]), code=code)
            from msgate.errors import Rejected

            raise Rejected(str(body["error"]), code=code)
        return body

    def encrypt(self, u: np.ndarray, case_ids: list[str], *, max_batch: int | None = None) -> list[EncryptedPack]:
        body = self._call({"op": "encrypt", "u": np.asarray(u, np.float64).tolist(), "case_ids": list(case_ids),
                           "max_batch": max_batch})
        return [EncryptedPack.from_wire(p) for p in body["packs"]]

    def encrypt_jobs(self, job_ids: list[str], *, max_batch: int | None = None) -> list[EncryptedPack]:
        """Packs built by the key service from storage: the worker sends job ids, never EHR values."""
        body = self._call({"op": "encrypt_jobs", "job_ids": list(job_ids), "max_batch": max_batch})
        return [EncryptedPack.from_wire(p) for p in body["packs"]]

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]:
        body = self._call({"op": "finalize", "result": res.to_wire(), "t_edss": t_edss, "t_ms": t_ms})
        return list(body["outcomes"])


@dataclass
class HePatientModel:
    """The plaintext patient model (image side), its HE export and the key client."""

    plain: Any  # msgate.model.predict.PatientModel
    worker: HeWorker
    keys: KeyClient

    @property
    def version(self) -> str:
        return f"{self.plain.version}+he"


def load_model(path: Path | str | None = None, *, home: Path | None = None, keys: KeyClient | None = None,
               plain: Any = None) -> HePatientModel:
    """Load the patient checkpoint, export its EHR branch and open the key client.

    Without ``keys``: with an external broker (``MSGATE_BROKER_URL``) the key service is reached over
    it (:class:`BrokerKeyClient`; the keys role answers). In embedded mode it runs in this process
    (``serve --role all``): it reads the wrapped secret from ``MSGATE_HOME/keys/he``.
    """
    from msgate.config import load_settings
    from msgate.model import predict as plain_predict
    from msgate.model.he_keys import HeKeys

    settings = load_settings()
    home = Path(home) if home is not None else settings.home
    pm = plain if plain is not None else plain_predict.load_model(path)
    if keys is None and settings.broker_url:
        keys = BrokerKeyClient(settings)
    if keys is None:
        from msgate.storage.store import load_or_create_ring

        hk = HeKeys(home, load_or_create_ring(settings, create=False))
        hk.ensure(settings.he.params())
        keys = hk
    return HePatientModel(pm, HeWorker.for_home(he.export(pm.ckpt.net), home), keys)


def predict(cases: list[Case], model: HePatientModel | None = None) -> list[ModelResult]:
    """``ModelResult`` per case with EDSS probabilities, EDSS estimate and P(MS) evaluated under CKKS.

    Differences from the plaintext path, flagged ``he``: the uncertainty is the normalised entropy of
    the calibrated probabilities (MC dropout would need the plaintext EHR embedding), per-feature EHR
    contributions are left empty (they are functions of the plaintext values), and Grad-CAM explains
    the image with the EHR input masked out.
    """
    model = model or load_model()
    out: list[ModelResult] = []
    cap = PACK
    for s in range(0, len(cases), cap):
        out.extend(_predict_pack(model, cases[s:s + cap]))
    return out


def _predict_pack(model: HePatientModel, cases: list[Case]) -> list[ModelResult]:
    import torch

    from msgate.model import predict as pp
    from msgate.model.patient.calibration import normalised_entropy
    from msgate.model.patient.explain import gradcam
    from msgate.model.patient.preprocess import to_flair_grid

    pm = model.plain
    net = pm.ckpt.net.eval()
    prepared = [pp._inputs(pm, c) for c in cases]
    image = torch.as_tensor(np.stack([p[1].image for p in prepared]))
    present = torch.as_tensor(np.stack([p[1].present for p in prepared]))
    lesion = torch.as_tensor(np.stack([p[3] for p in prepared]))
    u = np.stack([p[2] for p in prepared]).astype(np.float64)
    with torch.no_grad():
        z = net.image_embedding(image, present, lesion).double().numpy()
    ids = [c.case_id for c in cases]
    got: dict[str, dict[str, Any]] = {}
    by_job = getattr(model.keys, "encrypt_jobs", None)  # over the broker: the key service reads the EHR itself
    packs = by_job(ids, max_batch=len(ids)) if callable(by_job) else model.keys.encrypt(u, ids, max_batch=len(ids))
    for pack in packs:
        rows = [ids.index(c) for c in pack.case_ids]
        for o in model.keys.finalize(model.worker.evaluate(pack, z[rows]), t_edss=pm.ckpt.t_edss, t_ms=pm.ckpt.t_ms):
            got[str(o["case_id"])] = o
    probs = np.asarray([got[i]["edss_probabilities"] for i in ids])
    unc = normalised_entropy(probs)
    heat = None
    if pm.heatmaps and net.mode != "ehr":
        layer = str(pm.ckpt.meta["preset_config"]["gradcam_layer"])
        heat = gradcam(net, image, present, lesion, torch.zeros(len(cases), u.shape[1]), "edss", layer)
    results = []
    for i, case in enumerate(cases):
        les, mi = prepared[i][0], prepared[i][1]
        conf = float(probs[i].max())
        flags = (*pp._flags(case, conf, float(unc[i]), pm), "he")
        results.append(ModelResult(
            case_id=case.case_id, model_name=pm.name, model_version=model.version,
            edss_probabilities=tuple(float(p) for p in probs[i]),
            edss_estimate=float(np.clip(np.round(got[ids[i]]["edss"] * 2) / 2, 0.0, 9.5)),
            confidence=conf, uncertainty=float(unc[i]), p_ms=float(got[ids[i]]["p_ms"]), lesions=les.findings,
            lesion_mask=les.labels.astype(np.int16),
            heatmap=None if heat is None else to_flair_grid(heat[i], mi.affine_ras, case.flair),
            ehr_contributions={}, flags=flags))
    return results
