"""The scoring pass against the slow reference: one forward per region and alternative."""

import copy
import re
from importlib import resources

import pytest
import torch
import yaml

from defectvlm.evaluate.scoring import parse_answer, score_samples
from defectvlm.io import read_jsonl
from defectvlm.models.tiny import build_tiny
from defectvlm.train.data import Collator, Encoded, image_parts
from tests.conftest import prepare_sft, read_json, run_cli, write_params

DEMO_CLASSES = ["incomplete_spreading", "over_melt", "slag", "streak"]
LABEL_PAIRS = [("abnormal", "normal"), ("Abnormal", "Normal"), ("ABNORMAL", "NORMAL"), ("异常", "正常")]


def alternative_probs(model, collate, parts, prefix: str, alternatives: list[str], ending: str) -> list[float]:
    """Softmax over the alternatives of log P(prefix + alternative + ending), each its own forward
    (the tokens all alternatives share cancel out, so only where they part matters)."""
    batches = []
    for alternative in alternatives:
        batch = collate([Encoded(prefix + alternative + ending, parts, 0)])
        batch.pop("labels")
        batches.append(batch)
    sequences = [b["input_ids"][0].tolist() for b in batches]
    shared = 0
    while all(len(s) > shared and s[shared] == sequences[0][shared] for s in sequences):
        shared += 1
    totals = []
    for batch, sequence in zip(batches, sequences, strict=True):
        logprobs = torch.log_softmax(model(**batch).logits[0].double(), dim=-1)
        totals.append(sum(logprobs[i - 1, sequence[i]] for i in range(shared, len(sequence))))
    return torch.softmax(torch.stack(totals), dim=0).tolist()


@torch.no_grad()
def slow_reference(model, processor, sample: dict, classes: list[str]) -> dict[str, dict]:
    """Region id -> {score, class_probs}: the conversation cut where the label word starts (or the
    class starts), then each alternative; a class is followed by the rest of its line."""
    collate = Collator(processor)
    text = processor.apply_chat_template(sample["messages"], tokenize=False)
    answer = sample["messages"][2]["content"]
    start = text.rindex(answer)
    parts = image_parts(sample)
    truth = {r["rid"]: r for r in sample["meta"]["regions"]}
    result = {}
    offset = start
    for line in answer.split("\n"):
        header = re.match(r"\s*[Rr](\d+)\s*[:：]\s*", line)
        if header and f"R{header[1]}" in truth and f"R{header[1]}" not in result:
            region = truth[f"R{header[1]}"]
            pair = next(p for p in LABEL_PAIRS for word in p if line[header.end() :].startswith(word))
            cut = offset + header.end()
            scores = {"score": alternative_probs(model, collate, parts, text[:cut], list(pair), "")[0]}
            if region["label"] == "abnormal":
                cls_start = offset + line.rindex(region["cls"])
                cls_end = cls_start + len(region["cls"])
                after = re.search(r"\n|<\|im_end\|>", text[cls_end:])
                ending = text[cls_end : cls_end + after.end()]
                probs = alternative_probs(model, collate, parts, text[:cls_start], classes, ending)
                scores["class_probs"] = dict(zip(classes, probs, strict=True))
            result[region["rid"]] = scores
        offset += len(line) + 1
    return result


def assert_matches_reference(model, processor, samples: list[dict], classes: list[str], batch_size: int = 3):
    rows = score_samples(model, processor, samples, classes, batch_size=batch_size)
    assert len(rows) == sum(len(s["meta"]["regions"]) for s in samples)
    for sample in samples:
        reference = slow_reference(model, processor, sample, classes)
        fast = {r["rid"]: r for r in rows if r["image_id"] == sample["image_id"]}
        assert fast.keys() == reference.keys()
        for rid, expected in reference.items():
            assert fast[rid]["score"] == pytest.approx(expected["score"], abs=1e-5), (sample["id"], rid)
            if "class_probs" in expected:
                assert fast[rid]["class_probs"] == pytest.approx(expected["class_probs"], abs=1e-5), (sample["id"], rid)
                assert fast[rid]["pred_cls"] == max(expected["class_probs"], key=expected["class_probs"].get)
            else:
                assert "class_probs" not in fast[rid]
    return rows


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(3136, 200704)


@pytest.mark.parametrize(
    "classes",
    [
        DEMO_CLASSES,
        DEMO_CLASSES + ["over_spray"],  # shares " over" with over_melt in the tiny tokenizer
        DEMO_CLASSES + ["slag_heavy"],  # " slag" "_" "he" ...: slag is a token-prefix of it
    ],
    ids=["demo", "shared-first-token", "prefix-class"],
)
def test_scoring_pass_equals_one_forward_per_alternative(tiny, sft_dir, classes):
    model, processor = tiny
    samples = [s for s in read_jsonl(sft_dir / "val.jsonl") if s["meta"]["label"] == "abnormal"][:3]
    assert {r["cls"] for s in samples for r in s["meta"]["regions"] if r["label"] == "abnormal"} & {"over_melt", "slag"}
    rows = assert_matches_reference(model, processor, samples, classes)
    abnormal = [r for r in rows if r["truth"] == "abnormal"]
    assert abnormal and all(r["class_probs"].keys() == set(classes) for r in abnormal)
    assert all(sum(r["class_probs"].values()) == pytest.approx(1, abs=1e-4) for r in abnormal)


