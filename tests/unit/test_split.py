import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defectvlm.config import SplitParams
from defectvlm.data.split import group_key, split_manifest
from defectvlm.errors import StepFailure

CLASSES = ["slag", "streak", "over_melt"]


def image(group: str, name: str, label: str, content: str | None = None, cls: str = "slag") -> dict:
    root = "abnormal" if label == "abnormal" else "normal"
    return {
        "id": f"{root}/{group}/{name}",
        "path": f"data/raw/{root}_root/{group}/{name}",
        "blake3": content or f"{group}/{name}",
        "label": label,
        "boxes": [{"xyxy": [1, 1, 20, 20], "cls": cls}] if label == "abnormal" else [],
        "group": group,
    }


def dataset(n_groups: int, seed: int = 0, prefix: str = "g") -> list[dict]:
    rng = random.Random(seed)
    records = []
    for g in range(n_groups):
        group = f"{prefix}{g:03d}"
        for i in range(rng.randint(1, 4)):
            label = "abnormal" if rng.random() < 0.5 else "normal"
            records.append(image(group, f"{i}.jpg", label, cls=rng.choice(CLASSES)))
    return records


def assignment(result) -> dict[str, str]:
    return {r["id"]: name for name, rows in result.splits.items() for r in rows}


groups = st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.sampled_from(CLASSES)), min_size=12, max_size=40)


def build(spec, prefix="g", shared_every: int = 0) -> list[dict]:
    records = []
    for g, (count, abnormal, cls) in enumerate(spec):
        for i in range(count):
            label = "abnormal" if (abnormal or i == 0) and i % 2 == 0 else "normal"
            content = f"dup{g // shared_every}" if shared_every and i == 0 else None
            records.append(image(f"{prefix}{g:03d}", f"{i}.jpg", label, content, cls))
    return records


@settings(max_examples=60, deadline=None)
@given(spec=groups, shared_every=st.sampled_from([0, 3, 5]))
def test_property_no_group_and_no_content_in_two_splits(spec, shared_every):
    records = build(spec, shared_every=shared_every)
    result = split_manifest(records, SplitParams())
    seen_group, seen_hash = {}, {}
    for name, rows in result.splits.items():
        for r in rows:
            assert seen_group.setdefault(r["group"], name) == name
            assert seen_hash.setdefault(r["blake3"], name) == name
    assert sum(len(rows) for rows in result.splits.values()) == len(records)
    assert result.report["leakage"] == {"groups_in_several_splits": 0, "hashes_in_several_splits": 0}


@settings(max_examples=60, deadline=None)
@given(old=groups, new=groups)
def test_property_stable_when_other_groups_are_added(old, new):
    before = split_manifest(build(old, "old"), SplitParams())
    after = split_manifest(build(old, "old") + build(new, "new"), SplitParams())
    moved_by_fallback = {f["group"] for r in (before, after) for f in r.report["fallbacks"]}
    a, b = assignment(before), assignment(after)
    changed = {i for i in a if a[i] != b[i] and i.split("/")[1] not in moved_by_fallback}
    assert not changed


@settings(max_examples=30, deadline=None)
@given(spec=groups, seed=st.integers(0, 1000))
def test_property_output_identical_whatever_the_input_order(spec, seed):
    records = build(spec)
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    assert split_manifest(records, SplitParams()).splits == split_manifest(shuffled, SplitParams()).splits


def test_every_split_gets_abnormal_normal_and_each_class_when_data_allows():
    result = split_manifest(dataset(60), SplitParams())
    for counts in result.report["counts"].values():
        assert counts["abnormal"] and counts["normal"]
        assert set(counts["images_per_class"]) == set(CLASSES)


def test_holdout_forces_image_and_its_group_into_test():
    records = dataset(30)
    target = next(r for r in records if r["label"] == "abnormal")
    params = SplitParams(holdout_list=[target["path"], "missing.jpg"])
    result = split_manifest(records, params)
    test_ids = {r["id"] for r in result.splits["test"]}
    assert {r["id"] for r in records if r["group"] == target["group"]} <= test_ids
    assert any("missing.jpg" in w for w in result.report["warnings"])


def test_identical_content_joins_groups():
    records = dataset(30)
    records.append(image("lonely", "copy.jpg", "normal", content=records[0]["blake3"]))
    result = split_manifest(records, SplitParams())
    where = assignment(result)
    assert where["normal/lonely/copy.jpg"] == where[records[0]["id"]]


def test_too_few_abnormal_groups_is_a_clear_error():
    records = [image("g1", "a.jpg", "abnormal"), image("g2", "b.jpg", "normal"), image("g3", "c.jpg", "normal")]
    with pytest.raises(StepFailure, match="has no abnormal image"):
        split_manifest(records, SplitParams())


def test_few_groups_fall_back_with_a_warning():
    records = [image(f"g{i}", "a.jpg", "abnormal") for i in range(3)] + [
        image(f"n{i}", "b.jpg", "normal") for i in range(3)
    ]
    result = split_manifest(records, SplitParams(ratios={"train": 0.8, "val": 0.1, "test": 0.1}))
    assert all(result.report["counts"][s]["abnormal"] for s in ("train", "val", "test"))
    assert result.report["fallbacks"] and result.report["warnings"]


def test_group_keys():
    record = image("lot7/cam2", "x.jpg", "normal")
    record["id"] = "normal/lot7/cam2/x.jpg"
    assert group_key(record, SplitParams(group_by="parent_depth", group_depth=1)) == "lot7"
    assert group_key(record, SplitParams(group_by="regex", group_regex=r"lot(\d+)")) == "7"
    assert group_key(record, SplitParams(group_by="regex", group_regex=r"zzz")) is None
    assert group_key(record, SplitParams(group_by="none")) == "normal/lot7/cam2/x.jpg"
