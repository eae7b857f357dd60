"""IHE IOCM rejection note for the image objects a correction replaces (IHE RAD TF-1 §42 Imaging Object
Change Management; PS3.3 A.35.4 Key Object Selection Document; PS3.16 CID 7011, (113001, DCM,
"Rejected for Quality Reasons")).

A correction's SEG, parametric map and key images go into new series; the superseded ones stay in the
PACS. For a PACS destination with ``iocm_rejection`` on (:class:`msgate.config.PacsDestination`),
:func:`msgate.results.publish.publish_job` adds one note per correction: a Key Object Selection
Document titled "Rejected for Quality Reasons" that lists the superseded SEG, map and key images that
may have reached that destination. An IOCM Image Manager then hides them from readers. The superseded
SR is not listed: the new SR names it in its Predecessor Documents Sequence, so the history stays
readable there.

The note goes into the study, with the Patient and Study modules of the current source images (as the
new objects), in a series of its own (9804), and through the outbox to that one destination (blob
kind ``out.kos``); the outbox sends it after the replacement objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from sqlmodel import Session

from msgate.results import outbox
from msgate.results.identity import DEVICE_UID, MANUFACTURER, copy_patient_study
from msgate.storage import audit
from msgate.storage.models import OutboxEntry
from msgate.storage.store import Store

KIND = "out.kos"
REJECTED = ("out.seg", "out.pm", "out.sc")  # the image objects a rejection note lists (not the SR)
SERIES_NUMBER = 9804
REJECTED_FOR_QUALITY_REASONS = hd.sr.CodedConcept(value="113001", scheme_designator="DCM",
                                                  meaning="Rejected for Quality Reasons")
DESCRIPTION = "Superseded by a corrected MS AI result"


def build_note(rejected: Sequence[Dataset], source: Dataset, *, series_uid: str,
               sop_uid: str) -> hd.ko.KeyObjectSelectionDocument:
    """The rejection note listing ``rejected`` (headers of the superseded objects, one study), in the
    study of ``source`` (a current source image, whose Patient and Study modules it copies)."""
    if not rejected:
        raise ValueError('Argument "rejected" must name at least one object.')
    observer = hd.sr.ObserverContext(
        observer_type=pcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="msgate", manufacturer_name=MANUFACTURER),
    )
    content = hd.ko.KeyObjectSelection(document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=rejected,
                                       observer_device_context=observer, description=DESCRIPTION)
    charset = source.get("SpecificCharacterSet")
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=rejected, content=content, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        **({"specific_character_set": charset} if charset else {}),
    )
    copy_patient_study(note, source)
    note.SeriesDescription = "MS AI results rejected (superseded by a correction)"
    return note


def enqueue_note(store: Store, session: Session, *, job_id: str, destination: str, data: bytes,
                 count: int) -> OutboxEntry:
    """One outbox entry, for ``destination`` only (the other PACS do not honour IOCM)."""
    [entry] = outbox.enqueue(store, session, job_id=job_id, objects=[outbox.Rendered(KIND, data)],
                             pacs=[destination])
    audit.append(session, kind="results.rejection_note", actor="publish", subject=f"job:{job_id}",
                 detail={"destination": entry.destination, "instances": count})
    return entry
