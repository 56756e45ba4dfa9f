"""The scoring pass: one forward per image with the structured answer teacher-forced.

For every region line `Rk: normal|abnormal | <class>` the logits just before the label word
give P(abnormal) (a softmax over the first tokens of " abnormal" and " normal"), and for true
abnormal regions the logits before the class word give the defect-type distribution (over
each class's first token). Image score = max region score. No generation: fast and
deterministic. `generate_answers` + `parse_answer` are the slow free-text alternative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from defectvlm.errors import StepFailure
from defectvlm.train.data import Collator, SftDataset

_LINE = r"R(\d+)\s*[:：]\s*(abnormal|normal|异常|正常)\s*(?:[|｜]\s*([A-Za-z_][\w-]*))?"
LINE = re.compile(rf"^\s*{_LINE}", re.IGNORECASE)  # the canonical answer: a line starts with its region id
LOOSE_LINE = re.compile(_LINE, re.IGNORECASE)  # free text: anywhere in a line


@dataclass(frozen=True)
class Vocabulary:
    """Token ids that decide a region's label and class, taken from the tokenizer itself."""

    abnormal: int
    normal: int
    classes: dict[str, int]


def _first_difference(tokenizer, texts: list[str]) -> list[int]:
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    position = 0
    while all(len(e) > position for e in encoded) and len({e[position] for e in encoded}) == 1:
        position += 1
    return [e[position] for e in encoded]


def vocabulary(tokenizer, classes: list[str]) -> Vocabulary:
    abnormal, normal = _first_difference(tokenizer, ["R1: abnormal | x", "R1: normal"])
    firsts = _first_difference(tokenizer, [f"R1: abnormal | {c}" for c in classes]) if len(classes) > 1 else []
    if len(classes) == 1:
        firsts = [tokenizer(f" {classes[0]}", add_special_tokens=False)["input_ids"][0]]
    if len(set(firsts)) != len(firsts):
        raise StepFailure(f"classes {classes} share a first token in this tokenizer; rename them in labels.label_map")
    return Vocabulary(abnormal, normal, dict(zip(classes, firsts, strict=True)))


def answer_positions(tokenizer, answer: str) -> tuple[list[int], dict[str, tuple[int, int | None]]]:
    """Tokens of the answer and, per region id, the token index of its label word and class word."""
    encoding = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    starts = {start: i for i, (start, end) in enumerate(encoding["offset_mapping"]) if end > start}
    positions: dict[str, tuple[int, int | None]] = {}
    offset = 0
    for line in answer.split("\n"):
        match = LINE.match(line)
        if match:
            label_char = offset + match.start(2) - 1  # the label word's token starts at the space before it
            class_char = offset + match.start(3) - 1 if match.group(3) else None
            if label_char not in starts or (class_char is not None and class_char not in starts):
                raise StepFailure(f"the tokenizer does not start a token at the label of {line!r}")
            positions[f"R{match.group(1)}"] = (starts[label_char], starts[class_char] if class_char else None)
        offset += len(line) + 1
    return encoding["input_ids"], positions


@torch.no_grad()
def score_samples(model, processor, samples: list[dict], classes: list[str], batch_size: int = 4) -> list[dict]:
    """Per region: score = P(abnormal), class probabilities (true abnormal regions), truth."""
    tokenizer = processor.tokenizer
    vocab = vocabulary(tokenizer, classes)
    class_ids = torch.tensor(list(vocab.classes.values()))
    collate = Collator(processor)
    dataset = SftDataset(samples, processor)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(samples))))
        batch = collate([dataset[i] for i in chunk])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        hidden = _last_hidden_state(model, inputs)
        for row, index in enumerate(chunk):
            sample = samples[index]
            answer = sample["messages"][2]["content"]
            answer_ids, positions = answer_positions(tokenizer, answer)
            labels = batch["labels"][row]
            answer_start = int((labels != -100).nonzero()[0])
            found = batch["input_ids"][row, answer_start : answer_start + len(answer_ids)].tolist()
            if found != answer_ids:
                raise StepFailure(f"{sample['id']}: the answer tokenizes differently inside the conversation")
            for region in sample["meta"]["regions"]:
                label_at, class_at = positions[region["rid"]]
                logits = _lm_head(model, hidden[row, answer_start + label_at - 1])
                pair = torch.softmax(logits[[vocab.abnormal, vocab.normal]].float(), dim=0)
                result = region_row(sample, region, float(pair[0]))
                if class_at is not None:
                    class_logits = _lm_head(model, hidden[row, answer_start + class_at - 1])
                    probs = torch.softmax(class_logits[class_ids].float(), dim=0)
                    result["class_probs"] = {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}
                    result["pred_cls"] = classes[int(probs.argmax())]
                rows.append(result)
    model.train(was_training)
    return rows


def region_row(sample: dict, region: dict, score: float) -> dict:
    """One prediction: where the region is, its truth, and P(abnormal)."""
    return {
        "image_id": sample["image_id"],
        "image_label": sample["meta"]["label"],
        "path": sample["images"][0],
        "rid": region["rid"],
        "xyxy": region["xyxy"],
        "truth": region["label"],
        "truth_cls": region["cls"],
        "score": score,
    }


def _causal_lm(model):
    """The transformers *ForConditionalGeneration inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _last_hidden_state(model, inputs: dict) -> torch.Tensor:
    return _causal_lm(model).model(**inputs).last_hidden_state


def _lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    return _causal_lm(model).lm_head(hidden)


def image_scores(rows: list[dict]) -> dict[str, dict]:
    """Image id -> {score: max region score, truth: its label}."""
    images: dict[str, dict] = {}
    for row in rows:
        image = images.setdefault(row["image_id"], {"score": 0.0, "truth": row["image_label"], "path": row["path"]})
        image["score"] = max(image["score"], row["score"])
    return images


# --- free-text generation (the slow alternative) ---------------------------------------


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict], max_new_tokens: int | list[int] = 160) -> list[str]:
    """Greedy answers; `max_new_tokens` for all samples or one budget per sample."""
    from defectvlm.train.data import image_parts, load_part

    model.eval()
    device = next(model.parameters()).device
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(samples)
    answers = []
    for sample, budget in zip(samples, budgets, strict=True):
        prompt = processor.apply_chat_template(sample["messages"][:-1], tokenize=False, add_generation_prompt=True)
        cache: dict = {}
        images = [load_part(part, cache) for part in image_parts(sample)]
        inputs = processor(text=[prompt], images=images, return_tensors="pt").to(device)
        inputs.pop("mm_token_type_ids", None)
        output = _causal_lm(model).generate(**inputs, max_new_tokens=budget, do_sample=False)
        answers.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def parse_answer(text: str, region_ids: list[str], classes: list[str]) -> dict:
    """Lenient: lines like `R2: abnormal | slag` (also 异常/正常, full-width colon/bar, extra text).
    Never raises; regions without a readable line and unknown classes are counted."""
    found: dict[str, tuple[str, str | None]] = {}
    unknown_classes = 0
    for line in str(text or "").splitlines():
        match = LOOSE_LINE.search(line)
        if not match or f"R{match.group(1)}" not in region_ids or f"R{match.group(1)}" in found:
            continue
        label = "abnormal" if match.group(2).lower() in ("abnormal", "异常") else "normal"
        cls = match.group(3)
        if cls is not None and cls not in classes:
            unknown_classes += 1
            cls = None
        found[f"R{match.group(1)}"] = (label, cls)
    missing = [rid for rid in region_ids if rid not in found]
    return {"regions": found, "missing": missing, "unknown_classes": unknown_classes}
