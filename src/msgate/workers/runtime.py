"""Per-process worker state: the store, the model (loaded once, after any fork) and the device.

The model module (``workers.model_module``, default ``msgate.model.predict``) provides
``load_model()`` and ``predict(cases) -> list[ModelResult]``; optionally ``preprocess(case) -> case``
(the MONAI transforms, timed separately), ``MODEL_VERSION``/``model_version()`` and ``MODEL_NAME``.
``load_model`` gets ``device=`` when its signature takes it; ``READS_EHR = False`` keeps the case
loader off the EHR (as HE mode always does). CUDA is used when available, else CPU. ``cuda:N`` is
resolved by the worker role (:func:`msgate.workers.worker.child_devices`): it serves that GPU from a
child that sees only it, whose Runtime gets ``cuda``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from msgate.config import Settings
from msgate.errors import Rejected
from msgate.model.types import Case, ModelResult
from msgate.storage.store import Store, open_store

log = logging.getLogger(__name__)
UNVERSIONED = "unversioned"


def resolve_device(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def import_model_module(settings: Settings) -> ModuleType:
    name = settings.workers.model_module
    if settings.he.enabled and name == "msgate.model.predict":
        name = "msgate.model.he_worker"  # HE mode (issue 11): EHR outputs evaluated under CKKS
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise Rejected(f"model module {name} is not installed", code="no_model") from None
        raise


def declared_version(module: ModuleType) -> str | None:
    """A version the module states without loading weights (``model_version()`` or ``MODEL_VERSION``)."""
    fn = getattr(module, "model_version", None)
    version = fn() if callable(fn) else getattr(module, "MODEL_VERSION", None)
    return None if version is None else str(version)[:64]


def _declared(settings: Settings) -> tuple[Any, str | None]:
    """The model module (None when it cannot be imported) and the version it declares, if any."""
    try:
        module = import_model_module(settings)
    except Rejected:
        return None, None
    return module, declared_version(module)


def model_version(settings: Settings, *, fresh: bool = False) -> str:
    """The model version for idempotency keys; loads the model (once per process) if it must, or, with
    ``fresh``, once more in a Runtime of its own on the CPU (the checkpoint was replaced; a worker in the
    same process keeps the model it loaded)."""
    module, declared = _declared(settings)
    if module is None:
        return UNVERSIONED
    if declared is not None:
        return declared
    if fresh:
        cpu = settings.model_copy(update={"workers": settings.workers.model_copy(update={"device": "cpu"})})
        return Runtime(cpu).loaded_version()
    return get(settings).loaded_version()


def version_stamp(settings: Settings) -> tuple[object, ...] | None:
    """A cheap fingerprint of the model version, for the scheduler to re-read it on every scan: the
    declared version itself, else the size and mtime of the checkpoint files (the module's
    ``CHECKPOINT_FILES``; for the shipped model, the patient checkpoint and its JSON sidecar). None when
    neither is known (the loaded version is then read once per process, as before)."""
    module, declared = _declared(settings)
    if module is None:
        return None
    if declared is not None:
        return ("declared", declared)
    files = _checkpoint_files(module)
    return tuple((str(p), *_stat(p)) for p in files) if files else None


def _checkpoint_files(module: ModuleType) -> list[Path]:
    named = getattr(module, "CHECKPOINT_FILES", None)
    if named is not None:
        return [Path(p) for p in (named() if callable(named) else named)]
    if module.__name__ in ("msgate.model.predict", "msgate.model.he_worker"):
        from msgate.model.patient.checkpoint import DEFAULT_PATH

        return [DEFAULT_PATH, DEFAULT_PATH.with_suffix(".json")]
    return []


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


class Runtime:
    """One per worker process; ``model()`` loads lazily and once (thread-safe)."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self._store = store
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._model: Any = None  # what load_model() returned, passed back to predict(model=...)
        self.device = resolve_device(settings.workers.device)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.identity = _identity(settings)
        self.version = UNVERSIONED

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self.settings, migrate=False, create_keys=False)
        return self._store

    def model(self) -> ModuleType:
        if self._module is None:
            with self._lock:
                if self._module is None:
                    self._module = self._load()
        return self._module

    def _load(self) -> ModuleType:
        t0 = time.perf_counter()
        module = import_model_module(self.settings)
        loader = getattr(module, "load_model", None)
        if callable(loader):
            params = inspect.signature(loader).parameters
            self._model = loader(device=self.device) if "device" in params else loader()
            if "device" not in params:  # a model that does not take a device runs where it chose (CPU)
                self.device = str(getattr(self._model, "device", "cpu"))
        self.version = (declared_version(module) or str(getattr(self._model, "version", "") or "")[:64]
                        or UNVERSIONED)
        warm = getattr(module, "warm_up", None)
        warm() if callable(warm) else self._warm_up(module)
        log.info("model loaded", extra={"device": self.device, "model_version": self.version,
                                        "duration_ms": round((time.perf_counter() - t0) * 1000, 1)})
        return module

    def _warm_up(self, module: ModuleType) -> None:
        """One predict on a small synthetic case: kernels, caches and allocators are ready for the first job."""
        import numpy as np

        from msgate.model.features import FEATURES
        from msgate.model.types import EhrVector, Volume

        rng = np.random.default_rng(0)
        flair = Volume(rng.random((16, 32, 32), dtype=np.float32) * 100, np.diag([1.0, 1.0, 3.0, 1.0]), "FLAIR")
        ehr = EhrVector(np.zeros(len(FEATURES), np.float32), np.zeros(len(FEATURES), bool),
                        tuple(f.name for f in FEATURES))
        self._module = module
        try:
            self.predict([Case("warm-up", {"FLAIR": flair}, ehr)])
        except Exception:  # a model that cannot run a toy case still serves real ones; the log says so
            log.warning("model warm-up failed", extra={"device": self.device}, exc_info=True)

    def loaded_version(self) -> str:
        self.model()
        return self.version

    def reads_ehr(self) -> bool:
        """Whether the case loader should read the EHR: not in HE mode (the key service encrypts it by job
        id and the worker never sees the values), nor for a model module that sets ``READS_EHR = False``."""
        return bool(getattr(self.model(), "READS_EHR", True)) and not self.settings.he.enabled

    def preprocess(self) -> Callable[[Case], Case] | None:
        fn = getattr(self.model(), "preprocess", None)
        return fn if callable(fn) else None

    def predict(self, cases: Sequence[Case]) -> list[ModelResult]:
        predict: Any = self.model().predict
        if self._model is not None and "model" in inspect.signature(predict).parameters:
            results = list(predict(list(cases), model=self._model))
        else:
            results = list(predict(list(cases)))
        if len(results) != len(cases):
            raise RuntimeError(f"predict returned {len(results)} results for {len(cases)} cases")
        return results


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _identity(settings: Settings) -> tuple[object, ...]:
    """What decides which model a Runtime loads: another value means another Runtime, never a stale one."""
    return (settings.workers.model_module, settings.he.enabled, settings.workers.device, str(settings.home))


def get(settings: Settings, store: Store | None = None) -> Runtime:
    """This process's Runtime, re-created after a fork (the pid is part of its identity) or when the
    settings name another model (module, HE mode, device or home)."""
    global _runtime
    with _runtime_lock:
        if (_runtime is None or _runtime.owner.rsplit(":", 1)[1] != str(os.getpid())
                or _runtime.identity != _identity(settings)):
            _runtime = Runtime(settings, store)
        return _runtime


def install(runtime: Runtime) -> None:
    """Use ``runtime`` in this process (the worker role passes its already-open store)."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime
