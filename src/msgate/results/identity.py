"""Who made a result object: the device (msgate) and the algorithm (model name and version).

IHE AI Results (AIR) asks for the device observer and algorithm identification on every object; the
same values go into the SR observer context, the SEG/PM equipment module and the ORU OBX-17.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

from msgate import __version__
from msgate.model.types import ModelResult

MANUFACTURER = "msgate"
# generate_uid(entropy_srcs=["msgate-device"]): stable across installs; per-site UIDs would need a setting.
DEVICE_UID = "1.2.826.0.1.3680043.8.498.59761513911664245990710283127292338158"


@dataclass(frozen=True)
class Identity:
    model_name: str
    model_version: str
    manufacturer: str = MANUFACTURER
    device_serial_number: str = "msgate"
    device_uid: str = DEVICE_UID
    parameters: tuple[str, ...] = ()

    @property
    def software_versions(self) -> str:
        return f"msgate {__version__}"

    @property
    def algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=self.model_name, version=self.model_version,
                                             parameters=list(self.parameters) or None)

    @classmethod
    def of(cls, result: ModelResult) -> Identity:
        """``parameters`` records how the result was computed (e.g. EHR under homomorphic encryption)."""
        parameters = (HE_PARAMETER,) if "he" in result.flags else ()
        return cls(model_name=result.model_name, model_version=result.model_version, parameters=parameters)


HE_PARAMETER = "EHR branch evaluated under homomorphic encryption (CKKS)"


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Copy every root attribute of the source IOD's Patient and Study IE modules that the source has.

    highdicom does this for SR, SEG and PM; ``SCImage.from_ref_dataset`` copies only a subset
    (e.g. not Issuer of Patient ID), and results must carry the modules exactly.
    """
    # highdicom's standard tables (private module, no public equivalent in 0.28)
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    iod = get_sop_class_iod_map()[source.SOPClassUID]
    attributes = get_module_attribute_map()
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in ("Patient", "Study"):
            continue
        for attr in attributes[module["key"]]:
            keyword = attr["keyword"]
            if not attr["path"] and keyword in source:
                target[keyword] = deepcopy(source[keyword])
