"""TID 1500 Measurement Report in a Comprehensive 3D SR (PS3.16 TID 1500, 1501, 1411), highdicom only.

Content tree:

- observation context: device observer msgate, model name and version (TID 1004);
- procedure reported: MRI head (LOINC 24590-2);
- one image-level group (TID 1501) with the EDSS class and MS-vs-cSVD qualitative evaluations and the
  EDSS estimate, class probabilities, confidence, uncertainty, P(MS), lesion count, total lesion volume
  and Rim+ count measurements, referencing every source FLAIR image;
- one volumetric ROI group (TID 1411) per lesion, with tracking id ``Lesion <label>`` and a tracking
  UID, location (finding site), volume, Rim+ probability and rim status (the last two when QSM was
  present). A lesion with a SEG segment references that segment (the region measured; by segment
  number only: DCMTK warns when an IMAGE item carries both frame and segment numbers) and shares its
  tracking UID; without a SEG (``MSGATE_RESULTS__SEG=false``, or none could be built) or without a
  segment of its own, the group's region is an SCOORD3D POINT at the lesion's centroid in the FLAIR's
  Frame of Reference (:mod:`msgate.results.lesion_roi`);
- a TEXT comment: unverified AI output, not for diagnosis.

Every group carries the algorithm identification. VerificationFlag stays UNVERIFIED; the
CompletionFlag is PARTIAL when an input the model uses was missing (no QSM, EHR fields missing).
The patient and study modules are copied from the source images by highdicom (the SR goes into the
original study); a superseding SR lists the previous one in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes

from msgate.model.types import LesionFinding, ModelResult
from msgate.results import codes
from msgate.results.identity import Identity
from msgate.results.lesion_roi import lesion_roi
from msgate.results.notes import flag_notes
from msgate.results.seg import SegResult
from msgate.results.sources import FlairSources

log = logging.getLogger(__name__)

DISCLAIMER = "Unverified AI output, not for diagnosis. Results require review by a qualified clinician."
PARTIAL_FLAGS = ("qsm_absent", "ehr_missing")


def is_complete(result: ModelResult) -> bool:
    return not any(flag.startswith(PARTIAL_FLAGS) for flag in result.flags)


def _m(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, ident: Identity) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=ident.algorithm)


def image_group(result: ModelResult, sources: FlairSources | Sequence[Dataset],
                ident: Identity) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [_m(codes.EDSS_ESTIMATE, result.edss_estimate, codes.UNIT_SCORE, ident)]
    measurements += [_m(code, p, codes.UNIT_ONE, ident)
                     for code, p in zip(codes.EDSS_CLASS_PROBABILITY, result.edss_probabilities, strict=True)]
    measurements += [
        _m(codes.CONFIDENCE, result.confidence, codes.UNIT_ONE, ident),
        _m(codes.UNCERTAINTY, result.uncertainty, codes.UNIT_ONE, ident),
        _m(codes.P_MS, result.p_ms, codes.UNIT_ONE, ident),
        _m(codes.LESION_COUNT, len(result.lesions), codes.UNIT_COUNT, ident),
        _m(codes.LESION_VOLUME_TOTAL, result.lesion_volume_ml, codes.UNIT_ML, ident),
    ]
    if result.rim_count is not None:
        measurements.append(_m(codes.RIM_COUNT, result.rim_count, codes.UNIT_COUNT, ident))
    diagnosis = codes.MULTIPLE_SCLEROSIS if result.diagnosis == "MS" else codes.SMALL_VESSEL_DISEASE
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="MS AI image-level findings"),
        algorithm_id=ident.algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in FlairSources.of(sources).datasets],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.EDSS_CLASS, codes.EDSS_CLASS_VALUES[result.edss_class]),
            hd.sr.QualitativeEvaluation(codes.DIAGNOSIS, diagnosis),
        ],
    )


def _lesion_group(lesion: LesionFinding, tracking_uid: str, ident: Identity,
                  **roi: object) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One lesion's TID 1411 group; ``roi``: the region keyword (referenced segment, volume surface or
    image regions)."""
    measurements = [_m(codes.VOLUME, lesion.volume_ml, codes.UNIT_ML, ident)]
    evaluations = []
    if lesion.rim_probability is not None:
        measurements.append(_m(codes.RIM_PROBABILITY, lesion.rim_probability, codes.UNIT_ONE, ident))
        evaluations.append(hd.sr.QualitativeEvaluation(
            codes.RIM_STATUS, codes.PRESENT if lesion.rim_positive else codes.ABSENT))
    sites = [hd.sr.FindingSite(codes.LOCATION[lesion.location])] if lesion.location in codes.LOCATION else None
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Lesion {lesion.label}"),
        finding_type=codes.LESION, algorithm_id=ident.algorithm, measurements=measurements,
        qualitative_evaluations=evaluations or None, finding_sites=sites,
        **roi,  # type: ignore[arg-type]
    )


