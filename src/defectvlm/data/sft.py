"""SFT conversations from ROI candidates.

A sample is: a system prompt (task rules, "judge only the listed regions", the defect
glossary), a user turn with the whole image and a `<regions>` block (boxes in the model's
native frame, never drawn on pixels), and an assistant answer with one structured line per
region (`R3: abnormal | slag`, `R1: normal`), optionally followed by a one-line summary.

Train samples draw their question category, phrasing, system prompt and (with
`noise_ratio`) a misleading hint from a generator seeded by (seed, sample id); classes can
be balanced by over- or under-sampling. Val and test are never balanced or noised and
always use the `detect` question with the first system prompt and phrasing, so evaluation
sees one fixed prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from importlib import resources

import yaml

from defectvlm.config import SPLITS, TASKS, SftParams
from defectvlm.errors import StepFailure
from defectvlm.io import read_yaml_file
from defectvlm.seeding import item_rng


@dataclass(frozen=True)
class SftResult:
    splits: dict[str, list[dict]]
    summary: dict


def load_yaml_resource(path: str, builtin: str, setting: str = "") -> dict:
    if path:
        loaded = read_yaml_file(path, setting)
        if not isinstance(loaded, dict):
            raise StepFailure(f"{path} ({setting}): expected a YAML mapping, got {type(loaded).__name__}")
        return loaded
    return yaml.safe_load(resources.files("defectvlm.data").joinpath("templates", builtin).read_text("utf-8"))


TEMPLATE_TEXTS = ("glossary_line", "hint", "region_line", "regions_block")
ANSWER_TEXTS = (
    "normal_line",
    "abnormal_line",
    "summary_none",
    "summary_some",
    "summary_item",
    "item_separator",
    "cause",
    "count",
)


def load_templates(params: SftParams) -> dict:
    """The template set, checked: a missing key or a non-text entry names the file and key."""
    source = params.templates or f"built-in {params.language}.yaml"
    templates = load_yaml_resource(params.templates, f"{params.language}.yaml", "sft.templates")

    def text(value, key: str) -> None:
        if not isinstance(value, str):
            raise StepFailure(f"{source}: {key} must be text, got {type(value).__name__} (quote it in YAML)")

    for key in TEMPLATE_TEXTS:
        text(templates.get(key), key)
    for key in ANSWER_TEXTS:
        text(templates.get("answers", {}).get(key), f"answers.{key}")
    for key in ("wrong_class", "false_alarm", "missed"):
        text(templates.get("claims", {}).get(key), f"claims.{key}")
    for i, value in enumerate(templates.get("system") or [None]):
        text(value, f"system[{i}]")
    for task in TASKS:
        for i, value in enumerate(templates.get("questions", {}).get(task) or [None]):
            text(value, f"questions.{task}[{i}]")
    return templates


def load_knowledge(params: SftParams) -> dict:
    knowledge = load_yaml_resource(params.knowledge, "knowledge.yaml", "sft.knowledge")
    if not isinstance(knowledge.get("classes"), dict):
        raise StepFailure(f"{params.knowledge} (sft.knowledge): needs a `classes:` mapping of class -> facts")
    return knowledge["classes"]


# --- rendering -------------------------------------------------------------------------


def glossary(templates: dict, knowledge: dict, classes: list[str], language: str) -> str:
    return "\n".join(
        templates["glossary_line"].format(
            cls=cls, name=knowledge[cls][language], description=knowledge[cls]["description"][language]
        )
        for cls in classes
    )


def regions_block(templates: dict, regions: list[dict]) -> str:
    lines = [
        templates["region_line"].format(rid=r["rid"], x1=r["box"][0], y1=r["box"][1], x2=r["box"][2], y2=r["box"][3])
        for r in sorted(regions, key=_rid_number)
    ]
    return templates["regions_block"].format(lines="\n".join(lines))


def user_content(image: dict, question: str, templates: dict, params: SftParams) -> list[dict]:
    """The whole image, the question and the <regions> block; with coords+crops every region's
    line is followed by its crop (an image part carrying the crop box and size)."""
    whole = {"type": "image", "image": image["path"]}
    if params.region_encoding == "coords":
        return [whole, {"type": "text", "text": f"{question}\n{regions_block(templates, image['regions'])}"}]
    opening, closing = templates["regions_block"].split("{lines}")
    parts = [whole, {"type": "text", "text": f"{question}\n{opening}"}]
    for i, region in enumerate(sorted(image["regions"], key=_rid_number)):
        box = region["box"]
        line = templates["region_line"].format(rid=region["rid"], x1=box[0], y1=box[1], x2=box[2], y2=box[3])
        parts.append({"type": "text", "text": ("\n" if i else "") + line + " "})
        parts.append({"type": "image", "image": image["path"], "crop": region["xyxy"], "size": params.crop_size})
    parts.append({"type": "text", "text": closing})
    return parts


def region_line(templates: dict, region: dict) -> str:
    answers = templates["answers"]
    if region["label"] == "abnormal":
        return answers["abnormal_line"].format(rid=region["rid"], cls=region["cls"])
    return answers["normal_line"].format(rid=region["rid"])


def structured_lines(templates: dict, regions: list[dict]) -> list[str]:
    """The loss-bearing answer lines, one per region in R1..Rk order."""
    return [region_line(templates, r) for r in sorted(regions, key=_rid_number)]


def _rid_number(region: dict) -> int:
    return int(region["rid"][1:])


def _summary(templates: dict, knowledge: dict, regions: list[dict], language: str) -> str:
    answers = templates["answers"]
    abnormal = [r for r in sorted(regions, key=_rid_number) if r["label"] == "abnormal"]
    if not abnormal:
        return answers["summary_none"]
    items = answers["item_separator"].join(
        answers["summary_item"].format(rid=r["rid"], name=knowledge[r["cls"]][language]) for r in abnormal
    )
    return answers["summary_some"].format(n=len(abnormal), items=items)


# --- one sample ------------------------------------------------------------------------


def eligible_tasks(image: dict) -> list[str]:
    tasks = ["detect", "classify", "count"]
    if any(r["label"] == "abnormal" for r in image["regions"]):
        tasks.append("explain")
    if image["label"] == "normal":
        tasks.append("confirm_normal")
    return tasks


def build_sample(
    image: dict,
    split: str,
    sample_id: str,
    params: SftParams,
    templates: dict,
    knowledge: dict,
    classes: list[str],
) -> dict:
    """One conversation for one image (see the module doc)."""
    language = params.language
    regions = image["regions"]
    train = split == "train"
    rng = item_rng(params.seed, sample_id)

    task = _choose_task(rng, image, params) if train else "detect"
    system_index = rng.randrange(len(templates["system"])) if train else 0
    question_index = rng.randrange(len(templates["questions"][task])) if train else 0
    target = None
    if task == "explain":
        target = _pick(rng, [r for r in regions if r["label"] == "abnormal"])
    elif task == "classify":
        target = _pick(rng, regions)

    system = templates["system"][system_index].format(glossary=glossary(templates, knowledge, classes, language))
    noise = _noise_claim(rng, regions, templates, knowledge, classes, language) if train else None
    if train and noise is not None and rng.random() >= params.noise_ratio:
        noise = None
    if noise is not None:
        system += "\n" + templates["hint"].format(claim=noise["claim"])

    question = templates["questions"][task][question_index].format(rid=target["rid"] if target else "")
    answer = _answer(task, target, rng, templates, knowledge, regions, params)
    return {
        "id": sample_id,
        "image_id": image["id"],
        "split": split,
        "task": task,
        "images": [image["path"]],
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user_content(image, question, templates, params)},
            {"role": "assistant", "content": answer},
        ],
        "meta": {
            "blake3": image["blake3"],  # pins the image content: the split file's digest is the data version
            "label": image["label"],
            "family": image["family"],
            "frame": image["frame"],
            "regions": [
                {k: r[k] for k in ("rid", "box", "xyxy", "label", "cls", "source")}
                for r in sorted(regions, key=_rid_number)
            ],
            "target": target["rid"] if target else None,
            "template": {"system": system_index, "question": question_index},
            "noise": noise,
        },
    }


def _choose_task(rng: random.Random, image: dict, params: SftParams) -> str:
    tasks = [t for t in eligible_tasks(image) if params.task_weights.get(t, 0) > 0]
    return rng.choices(tasks, weights=[params.task_weights[t] for t in tasks])[0]


def _pick(rng: random.Random, items: list[dict]) -> dict:
    return items[rng.randrange(len(items))]


def _answer(
    task: str,
    target: dict | None,
    rng: random.Random,
    templates: dict,
    knowledge: dict,
    regions: list[dict],
    params: SftParams,
) -> str:
    answers = templates["answers"]
    language = params.language
    if task in ("classify", "explain"):
        lines = [region_line(templates, target)]
        if task == "explain":
            causes = knowledge[target["cls"]]["causes"][language]
            lines.append(answers["cause"].format(cause=causes[rng.randrange(len(causes))]))
        return "\n".join(lines)
    lines = structured_lines(templates, regions)
    if task == "count":
        n = sum(r["label"] == "abnormal" for r in regions)
        return "\n".join([answers["count"].format(n=n), *lines])
    if params.summary:
        lines.append(_summary(templates, knowledge, regions, language))
    return "\n".join(lines)


def _noise_claim(
    rng: random.Random, regions: list[dict], templates: dict, knowledge: dict, classes: list[str], language: str
) -> dict | None:
    """A wrong statement about one region (the answer stays correct)."""
    region = _pick(rng, regions) if regions else None
    if region is None:
        return None
    claims = templates["claims"]
    if region["label"] == "abnormal":
        others = [c for c in classes if c != region["cls"]]
        if others and rng.random() < 0.5:
            wrong = others[rng.randrange(len(others))]
            claim = claims["wrong_class"].format(rid=region["rid"], name=knowledge[wrong][language])
            return {"type": "wrong_class", "rid": region["rid"], "claim": claim}
        return {"type": "missed", "rid": region["rid"], "claim": claims["missed"].format(rid=region["rid"])}
    wrong = classes[rng.randrange(len(classes))]
    claim = claims["false_alarm"].format(rid=region["rid"], name=knowledge[wrong][language])
    return {"type": "false_alarm", "rid": region["rid"], "claim": claim}


# --- whole splits ----------------------------------------------------------------------


def balance(images: list[dict], mode: str, seed: int) -> tuple[list[tuple[dict, int]], dict]:
    """(image, copy number) pairs after class balancing of abnormal images; normal ones pass.

    An abnormal image counts for its rarest class. `oversample` repeats images of smaller
    classes up to the largest; `undersample` keeps a seeded subset of each larger class."""
    by_class: dict[str, list[dict]] = {}
    frequency = Counter(r["cls"] for img in images for r in img["regions"] if r["label"] == "abnormal")
    normal = [(img, 0) for img in images if img["label"] == "normal"]
    for img in images:
        classes = {r["cls"] for r in img["regions"] if r["label"] == "abnormal"}
        if img["label"] == "abnormal" and classes:
            by_class.setdefault(min(classes, key=lambda c: (frequency[c], c)), []).append(img)
        elif img["label"] == "abnormal":
            normal.append((img, 0))  # every positive was filtered; it is kept as is
    before = {c: len(v) for c, v in sorted(by_class.items())}
    if mode == "none" or not by_class:
        chosen = [(img, 0) for imgs in by_class.values() for img in imgs]
    else:
        target = (max if mode == "oversample" else min)(before.values())
        chosen = []
        for cls, imgs in sorted(by_class.items()):
            order = sorted(imgs, key=lambda img: item_rng(seed, f"balance\0{cls}\0{img['id']}").random())
            if mode == "undersample":
                chosen += [(img, 0) for img in order[:target]]
            else:
                chosen += [(img, 0) for img in order]
                chosen += [(order[k % len(order)], 1 + k // len(order)) for k in range(target - len(order))]
    after = Counter()
    for img, _ in chosen:
        classes = {r["cls"] for r in img["regions"] if r["label"] == "abnormal"}
        after[min(classes, key=lambda c: (frequency[c], c))] += 1
    return normal + chosen, {
        "mode": mode,
        "images_per_class_before": before,
        "images_per_class_after": dict(sorted(after.items())),
    }


def prompt_parts(image: dict, sample_id: str, params: SftParams) -> list[tuple[dict, str]]:
    """The image's conversations: all its regions in one, or (sft.regions_per_prompt = k) runs of
    at most k regions in rid order, as predict chunks new images' regions (their rids, hence
    their lines, keep counting from the run before: R1-R2, R3-R4, ...)."""
    size = params.regions_per_prompt
    regions = sorted(image["regions"], key=_rid_number)
    if not size or len(regions) <= size:
        return [(image, sample_id)]
    return [
        ({**image, "regions": regions[first : first + size]}, f"{sample_id}@{regions[first]['rid']}")
        for first in range(0, len(regions), size)
    ]


def build_sft(regions: dict[str, list[dict]], params: SftParams, templates: dict, knowledge: dict) -> SftResult:
    classes = sorted(
        {r["cls"] for rows in regions.values() for img in rows for r in img["regions"] if r["label"] == "abnormal"}
    )
    missing = [c for c in classes if c not in knowledge]
    if missing:
        raise StepFailure(f"classes missing from the knowledge YAML (sft.knowledge): {', '.join(missing)}")
    result, summary = {}, {"language": params.language, "classes": classes, "splits": {}}
    for split in SPLITS:
        images = regions[split]
        if split == "train":
            pairs, balance_report = balance(images, params.balance, params.seed)
        else:
            pairs, balance_report = [(img, 0) for img in images], {"mode": "none"}
        samples = [
            build_sample(part, split, sample_id, params, templates, knowledge, classes)
            for img, copy in pairs
            for part, sample_id in prompt_parts(img, img["id"] if copy == 0 else f"{img['id']}#{copy}", params)
        ]
        samples.sort(key=lambda s: s["id"])
        result[split] = samples
        summary["splits"][split] = {
            "images": len(images),
            "samples": len(samples),
            "tasks": dict(sorted(Counter(s["task"] for s in samples).items())),
            "noised": sum(s["meta"]["noise"] is not None for s in samples),
            "balance": balance_report,
        }
    return SftResult(result, summary)
