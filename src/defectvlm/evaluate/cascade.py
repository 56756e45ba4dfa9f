"""`evaluate-cascade`: the system, not the parts. On the split's test images, the detector
alone (its confidence threshold chosen on val) against detector + VLM (the detector's proposals
at its recall-oriented confidence, judged by the VLM, whose threshold is chosen on val):
box-level precision, recall and F1 at IoU >= 0.5 (greedy matching, detector/metrics.py),
overall (class-agnostic: a defect found is found, whatever it is called) and per class
(class-aware: the detector's class, or the VLM's), false alarms per image, both PR curves on
one plot, and pictures of the false alarms the VLM removed and of the defects it wrongly removed.
A third system, "both agree", scores each proposal with the lower of the detector's confidence
and the VLM's P(abnormal) (a box is kept only when both keep it; its threshold also from val).

The VLM judges each proposal through `predict_images`, the code `predict --proposals detector`
runs (the same prompt builder as training)."""

from __future__ import annotations

from pathlib import Path

from PIL import ImageDraw

from defectvlm.config import Params
from defectvlm.data.images import load_upright
from defectvlm.detector.data import truth_boxes
from defectvlm.detector.loading import ProposalDetector
from defectvlm.detector.metrics import Box, counts_at, detector_metrics, match, pr_curve, scored_hits
from defectvlm.evaluate.metrics import best_f1_threshold
from defectvlm.inference.loading import LoadedModel
from defectvlm.inference.predict import predict_images
from defectvlm.inference.sources import DetectorSource
from defectvlm.io import write_json_atomic

GALLERY_SIZE = 8
CROP_MARGIN = 0.6
SYSTEMS = {"detector": "detector", "cascade": "detector + VLM", "agree": "both agree (min of the two scores)"}
Pairs = list[tuple[list[Box], list[Box]]]


def judged_split(loaded: LoadedModel, proposer: ProposalDetector, records: list[dict], min_box: float) -> dict:
    """Per image: the detector's boxes, the same boxes scored by the VLM, and the truths."""
    by_path = {str(Path(r["path"])): r for r in records}
    # threshold 0: every proposal also gets the VLM's class distribution (the second pass)
    predicted = predict_images(loaded, [Path(p) for p in by_path], DetectorSource(proposer), 0.0, progress=False)
    detector, cascade, paths = [], [], []
    for row in predicted:
        record = by_path[row["image"]]
        truths = [Box(b["xyxy"], b["cls"]) for b in truth_boxes(record, min_box)]
        regions = row.get("regions") or []
        detector.append(([Box(r["xyxy"], r["proposal"]["cls"], r["proposal"]["score"]) for r in regions], truths))
        cascade.append(([Box(r["xyxy"], r["cls"] or r["proposal"]["cls"], r["p_abnormal"]) for r in regions], truths))
        paths.append(record["path"])
    return {"detector": detector, "cascade": cascade, "paths": paths}


def agreed(judged: dict) -> Pairs:
    """The "both agree" system: each proposal scored min(detector confidence, VLM P(abnormal))."""
    return [
        ([Box(c.xyxy, c.cls, min(d.score, c.score)) for d, c in zip(found, scored, strict=True)], truths)
        for (found, truths), (scored, _) in zip(judged["detector"], judged["cascade"], strict=True)
    ]


def system_metrics(pairs: Pairs, threshold: float, classes: list[str]) -> dict:
    per_class = {}
    for cls in classes:
        only = [([p for p in preds if p.cls == cls], [t for t in truths if t.cls == cls]) for preds, truths in pairs]
        per_class[cls] = counts_at(only, threshold, class_aware=True)
    return {"threshold": round(threshold, 6), **counts_at(pairs, threshold, False), "per_class": per_class}


def box_threshold(pairs: Pairs) -> float:
    """The box-score threshold with the best class-agnostic box F1 on these pairs (val); 1.0 when no
    box finds a defect."""
    return best_f1_threshold(*scored_hits(pairs, class_aware=False), nothing_found=1.0)[0]


def evaluate_cascade(
    params: Params, loaded: LoadedModel, proposer: ProposalDetector, splits: dict[str, list[dict]], out: Path
) -> dict:
    """Write cascade_metrics.json, plots/cascade_pr.png, gallery PNGs and cascade_report.md into `out`."""
    min_box = params.regions.min_box_size
    val = judged_split(loaded, proposer, splits["val"], min_box)
    test = judged_split(loaded, proposer, splits["test"], min_box)
    classes = sorted({t.cls for _, truths in val["detector"] + test["detector"] for t in truths})
    detector_t = box_threshold(val["detector"])
    cascade_t = box_threshold(val["cascade"])
    val["agree"], test["agree"] = agreed(val), agreed(test)
    agree_t = box_threshold(val["agree"])
    metrics = {
        "split": "test",
        "images": len(test["paths"]),
        "proposals": {
            "detector": proposer.name,
            "confidence": proposer.confidence,
            "max_boxes": proposer.max_boxes,
            **detector_metrics(test["detector"], classes),
        },
        "detector": system_metrics(test["detector"], detector_t, classes),
        "cascade": system_metrics(test["cascade"], cascade_t, classes),
        "agree": system_metrics(test["agree"], agree_t, classes),
    }
    d = metrics["detector"]
    for key, system in (("gain", "cascade"), ("gain_agree", "agree")):
        c = metrics[system]
        metrics[key] = {
            "precision": round(c["precision"] - d["precision"], 4),
            "recall": round(c["recall"] - d["recall"], 4),
            "false_alarms_per_image_ratio": round(c["false_alarms_per_image"] / d["false_alarms_per_image"], 4)
            if d["false_alarms_per_image"]
            else None,
        }
    out.mkdir(parents=True, exist_ok=True)
    _plot(test, {"detector": detector_t, "cascade": cascade_t, "agree": agree_t}, out / "plots" / "cascade_pr.png")
    gallery = _gallery(test, detector_t, cascade_t, out / "gallery")
    metrics["gallery"] = {kind: len(files) for kind, files in gallery.items()}
    write_json_atomic(out / "cascade_metrics.json", metrics)
    (out / "cascade_report.md").write_text(_report(metrics, gallery), encoding="utf-8")
    return metrics


