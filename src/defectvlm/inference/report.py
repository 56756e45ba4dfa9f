"""predict's outputs: predictions.jsonl (the contract), predictions.csv (one row per region)
and report.html: the counts, every flagged image with its boxes drawn (red: flagged,
green: judged normal) and the unreadable files with their reasons."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import Counter
from pathlib import Path

from PIL import ImageDraw

from defectvlm.data.images import load_upright
from defectvlm.io import write_bytes_atomic, write_jsonl_atomic

THUMBNAIL = 480
FLAGGED, NORMAL = (220, 30, 30), (30, 160, 60)


def write_predictions(records: list[dict], classes: list[str], out: Path) -> dict:
    """Write the three files; returns the counts."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "predictions.jsonl", records)
    write_bytes_atomic(out / "predictions.csv", _csv(records, classes).encode("utf-8"))
    counts = summary(records)
    write_bytes_atomic(out / "report.html", _html(records, counts).encode("utf-8"))
    return counts


def summary(records: list[dict]) -> dict:
    verdicts = Counter(r["verdict"] for r in records)
    per_class = Counter(
        region["cls"]
        for r in records
        for region in r.get("regions", [])
        if region["p_abnormal"] >= r["threshold"] and region["cls"]
    )
    return {
        "images": len(records),
        **{v: verdicts[v] for v in ("abnormal", "normal", "unreadable")},
        "flagged_regions_per_class": dict(sorted(per_class.items())),
    }


def _csv(records: list[dict], classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "image",
            "verdict",
            "image_score",
            "region",
            "x1",
            "y1",
            "x2",
            "y2",
            "p_abnormal",
            "cls",
            *[f"p_{c}" for c in classes],
            "reason",
        ]
    )
    for r in records:
        if r["verdict"] == "unreadable":
            writer.writerow(
                [r["image"], "unreadable", "", "", "", "", "", "", "", "", *[""] * len(classes), r["reason"]]
            )
            continue
        for region in r["regions"] or [None]:
            if region is None:
                writer.writerow([r["image"], r["verdict"], r["score"], *[""] * (7 + len(classes)), ""])
                continue
            probs = region["class_probs"] or {}
            writer.writerow(
                [
                    r["image"],
                    r["verdict"],
                    r["score"],
                    region["id"],
                    *region["xyxy"],
                    region["p_abnormal"],
                    region["cls"] or "",
                    *[probs.get(c, "") for c in classes],
                    "",
                ]
            )
    return buffer.getvalue()


def _drawn(record: dict) -> str:
    """The image with its regions drawn, as an inline PNG (deterministic bytes)."""
    image = load_upright(record["image"])
    scale = min(1.0, THUMBNAIL / max(image.size))
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    for region in record["regions"]:
        flagged = region["p_abnormal"] >= record["threshold"]
        box = [v * scale for v in region["xyxy"]]
        draw.rectangle(box, outline=FLAGGED if flagged else NORMAL, width=3 if flagged else 1)
        if flagged:
            draw.text((box[0] + 2, box[1] + 2), f"{region['id']} {region['cls'] or ''}", fill=FLAGGED)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _html(records: list[dict], counts: dict) -> str:
    e = html.escape
    model = next((r["model"] for r in records if "model" in r), {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>defectvlm predictions</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        "figure{display:inline-block;margin:8px;vertical-align:top}figcaption{max-width:480px;font-size:small}</style>",
        "</head><body><h1>Predictions</h1>",
        f"<p>model {e(str(model.get('uri')))} version {e(str(model.get('version')))}</p>",
        "<table><tr><th>images</th><th>abnormal</th><th>normal</th><th>unreadable</th></tr>",
        f"<tr><td>{counts['images']}</td><td>{counts['abnormal']}</td><td>{counts['normal']}</td>"
        f"<td>{counts['unreadable']}</td></tr></table>",
        "<h2>Flagged regions per class</h2><table><tr><th>class</th><th>regions</th></tr>",
        *[f"<tr><td>{e(c)}</td><td>{n}</td></tr>" for c, n in counts["flagged_regions_per_class"].items()],
        "</table><h2>Flagged images</h2>",
    ]
    for r in records:
        if r["verdict"] != "abnormal":
            continue
        flagged = [g for g in r["regions"] if g["p_abnormal"] >= r["threshold"]]
        caption = f"{e(r['image'])}: score {r['score']:.3f}; " + ", ".join(
            f"#{g['id']} {e(g['cls'] or '?')} {g['p_abnormal']:.3f}" for g in flagged
        )
        parts.append(
            f"<figure><img src='data:image/png;base64,{_drawn(r)}'><figcaption>{caption}</figcaption></figure>"
        )
    unreadable = [r for r in records if r["verdict"] == "unreadable"]
    if unreadable:
        parts.append("<h2>Unreadable images</h2><table><tr><th>image</th><th>reason</th></tr>")
        parts += [f"<tr><td>{e(r['image'])}</td><td>{e(r['reason'])}</td></tr>" for r in unreadable]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
