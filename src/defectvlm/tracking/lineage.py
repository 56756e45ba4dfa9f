"""Where a run came from: the git commit (and whether the tree was dirty), the data digests
(md5 of the SFT split files, the same digest DVC records in dvc.lock; each record pins its
image's BLAKE3, so one changed image changes the digest), and DVC's own digests when the
step runs under `dvc repro`."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import yaml

from defectvlm.config import SPLITS, Params, params_to_dict

DATA_VERSION_ENV = "DEFECTVLM_DATA_VERSION"
GIT_COMMIT_ENV = "DEFECTVLM_GIT_COMMIT"  # set in the container images (no .git inside)


def file_md5(path: Path) -> str:
    """md5 of a file's bytes: what DVC 3 records for a file in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_digests(sft_dir: Path, splits=SPLITS) -> dict[str, str]:
    """split name -> md5 of its SFT file (the MLflow dataset digest)."""
    return {name: file_md5(sft_dir / f"{name}.jsonl") for name in splits if (sft_dir / f"{name}.jsonl").exists()}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(cwd: Path = Path(".")) -> dict[str, str]:
    """Commit, dirty flag (tracked files changed) and an exact tag, when `cwd` is in a git repository;
    else the commit the container image was built from."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return (
            {"git.commit": os.environ[GIT_COMMIT_ENV], "git.source": "image"} if os.environ.get(GIT_COMMIT_ENV) else {}
        )
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    info = {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}
    tag = _git(["describe", "--tags", "--exact-match"], cwd)
    if tag:
        info["git.tag"] = tag
    return info


def dvc_digests(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """path -> md5 of every dependency and output recorded in dvc.lock (raw folders included)."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    digests = {}
    for stage in stages.values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            if "md5" in entry:
                digests[entry["path"]] = entry["md5"]
    return dict(sorted(digests.items()))


def lineage_tags(params: Params, sft_dir: Path) -> dict[str, str]:
    """Tags for a run: git, the SFT split digests, DVC's digests of the raw folders and the
    manifest, and the data version tag (DEFECTVLM_DATA_VERSION) when one is set."""
    tags = dict(git_info())
    tags.update({f"data.sft.{name}.md5": md5 for name, md5 in split_digests(sft_dir).items()})
    recorded = dvc_digests()
    for path in (params.data.abnormal_root, params.data.normal_root, "data/01_ingested/manifest.jsonl"):
        if path in recorded:
            tags[f"dvc.{path}"] = recorded[path]
    if os.environ.get(DATA_VERSION_ENV):
        tags["data.version"] = os.environ[DATA_VERSION_ENV]
    return tags


def pipeline_key(params: Params, sft_dir: Path) -> str:
    """Runs of one pipeline execution share this key: same code commit, data and parameters."""
    # what shapes the model; not how it is registered or where it runs (the cluster steps
    # receive only the sections they read, so those would split one execution in two)
    shaping = {k: v for k, v in params_to_dict(params).items() if k not in ("registry", "cluster", "trainjob")}
    material = {"git": git_info().get("git.commit", ""), "data": split_digests(sft_dir), "params": shaping}
    return hashlib.sha256(yaml.safe_dump(material, sort_keys=True).encode()).hexdigest()[:32]