def _plot(test: dict, thresholds: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, t in thresholds.items():
        scores, hits, truths = scored_hits(test[name], class_aware=False)
        precision, recall, _ = pr_curve(scores, hits, truths)
        (line,) = axis.plot(recall, precision, label=f"{SYSTEMS[name]} (threshold {t:.3g} from val)")
        at = counts_at(test[name], t, False)
        axis.scatter([at["recall"]], [at["precision"]], color=line.get_color(), zorder=3)
    axis.set_xlabel("recall (boxes, IoU >= 0.5)")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower left", fontsize=8)
    axis.set_title("detector alone vs detector + VLM (test)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _gallery(test: dict, detector_t: float, cascade_t: float, folder: Path) -> dict[str, list[str]]:
    """Crops (box drawn) of the detector's false alarms the VLM removed and of the defects the
    detector found that the VLM removed, most confident detector boxes first."""
    found: dict[str, list[tuple[float, str, Box]]] = {"false_alarms_removed": [], "defects_wrongly_removed": []}
    for (det, truths), (judged, _), path in zip(test["detector"], test["cascade"], test["paths"], strict=True):
        kept = [i for i, box in enumerate(det) if box.score >= detector_t]
        hits = match([det[i] for i in kept], truths, class_aware=False)
        for i, hit in zip(kept, hits, strict=True):
            if judged[i].score < cascade_t:
                kind = "defects_wrongly_removed" if hit else "false_alarms_removed"
                found[kind].append((det[i].score, path, det[i]))
    folder.mkdir(parents=True, exist_ok=True)  # there, empty, when the VLM removed nothing (a DVC output)
    written: dict[str, list[str]] = {}
    for kind, items in found.items():
        items.sort(key=lambda item: (-item[0], item[1], tuple(item[2].xyxy)))
        top = items[:GALLERY_SIZE]
        written[kind] = [_crop(path, box, folder / f"{kind}_{n:02d}.png") for n, (_, path, box) in enumerate(top)]
    return written


def _crop(path: str, box: Box, target: Path) -> str:
    image = load_upright(path)
    x1, y1, x2, y2 = box.xyxy
    mx, my = (x2 - x1) * CROP_MARGIN + 16, (y2 - y1) * CROP_MARGIN + 16
    ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=3)
    crop = image.crop((max(0, x1 - mx), max(0, y1 - my), min(image.width, x2 + mx), min(image.height, y2 + my)))
    target.parent.mkdir(parents=True, exist_ok=True)
    crop.save(target)
    return f"{target.parent.name}/{target.name}"


def _report(metrics: dict, gallery: dict[str, list[str]]) -> str:
    d, c, p = metrics["detector"], metrics["cascade"], metrics["proposals"]
    lines = [
        "# Cascade: detector alone vs detector + VLM (test split)",
        "",
        f"Proposals: {p['detector']} at confidence {p['confidence']}, at most {p['max_boxes']} per image: "
        f"recall {p['recall_at_budget']} at IoU 0.5, mAP@0.5 {p['map50']}, {p['proposals_per_image']} per image.",
        "",
        "| system | threshold (val) | precision | recall | F1 | false alarms / image |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {m['threshold']} | {m['precision']} | {m['recall']} | {m['f1']} "
            f"| {m['false_alarms_per_image']} |"
            for name, m in ((SYSTEMS[key], metrics[key]) for key in SYSTEMS)
        ),
        "",
        "Per class (class-aware matching):",
        "",
        "| class | detector P | detector R | cascade P | cascade R |",
        "|---|---|---|---|---|",
        *(
            f"| {cls} | {d['per_class'][cls]['precision']} | {d['per_class'][cls]['recall']} | "
            f"{c['per_class'][cls]['precision']} | {c['per_class'][cls]['recall']} |"
            for cls in d["per_class"]
        ),
        "",
        "![PR curves](plots/cascade_pr.png)",
    ]
    for kind, title in (
        ("false_alarms_removed", "Detector false alarms the VLM removed"),
        ("defects_wrongly_removed", "Defects the detector found and the VLM wrongly removed"),
    ):
        lines += ["", f"## {title} ({len(gallery[kind])} shown)", ""]
        lines += [f"![{kind}]({file})" for file in gallery[kind]] or ["(none)"]
    return "\n".join(lines) + "\n"
