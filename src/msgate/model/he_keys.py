"""The CKKS keys (trusted side): key files, public contexts, encrypt + MAC, verify + decrypt + softmax.

The key service role that uses them (EHR from storage, the RPC over the broker) is
:mod:`msgate.model.he_service`; the RPC itself is :mod:`msgate.model.he_rpc`.

Files under ``MSGATE_HOME/keys/he/`` (folder 0700):

- ``<key_id>.secret`` (0600): the serialized *private* TenSEAL context and the request MAC key,
  AES-256-GCM encrypted with a fresh data key that is wrapped by the active KEK of msgate's key ring
  (:func:`msgate.storage.crypto.wrap_key`; ``msgate keys rotate`` re-wraps KEKs, not this file's body).
- ``public/<key_id>.ctx`` and ``public/<key_id>.json``: the public context (public key, relinearisation
  and Galois keys, no secret key) and its metadata (parameters, SHA-256, the *result* MAC key).
  Workers read only ``public/`` and cache each context by key id.
- ``active``: the key id new requests use. Rotation makes a new key active and keeps the old ones for
  results still in flight until :meth:`HeKeys.retire`.

Authentication (CKKS itself gives none). A request carries ``tag = HMAC(mac_key, key id, request id,
case ids, layout, SHA-256 of every input ciphertext)``; the worker echoes the tag and the digests of
the ciphertexts it actually used, and MACs its result with the result key. :meth:`HeKeys.open_result`
recomputes both before it decrypts, so an altered, truncated, reordered or swapped ciphertext (or a
result for another request) fails with :class:`~msgate.errors.TamperedData`, never garbage. The
result key is held by workers: it protects the way back against the broker and the network, not
against a malicious worker (HE gives confidentiality, not verifiable computation; docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msgate.errors import ConfigError, KeyNotFound, MsgateError, TamperedData
from msgate.model import he

if TYPE_CHECKING:
    import tenseal as ts

    from msgate.storage.keyring import KeyRing

log = logging.getLogger(__name__)
KIND = "he-ckks"
MAX_OPENED = 1 << 20
"""Request ids remembered as decrypted (a few tens of MB); far more than the requests in flight."""
PROB_DECIMALS = 4
"""Decimals of the probabilities the key service hands back (see :meth:`HeKeys.finalize`)."""
KEY_ID = re.compile(r"he-[0-9]{14}-[0-9a-f]{8}")
"""The shape of the key ids :meth:`HeKeys.generate` makes; an operator's id is checked against it before
it names a file (``keys he retire ../keyring`` must not reach outside the folder)."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class EncryptedPack:
    """One pack of cases under CKKS, as sent to a worker."""

    key_id: str
    request_id: str
    case_ids: tuple[str, ...]
    layout: he.Layout
    ciphertexts: tuple[bytes, ...] = field(repr=False)
    tag: bytes = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready (the Celery JSON serializer)."""
        return {"key_id": self.key_id, "request_id": self.request_id, "case_ids": list(self.case_ids),
                "layout": self.layout.to_dict(), "ciphertexts": [_b64(c) for c in self.ciphertexts],
                "tag": _b64(self.tag)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> EncryptedPack:
        return cls(str(d["key_id"]), str(d["request_id"]), tuple(d["case_ids"]), he.Layout.from_dict(d["layout"]),
                   tuple(base64.b64decode(c) for c in d["ciphertexts"]), base64.b64decode(d["tag"]))


@dataclass(frozen=True)
class EncryptedResult:
    """The worker's answer: encrypted lane-wise logits bound to the request it answers."""

    key_id: str
    request_id: str
    case_ids: tuple[str, ...]
    layout: he.Layout
    request_tag: bytes = field(repr=False)
    input_digests: tuple[str, ...]
    ciphertexts: tuple[bytes, ...] = field(repr=False)  # one per output (logit)
    tag: bytes = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)

    def to_wire(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "request_id": self.request_id, "case_ids": list(self.case_ids),
                "layout": self.layout.to_dict(), "request_tag": _b64(self.request_tag),
                "input_digests": list(self.input_digests), "ciphertexts": [_b64(c) for c in self.ciphertexts],
                "tag": _b64(self.tag)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> EncryptedResult:
        return cls(str(d["key_id"]), str(d["request_id"]), tuple(d["case_ids"]), he.Layout.from_dict(d["layout"]),
                   base64.b64decode(d["request_tag"]), tuple(d["input_digests"]),
                   tuple(base64.b64decode(c) for c in d["ciphertexts"]), base64.b64decode(d["tag"]))


def request_mac(mac_key: bytes, *, key_id: str, request_id: str, case_ids: tuple[str, ...], layout: he.Layout,
                digests: tuple[str, ...]) -> bytes:
    msg = json.dumps(["msgate-he-req-v1", key_id, request_id, list(case_ids), layout.to_dict(), list(digests)],
                     sort_keys=True).encode()
    return hmac.new(mac_key, msg, hashlib.sha256).digest()


def result_mac(result_key: bytes, *, request_id: str, request_tag: bytes, digests: tuple[str, ...],
               ciphertexts: tuple[bytes, ...]) -> bytes:
    msg = json.dumps(["msgate-he-res-v1", request_id, _b64(request_tag), list(digests),
                      [_sha(c) for c in ciphertexts]]).encode()
    return hmac.new(result_key, msg, hashlib.sha256).digest()


def result_key_of(mac_key: bytes) -> bytes:
    """The result MAC key handed to workers (derived; it cannot forge requests)."""
    return hmac.new(mac_key, b"msgate-he-result-key-v1", hashlib.sha256).digest()


@dataclass
class _Secret:
    ctx: ts.Context
    mac_key: bytes = field(repr=False)


class HeKeys:
    """Key generation, rotation, encryption and decryption; one per key-service process."""

    def __init__(self, home: Path, ring: KeyRing | None = None) -> None:
        self.dir = Path(home) / "keys" / "he"
        self.public_dir = self.dir / "public"
        self.ring = ring
        self._secrets: dict[str, _Secret] = {}
        self._lock = threading.Lock()
        self._opened: OrderedDict[str, None] = OrderedDict()  # request ids already decrypted (newest last)
        self._in_use: str | None = None  # the active key id of the last request (see _note_active)

    # -- keys -----------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.public_dir.mkdir(exist_ok=True)

    def generate(self, params: he.HeParams) -> str:
        """Create a key pair, store it (secret wrapped, 0600; public beside it) and make it active."""
        from msgate.storage import crypto

        params.check()
        self._prepare()
        key_id = f"he-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        ctx = he.make_context(params)
        mac_key = secrets.token_bytes(32)
        body = json.dumps({"context": _b64(ctx.serialize(save_secret_key=True)), "mac_key": _b64(mac_key)}).encode()
        if self.ring is not None:
            dek, wrapped = crypto.new_data_key(self.ring, blob_id=key_id, kind=KIND)
            doc = {"format": "msgate-he-secret-v1", "kek_id": wrapped.kek_id, "wrapped_dek": _b64(wrapped.wrapped),
                   "body": _b64(crypto.encrypt_bytes(dek, body, blob_id=key_id, kind=KIND))}
        else:
            doc = {"format": "msgate-he-secret-v1", "kek_id": None, "body": _b64(body)}
        _write_private(self.dir / f"{key_id}.secret", json.dumps(doc).encode())
        pub = ctx.copy()
        pub.make_context_public()
        pub_bytes = pub.serialize()
        _write_public(self.public_dir / f"{key_id}.ctx", pub_bytes)
        meta = {"key_id": key_id, "params": params.to_dict(), "sha256": _sha(pub_bytes), "bytes": len(pub_bytes),
                "created": time.time(), "result_key": _b64(result_key_of(mac_key))}
        _write_public(self.public_dir / f"{key_id}.json", json.dumps(meta, indent=1).encode())
        with self._lock:
            self._secrets[key_id] = _Secret(ctx, mac_key)
        _write_public(self.dir / "active", key_id.encode())
        with self._lock:
            self._in_use = key_id
        log.info("CKKS key generated", extra={"key_id": key_id, "bytes": len(pub_bytes)})
        return key_id

    rotate = generate  # a new key becomes active; older ones stay readable until retired

    def key_ids(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.secret")) if self.dir.exists() else []

    def active_id(self) -> str | None:
        p = self.dir / "active"
        return p.read_text().strip() if p.exists() else None

    def known_ids(self) -> list[str]:
        """Every key id with a file here: a secret (the key service's folder) or only a public context
        (a worker's volume), so that ``keys he list`` shows both and ``keys he retire`` can clean either."""
        found = set(self.key_ids())
        if self.public_dir.exists():
            found |= {p.stem for p in self.public_dir.glob("*.json")} | {p.stem for p in self.public_dir.glob("*.ctx")}
        return sorted(k for k in found if KEY_ID.fullmatch(k))

    def describe(self, key_id: str) -> dict[str, Any]:
        """What an operator may see of a key (``keys he list``): its CKKS parameters, creation time, the
        KEK that wraps its secret file, the public context's SHA-256 and size, and which files exist.
        Never secret material: not the secret context, not the request MAC key and not the result key
        (the public metadata holds the latter; it is left out here)."""
        meta_path, secret_path = self.public_dir / f"{key_id}.json", self.dir / f"{key_id}.secret"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        out: dict[str, Any] = {
            "key_id": key_id, "active": key_id == self.active_id(), "params": meta.get("params"),
            "created": meta.get("created"), "public_sha256": meta.get("sha256"), "public_bytes": meta.get("bytes"),
            "secret_file": secret_path.exists(), "public_file": (self.public_dir / f"{key_id}.ctx").exists(),
            "kek_id": None, "wrapped": None}
        if out["secret_file"]:
            doc = json.loads(secret_path.read_bytes())  # the envelope only: its body stays encrypted
            out["kek_id"], out["wrapped"] = doc.get("kek_id"), bool(doc.get("kek_id"))
        return out

    def params_of(self, key_id: str) -> he.HeParams:
        meta = json.loads((self.public_dir / f"{key_id}.json").read_text())
        return he.HeParams.from_dict(meta["params"])

    def ensure(self, params: he.HeParams) -> str:
        """The active key id; generates one when there is none or its parameters differ (rotation)."""
        active = self.active_id()
        if active is None or active not in self.key_ids() or self.params_of(active) != params:
            return self.generate(params)
        with self._lock:
            self._in_use = active  # the key this process starts with: a later rotation is a change (_note_active)
        return active

    def kek_usage(self) -> dict[str, int]:
        """How many CKKS secret key files each key-ring KEK wraps (``keys retire`` must not drop one)."""
        usage: dict[str, int] = {}
        for path in sorted(self.dir.glob("*.secret")) if self.dir.exists() else []:
            kek_id = json.loads(path.read_bytes()).get("kek_id")
            if kek_id:
                usage[kek_id] = usage.get(kek_id, 0) + 1
        return usage

    def rewrap(self) -> int:
        """Re-wrap every secret key file's data key under the ring's active KEK (``keys rotate``); the
        secret itself is not re-encrypted. Returns how many files changed."""
        from msgate.storage import crypto

        if self.ring is None:
            return 0
        done = 0
        for path in sorted(self.dir.glob("*.secret")) if self.dir.exists() else []:
            doc = json.loads(path.read_bytes())
            if not doc.get("kek_id") or doc["kek_id"] == self.ring.active_id:
                continue
            key_id = path.stem
            dek = crypto.unwrap_key(self.ring, crypto.WrappedKey(doc["kek_id"], base64.b64decode(doc["wrapped_dek"])),
                                    blob_id=key_id, kind=KIND)
            wrapped = crypto.wrap_key(self.ring.active, dek, blob_id=key_id, kind=KIND)
            doc["kek_id"], doc["wrapped_dek"] = wrapped.kek_id, _b64(wrapped.wrapped)
            _write_private(path, json.dumps(doc).encode())
            done += 1
        return done

    def check_retirable(self, key_id: str) -> None:
        """A key this folder holds (the id is never joined into a path otherwise) that is not the active one."""
        if key_id not in self.known_ids():
            raise KeyNotFound(f"no CKKS key {key_id!r} in {self.dir}; `msgate keys he list` shows the key ids")
        if key_id == self.active_id():
            raise ConfigError(f"{key_id} is the active CKKS key; run `msgate keys he rotate` first, then retire it")

    def retire(self, key_id: str) -> None:
        self.check_retirable(key_id)
        for p in (self.dir / f"{key_id}.secret", self.public_dir / f"{key_id}.ctx", self.public_dir / f"{key_id}.json"):
            p.unlink(missing_ok=True)
        self._secrets.pop(key_id, None)

    def open_secret(self, key_id: str) -> None:
        """Open (and cache) the secret of ``key_id`` now. The keys role calls it before it reports ready:
        it used to open the file at the first request, so a secret it cannot read (mode 0644 after a
        restore, a retired KEK) failed every job as a model error and its own message reached no log.
        Raises :class:`~msgate.errors.KeyFilePermissions`, :class:`~msgate.errors.KeyNotFound`,
        :class:`~msgate.errors.WrongKey` or :class:`~msgate.errors.ConfigError` (a damaged file)."""
        try:
            self._secret(key_id)
        except MsgateError:
            raise
        except Exception as exc:  # not JSON, a field missing, not base64, a context TenSEAL cannot read
            raise ConfigError(f"CKKS secret key file {self.dir / (key_id + '.secret')} is damaged "
                              f"({type(exc).__name__}); restore it from the backup") from None

    def _secret(self, key_id: str) -> _Secret:
        import tenseal as ts

        from msgate.storage import crypto, keyring

        with self._lock:
            if key_id in self._secrets:
                return self._secrets[key_id]
        path = self.dir / f"{key_id}.secret"
        if not path.exists():
            raise KeyNotFound(f"CKKS key {key_id!r} is not in {self.dir}; it was retired or never made here")
        keyring.check_permissions(path)
        doc = json.loads(path.read_bytes())
        body = base64.b64decode(doc["body"])
        if doc.get("kek_id"):
            if self.ring is None:
                raise ConfigError(f"CKKS key {key_id} is wrapped by the key ring; open the store first")
            dek = crypto.unwrap_key(self.ring, crypto.WrappedKey(doc["kek_id"], base64.b64decode(doc["wrapped_dek"])),
                                    blob_id=key_id, kind=KIND)
            body = crypto.decrypt_bytes(dek, body, blob_id=key_id, kind=KIND)
        inner = json.loads(body)
        sec = _Secret(ts.context_from(base64.b64decode(inner["context"])), base64.b64decode(inner["mac_key"]))
        with self._lock:
            self._secrets[key_id] = sec
        return sec

    # -- requests and results -------------------------------------------------------------------------

    def encrypt(self, u: np.ndarray, case_ids: list[str], *, widths: Sequence[int], key_id: str | None = None,
                max_batch: int | None = None, width: int | None = None) -> list[EncryptedPack]:
        """Encrypt model EHR inputs ``u`` [B, 2 * n_columns] (standardised on this side) into MACed packs
        of at most ``max_batch`` cases, for an ensemble whose members have ``widths`` hidden units (the
        lane-group width of each pack is chosen by cost, :func:`msgate.model.he.choose_width`, unless
        ``width`` fixes it: the benchmark)."""
        import tenseal as ts

        if not key_id:
            key_id = self.active_for_request()
        sec = self._secret(key_id)
        params = self.params_of(key_id)
        x = he.with_bias(np.asarray(u, np.float64))
        if len(case_ids) != len(x):
            raise ValueError("one case id per input row")
        cap = min(he.max_pack(max(widths), params.slots), max_batch or len(x) or 1)
        packs = []
        for s in range(0, len(x), cap):
            xb, ids = x[s:s + cap], tuple(case_ids[s:s + cap])
            lanes = width or he.choose_width(len(xb), widths, x.shape[1], params.slots)
            lay = he.make_layout(len(xb), x.shape[1], lanes, params.slots)
            cts = tuple(ts.ckks_vector(sec.ctx, v).serialize() for v in he.pack_inputs(lay, xb))
            rid = secrets.token_hex(12)
            tag = request_mac(sec.mac_key, key_id=key_id, request_id=rid, case_ids=ids, layout=lay,
                              digests=tuple(_sha(c) for c in cts))
            packs.append(EncryptedPack(key_id, rid, ids, lay, cts, tag))
        return packs

    def active_for_request(self) -> str:
        """The active key id for a new request, read once per request (its audit and its packs must name the
        same key), noting a change since the last request (:meth:`_note_active`)."""
        key_id = self.active_id()
        if key_id is None:
            raise ConfigError("no CKKS key; start the keys role or run HeKeys.generate")
        self._note_active(key_id)
        return key_id

    def _note_active(self, key_id: str) -> None:
        """A running key service reads ``active`` at every request, so ``msgate keys he rotate`` (another
        process) takes effect at the next one without a restart. When the active key changed since the
        last request: say so in the log, and open the new secret now, so a secret this process cannot
        read is logged by name here rather than only failing the jobs."""
        with self._lock:
            previous, self._in_use = self._in_use, key_id
        if previous is None or previous == key_id:
            return
        try:
            self.open_secret(key_id)
        except MsgateError as exc:
            log.error("CKKS secret key of the new active key cannot be opened",
                      extra={"role": "keys", "key_id": key_id, "code": exc.code, "reason": str(exc)})
            with self._lock:
                self._in_use = previous  # noticed again (and logged again) at the next request
            raise
        log.info("CKKS active key changed; new requests use it", extra={"role": "keys", "key_id": key_id})

    def open_result(self, res: EncryptedResult) -> np.ndarray:
        """Verify both MACs, decrypt and return the logits [B, n_out]; :class:`TamperedData` otherwise."""
        import tenseal as ts

        sec = self._secret(res.key_id)
        want = request_mac(sec.mac_key, key_id=res.key_id, request_id=res.request_id, case_ids=res.case_ids,
                           layout=res.layout, digests=res.input_digests)
        if not hmac.compare_digest(want, res.request_tag):
            raise TamperedData("HE result answers inputs this key service did not send (altered or swapped "
                               "ciphertext, case list or layout)", code="he_request_mac")
        rtag = result_mac(result_key_of(sec.mac_key), request_id=res.request_id, request_tag=res.request_tag,
                          digests=res.input_digests, ciphertexts=res.ciphertexts)
        if not hmac.compare_digest(rtag, res.tag):
            raise TamperedData("HE result ciphertext failed its MAC (altered in transit)", code="he_result_mac")
        try:
            vecs = [ts.ckks_vector_from(sec.ctx, c) for c in res.ciphertexts]
        except Exception:  # noqa: BLE001 - TenSEAL raises bare ValueError/RuntimeError on bad bytes
            raise TamperedData("HE result ciphertext does not parse", code="he_parse") from None
        return he.unpack_outputs(res.layout, [v.decrypt() for v in vecs])

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]:
        """Decrypt and calibrate: per case EDSS probabilities (softmax / T), EDSS estimate, P(MS).

        Only rounded values leave (probabilities to :data:`PROB_DECIMALS` decimals, the EDSS estimate
        to its 0.5 steps): the noise in a raw CKKS decryption can leak the secret key (CKKS is not
        IND-CPA-D; Li and Micciancio 2021), and the rounding step is far above that noise."""
        from msgate.model.patient.calibration import sigmoid, softmax

        logits = self.open_result(res)
        with self._lock:  # one answer per request: a worker cannot query the key service repeatedly
            if res.request_id in self._opened:
                raise TamperedData("this HE request was already decrypted once", code="he_replay")
            self._opened[res.request_id] = None
            while len(self._opened) > MAX_OPENED:
                self._opened.popitem(last=False)
        probs = np.round(softmax(logits[:, :4], t_edss), PROB_DECIMALS)
        p_ms = np.round(sigmoid(logits[:, 5], t_ms), PROB_DECIMALS)
        edss = np.clip(np.round(logits[:, 4] * 2) / 2, 0.0, 9.5)
        return [{"case_id": cid, "edss_probabilities": [float(p) for p in probs[i]],
                 "edss": float(edss[i]), "p_ms": float(p_ms[i]), "key_id": res.key_id}
                for i, cid in enumerate(res.case_ids)]
