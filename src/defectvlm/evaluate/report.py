"""Evaluation outputs: metrics.json, predictions.jsonl, PNG plots and report.md with a gallery
of the worst false positives and false negatives (crops with the box drawn)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import ImageDraw  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay  # noqa: E402

from defectvlm.data.images import load_upright  # noqa: E402
from defectvlm.evaluate.plot_fonts import cjk_font_rc  # noqa: E402

GALLERY_SIZE = 6
CROP_MARGIN = 0.6  # context around the box, as a fraction of its size


def write_plots(rows: list[dict], metrics: dict, out: Path) -> dict[str, str]:
    """PR and ROC curves (ROI level), score histograms, defect-type confusion matrix."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    truth = np.asarray([int(r["truth"] == "abnormal") for r in rows])
    scores = np.asarray([r["score"] for r in rows])
    written = {}
    if 0 < truth.sum() < len(truth):
        for name, display in (("pr_curve", PrecisionRecallDisplay), ("roc_curve", RocCurveDisplay)):
            figure, axis = plt.subplots(figsize=(4.5, 4))
            display.from_predictions(truth, scores, ax=axis, name="ROI")
            axis.set_title(name.replace("_", " "))
            written[name] = _save(figure, plots / f"{name}.png")
    figure, axis = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 21)
    axis.hist(scores[truth == 0], bins=bins, alpha=0.6, label="normal regions")
    axis.hist(scores[truth == 1], bins=bins, alpha=0.6, label="abnormal regions")
    axis.axvline(metrics["threshold"], color="black", linestyle="--", label="threshold (from val)")
    axis.set_xlabel("P(abnormal)")
    axis.legend()
    written["score_histogram"] = _save(figure, plots / "score_histogram.png")
    confusion = metrics["defect_type"]["confusion_matrix"]
    if confusion["matrix"]:
        with plt.rc_context(cjk_font_rc()):  # the class names may be Chinese
            figure, axis = plt.subplots(figsize=(5.5, 5))
            ConfusionMatrixDisplay(np.asarray(confusion["matrix"]), display_labels=confusion["labels"]).plot(
                ax=axis, colorbar=False, xticks_rotation=45
            )
            axis.set_title("defect type (true abnormal regions)")
            written["confusion_matrix"] = _save(figure, plots / "confusion_matrix.png")
    return written


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plots/{path.name}"


def write_gallery(rows: list[dict], threshold: float, out: Path) -> dict[str, list[dict]]:
    """The highest-scored normal regions above the threshold (false positives) and the lowest-
    scored abnormal regions below it (false negatives), as crops with the box drawn."""
    gallery = out / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    false_pos = sorted(
        (r for r in rows if r["truth"] == "normal" and r["score"] >= threshold), key=lambda r: -r["score"]
    )
    false_neg = sorted(
        (r for r in rows if r["truth"] == "abnormal" and r["score"] < threshold), key=lambda r: r["score"]
    )
    result = {}
    for kind, chosen in (("false_positives", false_pos[:GALLERY_SIZE]), ("false_negatives", false_neg[:GALLERY_SIZE])):
        result[kind] = []
        for row in chosen:
            name = f"{kind}_{row['image_id'].replace('/', '_')}_{row['rid']}.png"
            _crop_with_box(row, gallery / name)
            result[kind].append({**row, "crop": f"gallery/{name}"})
    return result


def _crop_with_box(row: dict, path: Path) -> None:
    image = load_upright(row["path"])
    x1, y1, x2, y2 = row["xyxy"]
    margin_x, margin_y = (x2 - x1) * CROP_MARGIN + 16, (y2 - y1) * CROP_MARGIN + 16
    box = (
        max(0, x1 - margin_x),
        max(0, y1 - margin_y),
        min(image.width, x2 + margin_x),
        min(image.height, y2 + margin_y),
    )
    crop = image.crop(tuple(int(v) for v in box))
    ImageDraw.Draw(crop).rectangle([x1 - box[0], y1 - box[1], x2 - box[0], y2 - box[1]], outline=(255, 40, 40), width=2)
    crop.save(path)


def write_report(metrics: dict, plots: dict[str, str], gallery: dict[str, list[dict]], out: Path) -> None:
    lines = [f"# Evaluation: {metrics['run']} on {metrics['split']}", ""]
    lines += [
        f"Threshold {metrics[metrics['split']]['threshold']:.4f}, chosen on val by ROI-level F1 "
        f"({metrics['val_best_roi_f1']:.4f}) and applied unchanged to {metrics['split']}. Mode: {metrics['mode']}.",
        "",
        "| level | precision | recall | F1 | AUROC | AP | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for title, result in (("fine-tuned", metrics[metrics["split"]]), ("base (phase 0)", metrics.get("baseline"))):
        if not result:
            continue
        for level in ("roi", "image"):
            m = result[level]
            c = m["counts"]
            lines.append(
                f"| {title}, {level} | {m['precision']} | {m['recall']} | {m['f1']} | {m['auroc']} | "
                f"{m['average_precision']} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} |"
            )
    defect = metrics[metrics["split"]]["defect_type"]
    lines += ["", f"Defect-type accuracy on true abnormal regions: {defect['accuracy']}", ""]
    lines += [f"- {cls}: {acc}" for cls, acc in defect["per_class_accuracy"].items()]
    lines += [""] + [f"![{name}]({link})" for name, link in plots.items()]
    for kind, items in gallery.items():
        lines += ["", f"## Worst {kind.replace('_', ' ')}", ""]
        lines += [f"- ![{r['rid']}]({r['crop']}) `{r['image_id']}` {r['rid']} score {r['score']:.3f}" for r in items]
        if not items:
            lines.append("none")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