def lesion_groups(result: ModelResult, sources: FlairSources | Sequence[Dataset], seg: SegResult | None,
                  series_uid: str, ident: Identity) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One group per lesion, in ``result.lesions`` order: on its SEG segment, or (no SEG, or no segment for
    it) on a point (:mod:`msgate.results.lesion_roi`)."""
    src = FlairSources.of(sources)
    groups = []
    for lesion in result.lesions:
        if seg is not None and (number := seg.lesion_segment.get(lesion.label)) is not None:
            groups.append(_lesion_group(
                lesion, seg.lesion_tracking_uid[lesion.label], ident,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.dataset.SOPClassUID, sop_instance_uid=seg.dataset.SOPInstanceUID,
                    segment_number=number, source_series=hd.sr.SourceSeriesForSegmentation(series_uid))))
            continue
        roi = lesion_roi(lesion, result.lesion_mask, src, series_uid)
        if roi is None:
            log.warning("SR: a lesion has no region to reference (no usable centroid, no voxel on a source plane)",
                        extra={"lesion": lesion.label})
            continue
        groups.append(_lesion_group(lesion, hd.UID(), ident, **roi.kwargs()))
    return groups


def measurement_report(result: ModelResult, sources: FlairSources | Sequence[Dataset], seg: SegResult | None,
                       ident: Identity) -> hd.sr.MeasurementReport:
    observer = hd.sr.ObserverContext(
        observer_type=pcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ident.device_uid, name="msgate", manufacturer_name=ident.manufacturer,
            model_name=f"{ident.model_name} {ident.model_version}"[:64], serial_number=ident.device_serial_number),
    )
    groups: list[object] = [image_group(result, sources, ident)]
    groups += lesion_groups(result, sources, seg, str(FlairSources.of(sources).first.SeriesInstanceUID), ident)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_MRI_HEAD, imaging_measurements=groups,  # type: ignore[arg-type]
        title=codes.REPORT_TITLE,
    )
    for text in (DISCLAIMER, *flag_notes(result)):  # review flag, absent inputs: read with the numbers
        report[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DISCLAIMER_NAME, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return report


def build_sr(result: ModelResult, sources: FlairSources | Sequence[Dataset], seg: SegResult | None,
             ident: Identity, *,
             series_uid: str, sop_uid: str, series_number: int = 9800,
             previous: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The SR in the sources' study; ``previous``: SRs this one supersedes (at least their UIDs)."""
    report = measurement_report(result, sources, seg, ident)
    evidence = [*FlairSources.of(sources).datasets, *([seg.dataset] if seg is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=ident.manufacturer,
        is_complete=is_complete(result), is_final=False, is_verified=False,
        previous_versions=list(previous) or None, series_description="MS AI report (unverified)",
        manufacturer_model_name=ident.model_name, software_versions=ident.software_versions,
        device_serial_number=ident.device_serial_number, coding_schemes=[codes.scheme_identification()],
    )
