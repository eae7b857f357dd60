"""The region a lesion's TID 1411 group measures when no SEG segment can stand for it.

With the SEG off (``MSGATE_RESULTS__SEG=false``) or not built (a FLAIR from several multi-frame
instances, a mask with voxels only on interpolated slices), and for a lesion the SEG has no segment
for (its voxels all on interpolated slices), the SR still has one volumetric ROI group per lesion.
PS3.16 TID 1411 then takes a Volume Surface (DCM 121231, SCOORD3D) with its source series instead of
a Referenced Segment: here a POINT at the lesion's centroid (``LesionFinding.centroid_lps``, patient
coordinates of the FLAIR the model read) in the FLAIR's Frame of Reference. A FLAIR without a Frame
of Reference UID, or a centroid that is not three finite numbers, gets an Image Region (DCM 111030,
SCOORD POINT) instead: the centre of the lesion's voxels on its central source plane. A lesion with
neither (no voxel on a source plane) has no region to name and so no group; the image-level group
still counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np

from msgate.model.types import LesionFinding
from msgate.results.sources import FlairSources


@dataclass(frozen=True)
class LesionRoi:
    """The keyword arguments of TID 1411 that name the region: exactly one of the two is set."""

    referenced_volume_surface: hd.sr.VolumeSurface | None = None
    referenced_regions: list[hd.sr.ImageRegion] | None = None

    def kwargs(self) -> dict[str, object]:
        return {key: value for key, value in vars(self).items() if value is not None}


def centroid_point(lesion: LesionFinding, sources: FlairSources, series_uid: str) -> hd.sr.VolumeSurface | None:
    """A Volume Surface POINT at the lesion's centroid in the FLAIR's Frame of Reference, or None."""
    frame_uid = str(sources.first.get("FrameOfReferenceUID") or "")
    try:
        point = np.asarray(lesion.centroid_lps, dtype=float).reshape(1, 3)
    except (TypeError, ValueError):
        return None
    if not frame_uid or not np.isfinite(point).all():
        return None
    return hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=point, frame_of_reference_uid=frame_uid,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid))


def central_plane_point(lesion: LesionFinding, mask: np.ndarray, sources: FlairSources) -> hd.sr.ImageRegion | None:
    """An Image Region POINT at the centre of the lesion's voxels on the source plane nearest its centre
    slice (pixel coordinates: (0, 0) is the top left corner of the top left pixel), or None."""
    ks, rows, cols = np.nonzero(mask == lesion.label)
    present = sorted(set(sources.present) & {int(k) for k in np.unique(ks)})
    if not present:
        return None
    middle = float(ks.mean())
    k = min(present, key=lambda plane: (abs(plane - middle), plane))
    on_plane = ks == k
    plane = sources.slices[k]
    if plane is None:  # not reached: k is a present slice
        return None
    frames = None if plane.frame_number is None else [plane.frame_number]
    image = hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(plane.dataset.SOPClassUID),
                                       referenced_sop_instance_uid=plane.sop_uid, referenced_frame_numbers=frames)
    point = np.array([[cols[on_plane].mean() + 0.5, rows[on_plane].mean() + 0.5]])
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=point, source_image=image)


def lesion_roi(lesion: LesionFinding, mask: np.ndarray, sources: FlairSources, series_uid: str) -> LesionRoi | None:
    """The centroid point, else the central-plane point, else None (see the module docstring)."""
    surface = centroid_point(lesion, sources, series_uid)
    if surface is not None:
        return LesionRoi(referenced_volume_surface=surface)
    region = central_plane_point(lesion, mask, sources)
    return None if region is None else LesionRoi(referenced_regions=[region])
