"""ORU details: HE results say so (SR algorithm parameters and an NTE); one OBX group per lesion."""

from __future__ import annotations

from dataclasses import replace

from msgate.config import load_settings
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.results.identity import HE_PARAMETER, Identity
from tests.integration.pacs_peers import flair_series, model_result


def _oru(flags: tuple[str, ...]) -> list[str]:
    result = replace(model_result((12, 40, 48)), flags=flags)
    text = render_oru(result, source=flair_series()[0], numbers=OrderNumbers("P1", "F1", "A1"), sr_uid="1.2.3",
                      correction=False, settings=load_settings())
    return [line for line in text.split("\r") if line.startswith("NTE")]


def test_he_result_is_marked_in_sr_and_oru() -> None:
    plain, he = model_result((12, 40, 48)), replace(model_result((12, 40, 48)), flags=("he",))
    assert Identity.of(plain).parameters == ()
    parameters = [item.TextValue for item in Identity.of(he).algorithm if item.ConceptNameCodeSequence[0].CodeValue
                  == "111002"]
    assert parameters == [HE_PARAMETER]
    assert len(_oru(())) == 1
    assert _oru(("he",))[1].endswith(HE_PARAMETER)


def test_each_lesion_gets_its_obx_group() -> None:
    import hl7

    result = model_result((12, 40, 48))
    text = render_oru(result, source=flair_series()[0], numbers=OrderNumbers("P1", "F1", "A1"), sr_uid="1.2.3",
                      correction=False, settings=load_settings())
    obx = hl7.parse(text).segments("OBX")
    by_lesion: dict[str, list[str]] = {}
    for segment in obx:
        if str(segment[4]):
            by_lesion.setdefault(str(segment[4]), []).append(str(segment[3][0][0]))
    assert set(by_lesion) == {str(lesion.label) for lesion in result.lesions}
    for lesion in result.lesions:
        codes_seen = by_lesion[str(lesion.label)]
        assert "LES-VOL-1" in codes_seen and ("P-PRL" in codes_seen) == (lesion.rim_probability is not None)
