"""Series roles and study routing: ordered, configurable rules with defaults for the main vendors.

**Roles** (:class:`RoleRule`) are tried in order; the first rule whose every given condition matches
decides the series role. Conditions are case-insensitive regular expressions searched in
SeriesDescription (``text``), SequenceName, ImageType and ScanningSequence (both as ``A\\B`` strings;
an Enhanced MR header's EchoPulseSequence stands in for the latter, with ``IR`` when its InversionRecovery
is YES), an InversionTime range in ms (Enhanced MR: the first InversionTimes value) and a minimum number
of inversion times (InversionTimes, Enhanced MR). Enhanced and Legacy Converted Enhanced MR headers are
read in their functional groups (:mod:`msgate.listener.enhanced_fields`). When no rule matches, the rules are
tried once more with ``text`` = SeriesDescription + ' | ' + ProtocolName: GE writes the exam's protocol
("MS BRAIN SWAN") on every series, so the description decides first. A series that no rule matches
either way is ``OTHER``. A double inversion recovery is ``DIR``, which the model does not read: it is
never taken as the FLAIR.

**Routing** (:class:`RoutingRule`) decides per study what happens once it is complete: ``pipeline``
(hand to the MS model when the rule's required roles are present), ``store_only`` (kept, never
scheduled) or ``ignore`` (kept until retention, never scheduled, shown as ignored). The first matching
rule wins; with none matching the study is ``store_only``. The study's modality is its first image
modality: a KO, SR or PR the PACS sent ahead of the images does not make an MR study store-only.

A pipeline rule's ``await_roles`` (default none) are roles the pipeline uses when present, such as
``["QSM"]``: a study released with every required role but an awaited one absent is not ready at that
release. It waits for the quiet period and is ``ready`` (reason ``quiet``) without them, or ready at once
at a later release that finds them present. A router that sends each series on its own association
otherwise made the study ready at the FLAIR's release, and the QSM's association then ran it again as a
correction. A role counts as present only as a series of that role (:func:`awaited_absent`).

Both lists live in the ``[rules]`` section of the TOML config (``[[rules.roles]]``,
``[[rules.routing]]``); ``msgate rules test FILE...`` shows the decisions for given files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msgate.listener import enhanced_fields as enhanced
from msgate.storage.index_dicom import text as _text


class Role(str, Enum):
    """What a series is for the MS pipeline."""

    FLAIR = "FLAIR"
    QSM = "QSM"
    QSM_SOURCE = "QSM_SOURCE"  # magnitude / phase echoes a QSM map can be computed from
    T1 = "T1"
    T2 = "T2"
    SWI = "SWI"
    DIR = "DIR"  # double inversion recovery (cortical lesions): the model does not read it; never its FLAIR
    DERIVED = "DERIVED"  # reformats, projections, maps the pipeline does not use
    OTHER = "OTHER"


Route = Literal["pipeline", "store_only", "ignore"]


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {value!r} ({exc})") from exc
    return value


@lru_cache(maxsize=512)
def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


class RoleRule(BaseModel):
    """One ordered role rule; every condition given must match (an empty rule matches everything)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    name: str = ""
    text: str | None = Field(None, description="regex on SeriesDescription; when no rule matches, on "
                             "SeriesDescription + ' | ' + ProtocolName (ProtocolName as a fallback)")
    sequence_name: str | None = None
    image_type: str | None = None
    scanning_sequence: str | None = None
    inversion_time_min: float | None = None
    inversion_time_max: float | None = None
    inversion_count_min: int | None = Field(None, ge=1, description="at least this many inversion times "
                                            "(InversionTimes (0018,9079), Enhanced MR): 2 for a double IR")

    _rx = field_validator("text", "sequence_name", "image_type", "scanning_sequence")(_check_regex)

    def matches(self, f: SeriesFields) -> bool:
        for pattern, value in ((self.text, f.text), (self.sequence_name, f.sequence_name),
                               (self.image_type, f.image_type), (self.scanning_sequence, f.scanning_sequence)):
            if pattern is not None and not _rx(pattern).search(value):
                return False
        if self.inversion_time_min is not None or self.inversion_time_max is not None:
            ti = f.inversion_time
            if ti is None:
                return False
            if self.inversion_time_min is not None and ti < self.inversion_time_min:
                return False
            if self.inversion_time_max is not None and ti > self.inversion_time_max:
                return False
        return self.inversion_count_min is None or f.inversion_count >= self.inversion_count_min


