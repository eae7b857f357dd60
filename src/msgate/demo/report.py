"""The demo's outputs: values read back from the received ORU, key images as PNG, an HTML summary."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from msgate.results import codes

FIELDS = {
    codes.EDSS_CLASS.value: "edss_class",
    codes.EDSS_ESTIMATE.value: "edss_estimate",
    codes.CONFIDENCE.value: "confidence",
    codes.UNCERTAINTY.value: "uncertainty",
    codes.DIAGNOSIS.value: "diagnosis",
    codes.P_MS.value: "p_ms",
    codes.LESION_COUNT.value: "lesion_count",
    codes.LESION_VOLUME_TOTAL.value: "lesion_volume_ml",
    codes.RIM_COUNT.value: "rim_count",
}


def oru_values(message: str) -> dict[str, Any]:
    """OBX values of an ORU^R01 by msgate's codes, parsed with python-hl7 (an independent reader)."""
    import hl7

    parsed = hl7.parse(message.replace("\n", "\r"))
    out: dict[str, Any] = {}
    for segment in parsed.segments("OBX"):
        code = str(segment[3][0][0]) if segment[3] else ""
        name = FIELDS.get(code)
        if name is None:
            continue
        value = str(segment[5])
        if str(segment[2]) == "NM":
            out[name] = float(value)
        else:
            out[name] = value.split("^")[1] if "^" in value else value
    nte = [str(s[3]) for s in parsed.segments("NTE")] if _has(parsed, "NTE") else []
    out["notes"] = nte
    return out


def _has(parsed: Any, name: str) -> bool:
    try:
        parsed.segments(name)
    except KeyError:
        return False
    return True


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ALGORITHM_PARAMETERS = "111002"  # DCM "Algorithm Parameters" (TID 4019)


def sr_parameters(ds: Any) -> list[str]:
    """Every TID 4019 "Algorithm Parameters" text of an SR, as received (walks the content tree)."""
    found: list[str] = []
    for item in getattr(ds, "ContentSequence", []):
        names = getattr(item, "ConceptNameCodeSequence", [])
        if names and str(names[0].CodeValue) == ALGORITHM_PARAMETERS and hasattr(item, "TextValue"):
            found.append(str(item.TextValue))
        found += sr_parameters(item)
    return found


def key_images(pacs_objects: list[Any], out: Path) -> list[Path]:
    """The RGB Secondary Capture key images among what the PACS stand-in received, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ds in pacs_objects:
        if str(ds.SOPClassUID) != SECONDARY_CAPTURE:
            continue
        pixels = np.asarray(ds.pixel_array)
        path = out / f"key_{str(ds.PatientID)}_{len(paths) + 1}.png"
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            plt.imsave(path, pixels.astype(np.uint8))
        else:
            plt.imsave(path, pixels, cmap="gray")
        paths.append(path)
    return paths


def write_html(rows: list[dict[str, Any]], images: list[Path], out: Path) -> Path:
    def cell(value: Any) -> str:
        return f"<td>{html.escape(str(value))}</td>"

    body = ["<h1>msgate demo</h1><p>Synthetic patients. Unverified AI output, not for diagnosis.</p>",
            "<table border=1 cellpadding=4><tr><th>patient</th><th>kind</th><th>EDSS class</th>"
            "<th>confidence</th><th>MS vs cSVD</th><th>P(MS)</th><th>lesions</th><th>Rim+</th>"
            "<th>truth</th><th>SR</th><th>ORU</th><th>stage times (s)</th></tr>"]
    for row in rows:
        r, t = row["result"], row["truth"]
        body.append("<tr>" + "".join(cell(v) for v in (
            row["subject"], row["kind"], r.get("edss_class", "-"), r.get("confidence", "-"),
            r.get("diagnosis", "-"), r.get("p_ms", "-"), r.get("lesion_count", "-"), r.get("rim_count", "n/a"),
            f"{t['diagnosis']}, EDSS {t['edss']}, {t['lesions']} lesions, {t['rims']} rims",
            row["sr"]["destination"] if row["sr"]["count"] else "missing",
            row["oru"]["destination"] if row["oru"]["received"] else "missing",
            ", ".join(f"{k} {v}" for k, v in row["stages_s"].items()))) + "</tr>")
    body.append("</table>")
    body += [f'<p><img src="{html.escape(p.name)}" width=320></p>' for p in images]
    path = out / "summary.html"
    path.write_text("<!doctype html><meta charset=utf-8><title>msgate demo</title>" + "\n".join(body))
    return path
