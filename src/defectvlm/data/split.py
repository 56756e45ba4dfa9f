"""Leak-proof train/val/test split.

Images are grouped (by folder, a regex over the path, or not at all); groups that share an
image content hash are joined into one unit, so identical images never straddle splits.
Each unit's split is a pure function of a seeded hash of its key: adding or removing other
units never moves it. Only when a split would lack something it needs (abnormal images
first, then normal images, then each defect class where there are enough units) are the
fewest units moved, those whose hash lies nearest the split's range; every such move is
listed in the report as a fallback, and these are the only assignments that growth of
the data can change. A split with a positive ratio and no abnormal image is an error.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from defectvlm.config import SPLITS, SplitParams
from defectvlm.errors import StepFailure
from defectvlm.seeding import item_uniform


@dataclass(frozen=True)
class SplitResult:
    splits: dict[str, list[dict]]
    report: dict


def relative_path(record: dict) -> str:
    """The image's path below its root (the manifest id without the root prefix)."""
    return record["id"].split("/", 1)[1]


def group_key(record: dict, params: SplitParams) -> str | None:
    """The image's group under `params.group_by`; None when the regex does not match."""
    rel = relative_path(record)
    if params.group_by == "none":
        return record["id"]
    if params.group_by == "parent":
        return record["group"]
    if params.group_by == "parent_depth":
        folders = posixpath.dirname(rel).split("/") if posixpath.dirname(rel) else []
        return "/".join(folders[: params.group_depth]) or "."
    match = re.search(params.group_regex, rel)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


def split_manifest(records: list[dict], params: SplitParams) -> SplitResult:
    """Assign every manifest record to train, val or test (see the module doc)."""
    warnings: list[str] = []
    keys, unmatched = {}, []
    for record in records:
        key = group_key(record, params)
        if key is None:
            unmatched.append(record["id"])
            key = record["group"]
        keys[record["id"]] = key
    if unmatched:
        warnings.append(
            f"split.group_regex matched {len(records) - len(unmatched)} of {len(records)} paths; "
            f"the others were grouped by parent folder (first: {unmatched[0]})"
        )

    units = _join_units(records, keys)  # group key -> unit key
    members: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        members[units[keys[record["id"]]]].append(record)

    pinned, unmatched_holdout = _holdout_units(records, params.holdout_list, keys, units)
    if unmatched_holdout:
        warnings.append(f"split.holdout_list entries that match no image: {', '.join(unmatched_holdout)}")

    bounds = _bounds(params.ratios)
    position = {unit: item_uniform(params.seed, unit) for unit in members}
    assignment = {unit: "test" if unit in pinned else _split_of(position[unit], bounds) for unit in members}
    features = {unit: _features(rows) for unit, rows in members.items()}
    fallbacks = _repair(assignment, features, position, bounds, pinned, params.ratios, warnings)

    splits = {name: [] for name in SPLITS}
    for unit, rows in members.items():
        for record in rows:
            splits[assignment[unit]].append({**record, "split_group": unit})
    for rows in splits.values():
        rows.sort(key=lambda r: r["id"])
    if len(members) < 3 * sum(1 for r in params.ratios.values() if r > 0):
        warnings.append(f"only {len(members)} groups: achieved ratios will differ from split.ratios")
    report = _report(splits, assignment, fallbacks, warnings, params, len(records))
    return SplitResult(splits, report)