def rewrite_answer(sample: dict, rid_prefix: str, colon: str, bar: str, words: tuple[str, str], summary: bool):
    """The sample with its region lines written `{rid_prefix}{n}{colon}{word}{bar}{cls}`."""
    changed = copy.deepcopy(sample)
    lines = []
    for line in changed["messages"][2]["content"].split("\n"):
        match = re.fullmatch(r"R(\d+): (abnormal|normal)(?: \| (.+))?", line)
        if match:
            word = words[0] if match[2] == "abnormal" else words[1]
            lines.append(f"{rid_prefix}{match[1]}{colon}{word}" + (f"{bar}{match[3]}" if match[3] else ""))
        elif summary:
            lines.append(line)
    changed["messages"][2]["content"] = "\n".join(lines)
    return changed


@pytest.mark.parametrize(
    ("rid_prefix", "colon", "bar", "words", "summary"),
    [
        ("R", ":", "|", ("abnormal", "normal"), True),
        ("R", "：", "｜", ("abnormal", "normal"), False),  # the last class is followed by the turn's end
        ("R", " : ", "  ｜ ", ("Abnormal", "Normal"), True),
        ("r", "：", "｜", ("异常", "正常"), True),
        ("R", ": ", " | ", ("ABNORMAL", "NORMAL"), False),
    ],
)
def test_every_answer_spacing_the_parser_accepts_is_scored_at_its_words(
    tiny, sft_dir, rid_prefix, colon, bar, words, summary
):
    model, processor = tiny
    samples = [s for s in read_jsonl(sft_dir / "val.jsonl") if s["meta"]["label"] == "abnormal"][:2]
    rewritten = [rewrite_answer(s, rid_prefix, colon, bar, words, summary) for s in samples]
    answer = rewritten[0]["messages"][2]["content"]
    parsed = parse_answer(answer, [r["rid"] for r in samples[0]["meta"]["regions"]], DEMO_CLASSES)
    assert not parsed["missing"] and parsed["unknown_classes"] == 0
    assert_matches_reference(model, processor, rewritten, DEMO_CLASSES, batch_size=2)


@pytest.mark.slow
def test_chinese_classes_end_to_end_from_ingest_to_evaluate(tiny, tmp_path):
    """Raw labels kept as class names (empty label_map), answers written `R2：异常｜条纹`."""
    raw = tmp_path / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 12, "--n-normal", 6, "--seed", 3) == 0
    knowledge = yaml.safe_load(resources.files("defectvlm.data").joinpath("templates", "knowledge.yaml").read_text())
    raw_names = {canonical: entry["zh"] for canonical, entry in knowledge["classes"].items()}
    (tmp_path / "knowledge.yaml").write_text(
        yaml.safe_dump({"classes": {raw_names[c]: e for c, e in knowledge["classes"].items()}}, allow_unicode=True),
        encoding="utf-8",
    )
    templates = yaml.safe_load(resources.files("defectvlm.data").joinpath("templates", "zh.yaml").read_text())
    templates["answers"].update(abnormal_line="{rid}：异常｜{cls}", normal_line="{rid}：正常")
    (tmp_path / "zh.yaml").write_text(yaml.safe_dump(templates, allow_unicode=True), encoding="utf-8")
    params = write_params(
        tmp_path / "params.yaml",
        {
            "data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")},
            "labels": {"label_map": {}},
            "sft": {"knowledge": str(tmp_path / "knowledge.yaml"), "templates": str(tmp_path / "zh.yaml")},
            "model": {"name_or_path": "tiny-random"},  # the `tiny` fixture below: the reference's model
        },
    )
    sft = prepare_sft(params, tmp_path)
    classes = read_json(sft / "sft_summary.json")["classes"]
    assert set(classes) <= set(raw_names.values()) and len(classes) > 1
    reports = tmp_path / "reports"
    assert run_cli("evaluate", "--params", params, "--in", sft, "--out", reports, "--run", "base", "--no-tracking") == 0

    rows = read_jsonl(reports / "predictions.jsonl")
    abnormal = [r for r in rows if r["truth"] == "abnormal"]
    assert abnormal and all(r["class_probs"].keys() == set(classes) and r["pred_cls"] in classes for r in abnormal)
    assert read_json(reports / "metrics.json")["test"]["defect_type"]["accuracy"] is not None
    model, processor = tiny
    samples = {s["image_id"]: s for s in read_jsonl(sft / "test.jsonl")}
    for sample in [samples[r["image_id"]] for r in abnormal[:2]]:
        reference = slow_reference(model, processor, sample, classes)
        for row in (r for r in rows if r["image_id"] == sample["image_id"]):
            assert row["score"] == pytest.approx(reference[row["rid"]]["score"], abs=1e-5)
            if row["truth"] == "abnormal":
                assert row["class_probs"] == pytest.approx(reference[row["rid"]]["class_probs"], abs=1e-5)