class RoutingRule(BaseModel):
    """One ordered routing rule; every condition given must match."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    action: Route = "pipeline"
    modality: list[str] | None = Field(None, description="any of these modalities (e.g. ['MR'])")
    body_part: str | None = Field(None, description="regex on BodyPartExamined ('' when absent)")
    study_description: str | None = Field(None, description="regex on StudyDescription")
    calling_aet: list[str] | None = Field(None, description="any of these calling AE titles")
    required_roles: list[Role] = Field(default_factory=lambda: [Role.FLAIR])
    await_roles: list[Role] = Field(default_factory=list, description="roles used when present: a release "
                                    "without them waits for the quiet period (e.g. ['QSM'])")

    _rx = field_validator("body_part", "study_description")(_check_regex)

    @model_validator(mode="after")
    def _check_await_roles(self) -> RoutingRule:
        """Awaiting only means something for the pipeline and for a role not already required; a role
        listed twice or also required is a slip in the rules file, so it is refused rather than ignored."""
        if not self.await_roles:
            return self
        if self.action != "pipeline":
            raise ValueError(f"await_roles applies to pipeline rules only, not to action {self.action!r}")
        names = [r.value for r in self.await_roles]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"await_roles lists {', '.join(twice)} more than once")
        both = sorted(set(names) & {r.value for r in self.required_roles})
        if both:
            raise ValueError(f"await_roles {', '.join(both)} already in required_roles")
        return self

    def matches(self, f: StudyFields) -> bool:
        if self.modality is not None and f.modality.upper() not in {m.upper() for m in self.modality}:
            return False
        if self.calling_aet is not None and f.calling_aet.strip() not in {a.strip() for a in self.calling_aet}:
            return False
        if self.body_part is not None and not _rx(self.body_part).search(f.body_part):
            return False
        return self.study_description is None or bool(_rx(self.study_description).search(f.study_description))


# Siemens abbreviates dark-fluid "da-fl" (t2_spc_da-fl_sag_p2_iso, its 3D FLAIR's default name).
_DARK_FLUID = r"dark[-_ ]?fluid|(?<![a-z])da[-_ ]?fl(?![a-z])"
_FLAIR = rf"flair|{_DARK_FLUID}|\btirm\b.*\bfl|fluid[-_ ]?att"
# "T1" then FLAIR / dark-fluid / TIRM in the same name ([^|]: not across the ' | ' before ProtocolName).
_T1_FLAIR = (rf"(?<![a-z0-9])t1w?(?![0-9])[^|]*?(flair|{_DARK_FLUID}|tirm)"
             rf"|(flair|{_DARK_FLUID})[-_ ]?t1(?![0-9])")
# Double inversion recovery: Siemens t2_spc_dir / DIR_SPACE, GE 3D DIR CUBE, Philips 3D_DIR, "double IR",
# "dbl_ir", "2IR". "dir" is a word of its own ("direction", "dircos", "indirect" are not), never a count of
# diffusion directions ("DTI 30 dir", "64dir") nor a phase-encoding direction ("phase dir AP", and a "dir"
# followed by one: ReproIn's "anat-FLAIR_dir-AP", "FLAIR (dir LR)", "dir: R>>L"). A plain "dir" in a name
# that also says FLAIR is still DIR: a DIR given to the model as its FLAIR is a wrong result, a FLAIR taken
# for a DIR leaves the study waiting for its FLAIR, in sight.
_DIR_TOKEN = r"(?<![a-z0-9])(?<![0-9][-_ ])dir(?![a-z])"
_DIRECTION = (r"[-_ :=(]*((ap|pa|lr|rl|si|is|hf|fh)(?![a-z0-9])"
              r"|[aplrsihf] ?(>>?|->|-|to) ?[aplrsihf](?![a-z0-9]))")
_NOT_DIFFUSION = r"^(?!.*(dti|dwi|diff|tensor|phase[-_ ]?dir))"
_DIR = (rf"{_NOT_DIFFUSION}"
        rf".*({_DIR_TOKEN}(?!{_DIRECTION})|double[-_ ]?(inv|ir(?![a-z]))|dbl[-_ ]?ir(?![a-z])"
        r"|(?<![a-z0-9])2[-_]?ir(?![a-z]))")
_T2 = r"t2w|(?<![a-z0-9])t2|(?<![a-z])(tse|fse)(?![a-z])"
# "dir" with a direction in a name that names no FLAIR, T1 (rules before) or T2 ("DIR_LR", "Sag 3D dir-AP"):
# still DIR, never a long-TI IR's FLAIR.
_DIR_WITH_DIRECTION = rf"^(?!.*({_T2})){_NOT_DIFFUSION}.*{_DIR_TOKEN}"
_W = r"(?<![a-z])(mag|magnitude|pha|phase)(?![a-z])"
_SOURCE = rf"(qsm|swi|swan|susc|gre).*{_W}|{_W}.*(qsm|swi|swan|gre)"

DEFAULT_ROLE_RULES: list[RoleRule] = [
    # Reformats and projections first: a FLAIR MPR is not the FLAIR acquisition.
    RoleRule(role=Role.DERIVED, name="reformat/projection",
             image_type=r"\b(REFORMATTED|PROJECTION IMAGE|MPR|MIP|MNIP)\b"),
    RoleRule(role=Role.DERIVED, name="reformat by name", text=r"(?<![a-z])(mpr|mip|minip|mnip|reformat)(?![a-z])"),
    # QSM maps, then their magnitude/phase sources (Siemens/GE/Philips), then SWI.
    RoleRule(role=Role.QSM_SOURCE, name="QSM/SWI magnitude or phase", text=_SOURCE),
    RoleRule(role=Role.QSM, name="QSM map", text=r"(?<![a-z])qsm|susceptibility[-_ ]?map|(?<![a-z])chi[-_ ]?map"),
    RoleRule(role=Role.QSM_SOURCE, name="GRE phase image", image_type=r"\b(P|PHASE)\b", scanning_sequence=r"GR"),
    RoleRule(role=Role.SWI, name="SWI", text=r"(?<![a-z])(swi|swan|swip)|susceptibility|venobold"),
    RoleRule(role=Role.SWI, name="SWI image type", image_type=r"\bSWI\b"),
    # DIR before every FLAIR rule: it is a long-TI spin-echo IR (TI ~3000 ms) and, as a 3D series with more
    # frames than the 2D FLAIR of the same MS protocol, it was chosen as the model's FLAIR.
    RoleRule(role=Role.DIR, name="double inversion recovery by name", text=_DIR),
    # T1 FLAIR before FLAIR: GE "Sag T1 FLAIR" / "Ax T1 FLAIR Post", Philips "T1W_FLAIR", Siemens
    # "t1_tirm_tra_dark-fluid" are T1-weighted (TI 750-1000 ms) and were taken as the model's FLAIR. A
    # FLAIR-named series with such a short TI is one too: CSF is nulled at TI >= ~1500 ms.
    RoleRule(role=Role.T1, name="T1 FLAIR by name", text=_T1_FLAIR),
    RoleRule(role=Role.T1, name="FLAIR-named, short TI", text=_FLAIR, inversion_time_min=300,
             inversion_time_max=1300),
    # FLAIR: Siemens t2_tirm_*_dark-fluid / t2_space_dark-fluid, GE AX/3D FLAIR, FLAIR CUBE, Philips T2W_FLAIR.
    RoleRule(role=Role.FLAIR, name="FLAIR by name", text=_FLAIR),
    # T1: MPRAGE/MP2RAGE (Siemens), BRAVO/SPGR (GE), sT1W_3D_TFE (Philips). Names before sequence
    # parameters: a labelled series is trusted over its TI, an unlabelled one is judged by it.
    RoleRule(role=Role.T1, name="T1 by name",
             text=r"mp-?rage|mp2rage|bravo|spgr|t1w|(?<![a-z0-9])t1|(?<![a-z])tfe(?![a-z])|(?<![a-z])vibe"),
    RoleRule(role=Role.DIR, name="dir with a direction, no contrast named", text=_DIR_WITH_DIRECTION),
    # An MP2RAGE (GR\IR) lists two inversion times too: only a spin-echo or unstated sequence is a DIR.
    RoleRule(role=Role.DIR, name="two inversion times", inversion_count_min=2, scanning_sequence=r"^(?!.*\bGR\b)"),
    RoleRule(role=Role.T1, name="two inversion times, gradient echo (MP2RAGE)", inversion_count_min=2,
             scanning_sequence=r"\bGR\b"),
    # A FLAIR is a spin echo: a gradient-echo IR with a long TI (an MP2RAGE's second inversion) is not one.
    RoleRule(role=Role.FLAIR, name="long-TI inversion recovery T2", scanning_sequence=r"^(?!.*\bGR\b).*\bIR\b",
             inversion_time_min=1500, inversion_time_max=3500),
    RoleRule(role=Role.T1, name="short-TI inversion recovery gradient echo", scanning_sequence=r"\bIR\b.*\bGR\b|"
             r"\bGR\b.*\bIR\b", inversion_time_min=300, inversion_time_max=1300),
    RoleRule(role=Role.T2, name="T2 by name", text=_T2),
]

DEFAULT_ROUTING: list[RoutingRule] = [
    # await_roles stays empty by default: a FLAIR-only study is ready at its release. A site whose router
    # sends each series on its own association sets await_roles = ["QSM"] (one run, with the QSM).
    RoutingRule(name="MR brain to the MS pipeline", action="pipeline", modality=["MR"],
                body_part=r"^$|head|brain|skull|neuro|cerebr|kopf|cran", required_roles=[Role.FLAIR],
                await_roles=[]),
    RoutingRule(name="everything else is stored only", action="store_only", required_roles=[]),
]


class ListenerRules(BaseModel):
    """The ``[rules]`` settings section: role rules and routing rules, both ordered."""

    model_config = ConfigDict(extra="forbid")

    roles: list[RoleRule] = Field(default_factory=lambda: list(DEFAULT_ROLE_RULES))
    routing: list[RoutingRule] = Field(default_factory=lambda: list(DEFAULT_ROUTING))


@dataclass(frozen=True)
class SeriesFields:
    """The series attributes the role rules read (plain strings, multi-values joined with ``\\``).
    ``text`` is the SeriesDescription, ``protocol`` the ProtocolName (see :func:`classify`)."""

    text: str = ""
    protocol: str = ""
    sequence_name: str = ""
    image_type: str = ""
    scanning_sequence: str = ""
    inversion_time: float | None = None
    modality: str = ""
    sop_class: str = ""
    inversion_count: int = 0


NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "REG", "PLAN",
                                  "FID", "AU", "ECG"})
NON_IMAGE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.66.1", "1.2.840.10008.5.1.4.1.1.66.2",
    "1.2.840.10008.5.1.4.1.1.66.3", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5",
    "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.481.3",
})
"""Raw data, registrations, fiducials, segmentations, surfaces, parametric maps, PDF, RT structures: never
an MR series the model reads, whatever the description says ("AX FLAIR lesion segmentation")."""


def is_non_image(fields: SeriesFields) -> bool:
    sop = fields.sop_class
    return (fields.modality.upper() in NON_IMAGE_MODALITIES or sop in NON_IMAGE_CLASSES
            or sop.startswith(("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")))  # SR, KO; states


@dataclass(frozen=True)
class StudyFields:
    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    calling_aet: str = ""


@dataclass(frozen=True)
class Decision:
    role: Role
    role_rule: str
    route: Route
    route_rule: str
    required_roles: tuple[Role, ...]
    await_roles: tuple[Role, ...] = ()


def awaited_absent(await_roles: Iterable[Role | str], present: Iterable[str]) -> list[str]:
    """The awaited roles that no series of the study has (``present``: the series roles), sorted.

    Only a series of the role itself counts. "QSM" is a QSM map series: magnitude/phase sources
    (``QSM_SOURCE``) do not stand in for it, because the model reads a QSM map only
    (``workers.case.ROLES``) and computes none from sources; a study with the sources alone would run
    without QSM all the same, so it keeps waiting for the map. A site can await ``QSM_SOURCE`` by name."""
    have = set(present)
    return sorted({Role(r).value for r in await_roles} - have)


def series_fields(ds: Any) -> SeriesFields:
    """Read the role inputs from a pydicom header (``ds`` is ``pydicom.Dataset``). An Enhanced MR or Legacy
    Converted Enhanced MR header keeps the scanning sequence and inversion time in its functional groups
    (:mod:`msgate.listener.enhanced_fields`): read at the top level only, its FLAIR was a T2."""
    seq = enhanced.converted_text(ds, "SequenceName") or _text(ds, "PulseSequenceName")
    return SeriesFields(text=_text(ds, "SeriesDescription"), protocol=_text(ds, "ProtocolName"),
                        sequence_name=seq, image_type=_text(ds, "ImageType"),
                        scanning_sequence=enhanced.scanning_sequence(ds),
                        inversion_time=enhanced.inversion_time(ds), modality=_text(ds, "Modality"),
                        sop_class=_text(ds, "SOPClassUID"), inversion_count=enhanced.inversion_count(ds))


def study_fields(ds: Any, calling_aet: str = "") -> StudyFields:
    return StudyFields(modality=_text(ds, "Modality"), body_part=_text(ds, "BodyPartExamined"),
                       study_description=_text(ds, "StudyDescription"), calling_aet=calling_aet)


def classify(fields: SeriesFields, rules: list[RoleRule]) -> tuple[Role, str]:
    """The role of a series and the name of the rule that decided it. Non-image objects (SEG, SR, key
    object selections, presentation states, parametric maps, ...) are OTHER before any rule is read.

    The rules read the SeriesDescription first, and SeriesDescription + ProtocolName only when none
    matched: with both in one text, GE's exam-level protocol ("MS BRAIN SWAN", "MS QSM RESEARCH")
    made every series of the exam SWI or QSM, "Ax T2 FLAIR" included, and the study never ran."""
    if is_non_image(fields):
        return Role.OTHER, "not an image series (SOP class or modality)"
    passes = [(fields, "")]
    if fields.protocol:
        both = " | ".join(filter(None, (fields.text, fields.protocol)))
        passes.append((replace(fields, text=both), " (with ProtocolName)"))
    for candidate, note in passes:
        for index, rule in enumerate(rules):
            if rule.matches(candidate):
                return rule.role, (rule.name or f"roles[{index}]") + note
    return Role.OTHER, "no rule matched"


def route(fields: StudyFields, rules: list[RoutingRule]) -> RoutingRule:
    for rule in rules:
        if rule.matches(fields):
            return rule
    return RoutingRule(name="no rule matched", action="store_only", required_roles=[])


def decide(ds: Any, rules: ListenerRules, calling_aet: str = "") -> Decision:
    role, role_rule = classify(series_fields(ds), rules.roles)
    chosen = route(study_fields(ds, calling_aet), rules.routing)
    return Decision(role, role_rule, chosen.action, chosen.name, tuple(chosen.required_roles),
                    tuple(chosen.await_roles))