def _join_units(records: list[dict], keys: dict[str, str]) -> dict[str, str]:
    """Group key -> unit key, joining groups that share an image hash (union-find)."""
    parent = {key: key for key in keys.values()}

    def find(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    first_group_of_hash: dict[str, str] = {}
    for record in records:
        key = keys[record["id"]]
        other = first_group_of_hash.setdefault(record["blake3"], key)
        a, b = find(key), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smallest key names the unit: order-independent
    return {key: find(key) for key in parent}


def _holdout_units(
    records: list[dict], holdout: list[str], keys: dict[str, str], units: dict[str, str]
) -> tuple[set[str], list[str]]:
    wanted = set(holdout)
    pinned, matched = set(), set()
    for record in records:
        names = {record["id"], relative_path(record), posixpath.basename(record["id"]), record["path"]}
        hits = names & wanted
        if hits:
            matched |= hits
            pinned.add(units[keys[record["id"]]])
    return pinned, sorted(wanted - matched)


def _bounds(ratios: dict[str, float]) -> dict[str, tuple[float, float]]:
    bounds, low = {}, 0.0
    for name in SPLITS:
        bounds[name] = (low, low + ratios[name])
        low += ratios[name]
    return bounds


def _split_of(position: float, bounds: dict[str, tuple[float, float]]) -> str:
    for name in SPLITS:
        low, high = bounds[name]
        if low <= position < high:
            return name
    return next(name for name in reversed(SPLITS) if bounds[name][1] > bounds[name][0])


def _features(rows: list[dict]) -> Counter:
    found: Counter = Counter()
    for record in rows:
        found[record["label"]] += 1
        for cls in {b["cls"] for b in record["boxes"]}:
            found[f"class:{cls}"] += 1
    return found


def _repair(
    assignment: dict[str, str],
    features: dict[str, Counter],
    position: dict[str, float],
    bounds: dict[str, tuple[float, float]],
    pinned: set[str],
    ratios: dict[str, float],
    warnings: list[str],
) -> list[dict]:
    """Move the fewest units so that every split with a positive ratio has what it needs."""
    active = [name for name in ("test", "val", "train") if ratios[name] > 0]
    classes = sorted({f for counts in features.values() for f in counts if f.startswith("class:")})
    units_with = {f: sum(1 for c in features.values() if c[f]) for f in ["abnormal", "normal", *classes]}
    required = ["abnormal", "normal"] + [c for c in classes if units_with[c] >= len(active)]
    fallbacks = []
    # tally[split][feature]: how many units in that split have the feature
    tally: dict[str, Counter] = defaultdict(Counter)
    for unit, where in assignment.items():
        tally[where].update({f: 1 for f in features[unit]})

    for feature in required:
        for split in active:
            if tally[split][feature]:
                continue
            low, high = bounds[split]
            candidates = [
                unit
                for unit, where in assignment.items()
                if where != split
                and unit not in pinned
                and features[unit][feature]
                and all(tally[where][f] > 1 for f in required if features[unit][f])
            ]
            if not candidates:
                message = f"split {split!r} has no {feature.removeprefix('class:')} image and no group can move there"
                if feature == "abnormal":
                    raise StepFailure(
                        f"{message}: {units_with['abnormal']} group(s) hold abnormal images for "
                        f"{len(active)} splits; add data, change split.ratios or split.group_by"
                    )
                warnings.append(message)
                continue
            unit = min(candidates, key=lambda u: (max(low - position[u], position[u] - high, 0.0), u))
            donor = assignment[unit]
            fallbacks.append({"group": unit, "from": donor, "to": split, "reason": f"{split} had no {feature}"})
            tally[donor].subtract({f: 1 for f in features[unit]})
            tally[split].update({f: 1 for f in features[unit]})
            assignment[unit] = split
    if fallbacks:
        warnings.append(f"{len(fallbacks)} group(s) moved so every split has what it needs; see fallbacks")
    return fallbacks


def _report(
    splits: dict[str, list[dict]],
    assignment: dict[str, str],
    fallbacks: list[dict],
    warnings: list[str],
    params: SplitParams,
    n_in: int,
) -> dict:
    total = sum(len(rows) for rows in splits.values())
    assert total == n_in, "every image lands in exactly one split"
    counts = {}
    for name, rows in splits.items():
        classes = Counter(cls for r in rows for cls in {b["cls"] for b in r["boxes"]})
        counts[name] = {
            "images": len(rows),
            "abnormal": sum(r["label"] == "abnormal" for r in rows),
            "normal": sum(r["label"] == "normal" for r in rows),
            "boxes": sum(len(r["boxes"]) for r in rows),
            "groups": len({r["split_group"] for r in rows}),
            "images_per_class": dict(sorted(classes.items())),
        }
    units_by_split = {name: {r["split_group"] for r in rows} for name, rows in splits.items()}
    hashes_by_split = {name: {r["blake3"] for r in rows} for name, rows in splits.items()}
    return {
        "images": total,
        "ratios_target": params.ratios,
        "ratios_achieved": {name: round(len(rows) / total, 4) if total else 0.0 for name, rows in splits.items()},
        "counts": counts,
        "leakage": {
            "groups_in_several_splits": _shared(units_by_split),
            "hashes_in_several_splits": _shared(hashes_by_split),
        },
        "fallbacks": fallbacks,
        "warnings": warnings,
        "groups": dict(sorted(assignment.items())),
    }


def _shared(sets: dict[str, set]) -> int:
    names = list(sets)
    return sum(len(sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1 :])
