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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgate.errors import ConfigError, KeyNotFound, TamperedData
from msgate.model import he
from msgate.model.he_keys import EncryptedPack, EncryptedResult, result_mac

if TYPE_CHECKING:
    import tenseal as ts


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
