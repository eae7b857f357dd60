"""What a correction tells the PACS, on the real store (SQLite, and PostgreSQL when marked), no sockets:
the Series Descriptions that name the result replaced, and which superseded objects an IOCM rejection
note lists at each destination (only what may have reached it; not again what an earlier note
rejected there)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlmodel import col, select

from msgate.results import heatmap, rejection
from msgate.results import seg as seg_mod
from msgate.results.publish import publish_job, when_rendered
from msgate.storage.models import Blob, Job, OutboxEntry, Series
from msgate.storage.store import Store, open_store
from msgate.workers.results_io import store_result
from tests.conftest import make_settings
from tests.integration.pacs_peers import encode, flair_series, model_result

SHAPE = (12, 40, 48)
SITE_ZONE = "Pacific/Kiritimati"  # UTC+14: never the test host's zone


@pytest.fixture
def cstore(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    home = tmp_path / "home"
    if backend == "postgres":
        from msgate.storage import keyring

        keyring.init(home / "keys" / "keyring.json")
    settings = make_settings(home, backend, pg, pacs=[{"name": "iocm", "port": 11999, "iocm_rejection": True},
                                                      {"name": "plain", "port": 11998}],
                             site_timezone=SITE_ZONE)
    st = open_store(settings)
    for ds in flair_series(n=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], seed=7):
        st.ingest.store_instance(source=encode(ds))
    with st.db.session() as session:
        series = session.exec(select(Series)).one()
        series.role = "FLAIR"
        session.add(series)
    yield st
    st.close()


def _publish(store: Store, idem: str, supersedes: str | None = None, edss: float = 3.5) -> str:
    with store.db.session() as session:
        study_id = session.exec(select(Series)).one().study_id
        if supersedes is not None:
            session.get(Job, supersedes).state = "superseded"  # type: ignore[union-attr]
        job = Job(study_id=study_id, idem_key=idem, state="done", supersedes_id=supersedes)
        session.add(job)
        session.flush()
        job_id = job.id
    store_result(store, job_id=job_id, result=model_result(SHAPE, edss=edss))
    assert publish_job(store, job_id) == "queued"
    return job_id


def _objects(store: Store, job_id: str, destination: str = "iocm") -> list[tuple[OutboxEntry, str, Dataset]]:
    with store.db.session() as session:
        rows = session.exec(select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(OutboxEntry.blob_id))
                            .where(OutboxEntry.job_id == job_id, OutboxEntry.destination == destination)).all()
        return [(entry, kind, dcmread(io.BytesIO(store.blobs.read(session, entry.blob_id)), stop_before_pixels=True))
                for entry, kind in rows]


def _set(store: Store, job_id: str, state: str, attempts: int = 1, kinds: tuple[str, ...] | None = None) -> None:
    with store.db.session() as session:
        for entry, kind in session.exec(select(OutboxEntry, Blob.kind).join(Blob, col(Blob.id) == col(
                OutboxEntry.blob_id)).where(OutboxEntry.job_id == job_id)).all():
            if kinds is None or kind in kinds:
                entry.state, entry.attempts = state, attempts
                session.add(entry)


def _listed(store: Store, job_id: str, destination: str = "iocm") -> list[set[str]]:
    """The SOP Instance UIDs each rejection note of ``job_id`` for ``destination`` lists."""
    out = []
    for _entry, kind, ds in _objects(store, job_id, destination):
        if kind == rejection.KIND:
            note = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
            assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
            out.append({str(i.ReferencedSOPInstanceUID) for study in note.CurrentRequestedProcedureEvidenceSequence
                        for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence})
    return out


def _image_uids(store: Store, job_id: str, destination: str = "iocm") -> set[str]:
    return {str(ds.SOPInstanceUID) for _e, kind, ds in _objects(store, job_id, destination) if kind in rejection.REJECTED}


def test_a_chain_of_corrections_rejects_each_superseded_set_once(cstore: Store) -> None:
    a = _publish(cstore, "a")
    assert _listed(cstore, a) == []  # a first result rejects nothing
    dated = {(str(ds.SeriesDate), str(ds.SeriesTime)) for _e, _kind, ds in _objects(cstore, a)}
    assert len(dated) == 1  # one time for all of a result's series: the one a correction names
    site_now = datetime.now(ZoneInfo(SITE_ZONE)).replace(tzinfo=None)
    stamp = datetime.strptime("".join(dated.pop()), "%Y%m%d%H%M%S")
    assert timedelta(0) <= site_now - stamp < timedelta(minutes=5)  # the site's local time, not the host's
    _set(cstore, a, "delivered")
    b = _publish(cstore, "b", supersedes=a, edss=4.0)
    assert _listed(cstore, b) == [_image_uids(cstore, a)]
    assert _listed(cstore, b, "plain") == []  # iocm_rejection off there
    when_a = when_rendered(next(ds for _e, kind, ds in _objects(cstore, a) if kind == "out.sr"))
    described = {kind: str(ds.SeriesDescription) for _e, kind, ds in _objects(cstore, b) if kind != rejection.KIND}
    assert described["out.seg"] == f"MS lesions (AI, unverified, replaces {when_a})"
    assert described["out.pm"] == f"MS AI saliency map (unverified, replaces {when_a})"
    assert described["out.sc"] == f"MS AI key images (not for diagnosis, replaces {when_a})"
    assert described["out.sr"] == f"MS AI report (unverified, replaces {when_a})"
    _set(cstore, b, "delivered")  # its rejection note included: A is rejected at that PACS
    c = _publish(cstore, "c", supersedes=b, edss=5.0)
    assert _listed(cstore, c) == [_image_uids(cstore, b)]  # B's, not A's again


def test_what_never_reached_the_pacs_is_not_rejected_and_an_undelivered_note_is_made_up_for(cstore: Store) -> None:
    a = _publish(cstore, "a")
    _set(cstore, a, "delivered", kinds=("out.seg", "out.sr"))
    _set(cstore, a, "pending", attempts=1, kinds=("out.pm",))  # tried, no answer: the PACS may have filed it
    _set(cstore, a, "pending", attempts=0, kinds=("out.sc",))  # never tried: dropped, it reaches no one
    b = _publish(cstore, "b", supersedes=a, edss=4.0)
    reached = {str(ds.SOPInstanceUID) for _e, kind, ds in _objects(cstore, a) if kind in ("out.seg", "out.pm")}
    assert _listed(cstore, b) == [reached]
    _set(cstore, b, "dropped", attempts=0)  # B (its note too) superseded before anything was sent
    c = _publish(cstore, "c", supersedes=b, edss=5.0)
    assert _listed(cstore, c) == [reached]  # A's objects, whose note never went out


def test_a_result_whose_predecessor_never_reached_a_pacs_is_no_correction_there(cstore: Store) -> None:
    a = _publish(cstore, "a")  # nothing tried yet: dropped by B's publish
    b = _publish(cstore, "b", supersedes=a, edss=4.0)
    assert _listed(cstore, b) == [] and _listed(cstore, b, "plain") == []
    described = {str(ds.SeriesDescription) for _e, _kind, ds in _objects(cstore, b)}
    assert not any("replaces" in text for text in described), described


def test_descriptions_stay_within_lo_and_an_undated_object_is_named_by_its_creation_time() -> None:
    for replaces in ("2026-12-07 14:03", "earlier result"):
        for text in (seg_mod.series_description(replaces), heatmap.pm_description(replaces),
                     heatmap.key_images_description(replaces)):
            assert len(text) <= 64 and text.endswith(f"replaces {replaces})")
    old = Dataset()
    old.InstanceCreationDate, old.InstanceCreationTime = "20261207", "140355.123"
    assert when_rendered(old) == "2026-12-07 14:03"
    old.SeriesDate, old.SeriesTime = "20261208", "0915"
    assert when_rendered(old) == "2026-12-08 09:15"
    assert when_rendered(Dataset()) == "earlier result"
