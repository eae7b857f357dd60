"""EHR feature schema: the one place that names the model's tabular inputs.

Each feature lists the codes it can arrive under (LOINC ``LN`` where a source
showed one, local ``L`` codes otherwise, or an HL7 v2 PID field), its UCUM
unit, how many days an observation stays valid before the scan, and its kind.
The synthetic cohort (``msgate.model.synth``) writes exactly these codes into
ORU^R01 OBX segments; the case loader reads them back by the same codes.

The EDSS is the *label*, never an input: it is described by ``EDSS_LABEL``
and deliberately absent from ``FEATURES``. Kurtzke functional-system scores
are never modelled at all (EDSS is computed from them, so they leak the label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureKind = Literal["numeric", "binary", "categorical"]


@dataclass(frozen=True)
class FeatureSpec:
    """One EHR feature: name, accepted (code, system) pairs, unit, validity and kind."""

    name: str
    codes: tuple[tuple[str, str], ...]
    unit: str
    validity_days: int
    kind: FeatureKind
    categories: tuple[str, ...] = ()

    @property
    def primary_code(self) -> tuple[str, str]:
        """The (code, system) pair writers emit."""
        return self.codes[0]


DMT_CATEGORIES: tuple[str, ...] = (
    "none",
    "interferon_beta",
    "glatiramer",
    "teriflunomide",
    "dimethyl_fumarate",
    "fingolimod",
    "cladribine",
    "natalizumab",
    "ocrelizumab",
    "ofatumumab",
)

FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("age", (("30525-0", "LN"), ("PID-7", "HL7V2")), "a", 36500, "numeric"),
    FeatureSpec("sex", (("76689-9", "LN"), ("PID-8", "HL7V2")), "", 36500, "binary", ("F", "M")),
    FeatureSpec("disease_duration", (("MS-DURATION", "L"),), "a", 3650, "numeric"),
    FeatureSpec("t25fw", (("MS-T25FW", "L"),), "s", 180, "numeric"),
    FeatureSpec("nhpt", (("MS-9HPT", "L"),), "s", 180, "numeric"),
    FeatureSpec("sdmt", (("MS-SDMT", "L"),), "{score}", 365, "numeric"),
    FeatureSpec("nfl", (("101281-4", "LN"),), "pg/mL", 180, "numeric"),
    FeatureSpec("ocb", (("49852-7", "LN"),), "", 36500, "binary", ("NEG", "POS")),
    FeatureSpec("igg_index", (("14117-6", "LN"),), "{ratio}", 36500, "numeric"),
    FeatureSpec("relapses_2y", (("MS-RELAPSES-2Y", "L"),), "{count}", 365, "numeric"),
    FeatureSpec("dmt", (("MS-DMT", "L"),), "", 90, "categorical", DMT_CATEGORIES),
)

EDSS_LABEL = FeatureSpec("edss", (("MS-EDSS", "L"),), "{score}", 180, "numeric")

FEATURE_BY_NAME: dict[str, FeatureSpec] = {f.name: f for f in FEATURES}
