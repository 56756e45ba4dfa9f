"""The scoring pass: one forward per batch with the structured answer teacher-forced.

Every region line `Rk: abnormal | <class>` (any spacing, ':' or '：', '|' or '｜', 异常/正常,
any class string) holds decisions: its label word and, on abnormal lines, its class. A decision
is scored by the log-probability of each alternative's whole token sequence at its place in the
answer: P(abnormal) is a softmax over "abnormal" and "normal" (in the answer's language), the
defect-type distribution a softmax over every class followed by what ends its line (so a class
that is a token-prefix of another is not favoured). The alternatives' tokens ride along in the
same forward as branches appended to their row, which see the conversation only up to their
place (a tree-shaped attention mask) at the positions they would have there. One forward and
one LM-head call per batch score everything; `shard` splits the samples over ranks with the
same number of batches on each (ZeRO-3 gathers parameters on every call). Image score = max
region score. `generate_answers` + `parse_answer` are the slow free-text alternative.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from defectvlm.errors import StepFailure
from defectvlm.evaluate.shared_prefix import SharedPrefix, additive_mask, collate_shared, shared_forward
from defectvlm.train.data import IGNORE_INDEX, Collator, SftDataset

LABEL_WORDS = (("abnormal", "normal"), ("异常", "正常"))  # (abnormal, normal) per answer language


def line_pattern(classes: Sequence[str], anywhere: bool = False) -> re.Pattern:
    """An answer line `R2: abnormal | slag`; the known classes are matched whole (longest first),
    anything else up to a space or bar is an unknown class. `anywhere`: inside free text."""
    known = "|".join(re.escape(c) for c in sorted(classes, key=len, reverse=True))
    cls = rf"(?:{known})(?![\w-])|[^\s|｜]+" if known else r"[^\s|｜]+"
    labels = "|".join(word for pair in LABEL_WORDS for word in pair)
    line = rf"R(?P<rid>\d+)\s*[:：]\s*(?P<label>{labels})(?:\s*[|｜]\s*(?P<cls>{cls}))?"
    return re.compile(line if anywhere else rf"^\s*{line}", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    """One choice in an answer: the answer text before it, its alternatives, and the text that
    follows every alternative (a class's line end; empty for a label)."""

    rid: str
    kind: str  # "label" (alternatives: abnormal, normal) or "class" (alternatives: the classes)
    context: str
    alternatives: tuple[str, ...]
    ending: str = ""


def _label_alternatives(word: str) -> tuple[str, str]:
    """(abnormal, normal) in the language and capitalisation of `word`."""
    abnormal, normal = next(pair for pair in LABEL_WORDS if word.lower() in pair)
    if word.isupper():
        return abnormal.upper(), normal.upper()
    if word[0].isupper():
        return abnormal.capitalize(), normal.capitalize()
    return abnormal, normal


def answer_decisions(answer: str, classes: Sequence[str], turn_end: str) -> dict[tuple[str, str], Decision]:
    """(region id, kind) -> Decision for every region line of a canonical answer (first line
    wins); `turn_end` is the text that closes the assistant turn (it ends a class on the last line)."""
    pattern = line_pattern(classes)
    decisions: dict[tuple[str, str], Decision] = {}
    offset = 0
    for line in answer.split("\n"):
        match = pattern.match(line)
        if match:
            rid = f"R{match['rid']}"
            label = Decision(rid, "label", answer[: offset + match.start("label")], _label_alternatives(match["label"]))
            decisions.setdefault((rid, "label"), label)
            if match["cls"] is not None and classes:
                line_end = offset + len(line)
                rest = answer[offset + match.end("cls") : line_end + 1]
                ending = rest if line_end < len(answer) else rest + turn_end
                context = answer[: offset + match.start("cls")]
                decisions.setdefault((rid, "class"), Decision(rid, "class", context, tuple(classes), ending))
        offset += len(line) + 1
    return decisions


@dataclass(frozen=True)
class Branch:
    """An alternative's tokens, replacing its row's tokens from index `start` on."""

    row: int
    start: int
    tokens: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@functools.lru_cache(maxsize=8192)
def _token_ids(tokenizer, text: str) -> tuple[int, ...]:
    """The answer texts repeat from image to image (the same regions' lines, the same classes):
    each is tokenised once per process."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def decision_branches(tokenizer, decision: Decision, turn_ids: list[int]) -> tuple[int, list[list[int]]]:
    """Where the alternatives leave the answer's tokens (an index into `turn_ids`, the tokens of
    the assistant turn), and each alternative's tokens from there on, found by tokenising the
    answer text before the decision with each alternative and its ending."""
    whole = [
        _token_ids(tokenizer, decision.context + alternative + decision.ending) for alternative in decision.alternatives
    ]
    start = min(_common_prefix(ids, turn_ids) for ids in whole)
    branches = [list(ids[start:]) for ids in whole]
    if not all(branches):
        raise StepFailure(
            f"{decision.rid}: the alternatives {list(decision.alternatives)} tokenize to the same tokens; "
            "rename the classes in labels.label_map"
        )
    return start, branches


def _with_branches(
    inputs: dict, branches: list[Branch], pad_id: int, positions: torch.Tensor
) -> tuple[dict, torch.Tensor, list[int]]:
    """The batch with every branch appended after its row: a branch sees its row's tokens before
    its start and its own earlier tokens, at the positions its tokens would have in place.
    `positions`: the model's own position ids of the batch, (rows, length) or, for M-RoPE,
    (sections, rows, length); a branch is text, so its j-th token sits at its start's position + j.
    Returns the batch (without its attention mask), which tokens each token sees (rows, length,
    length) and where each branch was placed."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
    rows, length = input_ids.shape
    used = [0] * rows
    placed = []
    for branch in branches:
        placed.append(length + used[branch.row])
        used[branch.row] += len(branch.tokens)
    total = length + max(used, default=0)
    ids = torch.full((rows, total), pad_id, dtype=input_ids.dtype)
    ids[:, :length] = input_ids
    extended_positions = torch.zeros((*positions.shape[:-1], total), dtype=positions.dtype)
    extended_positions[..., :length] = positions
    allowed = torch.zeros(rows, total, total, dtype=torch.bool)
    allowed[:, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril() & attention_mask[:, None, :]
    for branch, at in zip(branches, placed, strict=True):
        n = len(branch.tokens)
        span = slice(at, at + n)
        ids[branch.row, span] = torch.tensor(branch.tokens, dtype=input_ids.dtype)
        start = extended_positions[..., branch.row, branch.start]
        extended_positions[..., branch.row, span] = start[..., None] + torch.arange(n)
        allowed[branch.row, span, : branch.start] = attention_mask[branch.row, : branch.start]
        allowed[branch.row, span, span] = torch.ones(n, n, dtype=torch.bool).tril()
    allowed |= torch.eye(total, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    extended = {**inputs, "input_ids": ids, "position_ids": extended_positions}
    del extended["attention_mask"]
    if "mm_token_type_ids" in inputs:  # branch tokens are text (type 0)
        types = torch.zeros((rows, total), dtype=inputs["mm_token_type_ids"].dtype)
        types[:, :length] = inputs["mm_token_type_ids"]
        extended["mm_token_type_ids"] = types
    return extended, allowed, placed


def model_positions(model, inputs: dict) -> torch.Tensor:
    """The position ids the model itself gives this batch: M-RoPE's (sections, rows, length) for
    the Qwen-VL families (from the image grid and token types), else 0..length-1 per row."""
    base = _causal_lm(model).model
    rows, length = inputs["input_ids"].shape
    if hasattr(base, "compute_3d_position_ids") and inputs.get("mm_token_type_ids") is not None:
        saved = getattr(base, "rope_deltas", None)
        positions = base.compute_3d_position_ids(
            input_ids=inputs["input_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=None,
            inputs_embeds=None,
            attention_mask=inputs["attention_mask"],
            past_key_values=None,
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        base.rope_deltas = saved
        if positions is not None:
            return positions.cpu()
    return torch.arange(length).repeat(rows, 1)


def branch_logprobs(
    model, inputs: dict, branches: list[Branch], pad_id: int, shared: SharedPrefix | None = None
) -> list[float]:
    """log P(branch tokens | its row before its start) for every branch: one forward of the
    language model (two with a `shared` prefix: the prefixes, then the rest) and one LM-head
    call, whatever the number of branches."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cpu = {k: v.cpu() for k, v in inputs.items()}
    positions = model_positions(model, {k: v.to(device) for k, v in inputs.items() if k != "pixel_values"})
    extended, allowed, placed = _with_branches(cpu, branches, pad_id, positions)
    rows, predecessors, targets, owners = [], [], [], []
    for index, (branch, at) in enumerate(zip(branches, placed, strict=True)):
        for j, token in enumerate(branch.tokens):
            rows.append(branch.row)
            predecessors.append(branch.start - 1 if j == 0 else at + j - 1)
            targets.append(token)
            owners.append(index)
    lm = _causal_lm(model)
    if shared is None:
        extended["attention_mask"] = additive_mask(allowed, dtype)
        extended = {k: v.to(device) for k, v in extended.items()}
        extended["pixel_values"] = extended["pixel_values"].to(dtype)
        hidden = lm.model(**extended).last_hidden_state
    else:
        hidden, offsets = shared_forward(lm, extended, allowed, shared, pad_id, device, dtype)
        predecessors = [p - offsets[r] for r, p in zip(rows, predecessors, strict=True)]
    picked = hidden[_long(rows, hidden.device), _long(predecessors, hidden.device)]
    logprobs = torch.log_softmax(lm.lm_head(picked).float(), dim=-1)
    chosen = logprobs.gather(1, _long(targets, logprobs.device)[:, None])[:, 0].cpu()
    sums = torch.zeros(len(branches), dtype=torch.float64)
    sums.index_add_(0, _long(owners, "cpu"), chosen.double())
    return sums.tolist()


def _long(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


@torch.no_grad()
def score_samples(
    model, processor, samples: list[dict], classes: list[str], batch_size: int = 4, shard: tuple[int, int] = (0, 1)
) -> list[dict]:
    """Per region of this rank's share (`shard` = (rank, world); samples rank, rank + world, ...):
    score = P(abnormal), class probabilities (true abnormal regions), truth. Every rank runs the
    same number of batches: one whose share is shorter scores a filler batch and drops it.

    A sample's `meta.class_answers` (region id -> an answer in which that region is abnormal)
    adds the class distribution of regions its own answer calls normal: the whole alternative
    lines (`Rk: abnormal | <class>` and what ends them) branch off its answer where that region's
    label word starts, so P(abnormal) and the class come from the same forward (predict)."""
    if not samples:
        return []
    rank, world = shard
    mine = samples[rank::world]
    batches = math.ceil(math.ceil(len(samples) / world) / batch_size)
    collate = Collator(processor)
    tokenizer = processor.tokenizer
    turn_end = tokenizer.convert_ids_to_tokens(collate.end_id)
    dataset = SftDataset(mine or samples[:1], processor)
    was_training = model.training
    model.eval()
    rows = []
    for k in range(batches):
        chunk = list(range(k * batch_size, min((k + 1) * batch_size, len(mine))))
        indices = chunk or [0]
        items = [dataset[i] for i in indices]
        # ranks of a sharded pass must run the same forwards (ZeRO-3 gathers on each): no sharing
        batch, shared = collate_shared(processor, collate, items) if world == 1 else (collate(items), None)
        scored = _score_batch(model, tokenizer, batch, shared, [dataset.samples[i] for i in indices], classes, turn_end)
        if chunk:
            rows += scored
    model.train(was_training)
    return rows


def _score_batch(
    model, tokenizer, batch: dict, shared: SharedPrefix | None, samples: list[dict], classes: list[str], turn_end: str
) -> list[dict]:
    labels = batch.pop("labels")
    branches: list[Branch] = []
    wanted = []  # (row, region, label decision's first branch, class decision's first branch or None)
    for row, sample in enumerate(samples):
        in_turn = labels[row] != IGNORE_INDEX
        turn_start = int(in_turn.nonzero()[0])
        turn_ids = batch["input_ids"][row][in_turn].tolist()
        decisions = answer_decisions(sample["messages"][2]["content"], classes, turn_end)
        for rid, answer in sample["meta"].get("class_answers", {}).items():
            if (rid, "class") not in decisions and classes:
                decisions[rid, "class"] = answer_decisions(answer, classes, turn_end)[rid, "class"]
        for region in sample["meta"]["regions"]:
            if (region["rid"], "label") not in decisions:
                raise StepFailure(
                    f"{sample['id']}: the answer has no line like '{region['rid']}: abnormal | <class>' for region "
                    f"{region['rid']}; the scoring pass reads these lines (sft templates: answers.*_line)"
                )
            firsts = []
            for kind in ("label", "class"):
                decision = decisions.get((region["rid"], kind))
                firsts.append(len(branches) if decision else None)
                if decision:
                    start, tokens = decision_branches(tokenizer, decision, turn_ids)
                    branches += [Branch(row, turn_start + start, t) for t in tokens]
            wanted.append((row, region, *firsts))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logprobs = torch.tensor(branch_logprobs(model, batch, branches, pad_id, shared))
    rows = []
    for row, region, label_at, class_at in wanted:
        pair = torch.softmax(logprobs[label_at : label_at + 2], dim=0)
        result = region_row(samples[row], region, float(pair[0]))
        if class_at is not None:
            probs = torch.softmax(logprobs[class_at : class_at + len(classes)], dim=0)
            result["class_probs"] = {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}
            result["pred_cls"] = classes[int(probs.argmax())]
        rows.append(result)
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


def image_scores(rows: list[dict]) -> dict[str, dict]:
    """Image id -> {score: max region score, truth: its label}."""
    images: dict[str, dict] = {}
    for row in rows:
        image = images.setdefault(row["image_id"], {"score": 0.0, "truth": row["image_label"], "path": row["path"]})
        image["score"] = max(image["score"], row["score"])
    return images


# --- free-text generation (the slow alternative) ---------------------------------------


@torch.no_grad()
def generate_token_ids(model, processor, samples: list[dict], max_new_tokens: int | list[int] = 160) -> list[list[int]]:
    """The greedily generated token ids of each sample (prompt excluded); `max_new_tokens` for
    all samples or one budget per sample."""
    from defectvlm.train.data import image_parts, load_part

    model.eval()
    device = next(model.parameters()).device
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(samples)
    generated = []
    for sample, budget in zip(samples, budgets, strict=True):
        prompt = processor.apply_chat_template(sample["messages"][:-1], tokenize=False, add_generation_prompt=True)
        cache: dict = {}
        images = [load_part(part, cache) for part in image_parts(sample)]
        inputs = processor(text=[prompt], images=images, return_tensors="pt").to(device)
        output = _causal_lm(model).generate(**inputs, max_new_tokens=budget, do_sample=False)
        generated.append(output[0, inputs["input_ids"].shape[1] :].tolist())
    return generated


def generate_answers(model, processor, samples: list[dict], max_new_tokens: int | list[int] = 160) -> list[str]:
    """Greedy answers as text (see generate_token_ids)."""
    ids = generate_token_ids(model, processor, samples, max_new_tokens)
    return [processor.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in ids]


def parse_answer(text: str, region_ids: list[str], classes: list[str]) -> dict:
    """Lenient: lines like `R2: abnormal | slag` (also 异常/正常, full-width colon/bar, extra text).
    Never raises; regions without a readable line and unknown classes are counted."""
    pattern = line_pattern(classes, anywhere=True)
    found: dict[str, tuple[str, str | None]] = {}
    unknown_classes = 0
    for line in str(text or "").splitlines():
        match = pattern.search(line)
        if not match or f"R{match['rid']}" not in region_ids or f"R{match['rid']}" in found:
            continue
        label = "abnormal" if match["label"].lower() in [abnormal for abnormal, _ in LABEL_WORDS] else "normal"
        cls = match["cls"]
        if cls is not None and cls not in classes:
            unknown_classes += 1
            cls = None
        found[f"R{match['rid']}"] = (label, cls)
    missing = [rid for rid in region_ids if rid not in found]
    return {"regions": found, "missing": missing, "unknown_classes": unknown_classes}
