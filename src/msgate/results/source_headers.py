"""Source header values put into the forms highdicom accepts before the result objects copy them.

Every derived object (SR, SEG, Parametric Map, key images) copies the Patient and General Study modules
from its FLAIR source. Values scanners, routers and anonymisers really send (an empty first Specific
Character Set value, a removed Type 2 attribute, ``1953-03-17``, ``10:15:00``, ``f``) made highdicom
refuse the copy, and the whole publish failed for good after the result was computed. ``normalise``
fixes them on the in-memory source only; the stored instance is never changed. Logged by keyword only.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def normalise(ds: Dataset) -> None:
    """Put one source's copied header values into their DICOM form (in place)."""
    default_repertoire_named(ds)
    type2_present(ds)
    conformant_values(ds)


def default_repertoire_named(ds: Dataset) -> None:
    """``\\ISO 2022 IR 87`` (an empty first value: the default repertoire, the usual Japanese form, PS3.5
    H.3.1) written as ``ISO 2022 IR 6\\ISO 2022 IR 87``: the same meaning, and highdicom refuses the empty
    value (the whole publish failed, and was not retried)."""
    value = ds.get("SpecificCharacterSet")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        values = [str(v).strip() for v in value]
        if len(values) > 1 and values[0] == "":
            ds.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]


# Patient and General Study attributes of Type 2 (present, may be empty) that every derived object copies
# from its source; highdicom reads them as attributes, so one removed by an anonymiser or a router (StudyID
# and StudyTime often are) made the whole publish fail, for good, after the result was computed.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "StudyID", "ReferringPhysicianName", "AccessionNumber")


def type2_present(ds: Dataset) -> None:
    """Add the copied Type 2 attributes a source lacks, empty (PS3.5 7.4.5: what an absent one means)."""
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")


_TIME = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")


def conformant_values(ds: Dataset) -> None:
    """Dates, times and sex in the forms scanners and routers really send (``1953-03-17``, ``10:15:00``,
    ``f``), which highdicom refuses when it copies them, put into their DICOM form, or emptied (Type 2)
    when they cannot be: one such value failed the whole publish, for good. Logged by keyword only."""
    fixed = []
    for keyword in ("PatientBirthDate", "StudyDate"):
        raw = str(ds.get(keyword, "") or "").strip()
        value = re.sub(r"[-./ ]", "", raw)
        try:
            ok = len(value) == 8 and value.isdigit() and bool(datetime.strptime(value, "%Y%m%d"))
        except ValueError:
            ok = False
        if raw and (not ok or value != raw):
            setattr(ds, keyword, value if ok else "")
            fixed.append(keyword)
    raw = str(ds.get("StudyTime", "") or "").strip()
    value = raw.replace(":", "")
    if raw and (value != raw or not _TIME.match(value)):
        ds.StudyTime = value if _TIME.match(value) else ""
        fixed.append("StudyTime")
    raw = str(ds.get("PatientSex", "") or "")
    if raw and raw not in ("M", "F", "O"):
        ds.PatientSex = raw.strip().upper() if raw.strip().upper() in ("M", "F", "O") else ""
        fixed.append("PatientSex")
    if fixed:
        log.warning("source values not in their DICOM form were normalised for the results",
                    extra={"reason": ",".join(fixed)})
