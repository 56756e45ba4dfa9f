"""Where a run came from: the git commit (and, for a dirty tree, the digest of its uncommitted
changes), the data digests (md5 of the SFT split files, the same digest DVC records in dvc.lock;
each record pins its image's BLAKE3, so one changed image changes the digest), DVC's own digests,
and the data version, which every run carries.

The files that pin the data version (dvc.lock, the raw folders' .dvc files) are read from the
working directory, or, for a cluster run, from `<train.output_dir>/lineage/`, where the pipeline's
steps write the files of the checkout it was submitted from (with its `data_version`): every
step and every TrainJob pod of the run sees that folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import yaml

from defectvlm.config import SPLITS, Params, params_to_dict

DATA_VERSION_ENV = "DEFECTVLM_DATA_VERSION"
GIT_COMMIT_ENV = "DEFECTVLM_GIT_COMMIT"  # set in the container images (no .git inside)
LINEAGE_DIR = "lineage"
DATA_VERSION_FILE = "data_version"


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
    if dirty:
        diff = _git(["diff", "HEAD", "--binary"], cwd) or ""
        info["git.diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    tag = _git(["describe", "--tags", "--exact-match"], cwd)
    if tag:
        info["git.tag"] = tag
    return info


def lineage_root(params: Params) -> Path:
    """Where dvc.lock and the raw .dvc files of this run's data version are: the run folder's
    lineage/ (cluster runs) or the working directory."""
    recorded = Path(params.train.output_dir) / LINEAGE_DIR
    return recorded if recorded.is_dir() else Path(".")


def lineage_paths(params: Params) -> list[str]:
    """The files that pin a data version: dvc.lock and the raw folders' .dvc files."""
    return ["dvc.lock", f"{params.data.abnormal_root}.dvc", f"{params.data.normal_root}.dvc"]


def lineage_files(params: Params) -> dict[str, str]:
    """The texts that restore this data version (path -> text), as present for this run."""
    root = lineage_root(params)
    return {p: (root / p).read_text(encoding="utf-8") for p in lineage_paths(params) if (root / p).is_file()}


def data_version(params: Params, sft_dir: Path) -> str:
    """The data version of a run: DEFECTVLM_DATA_VERSION (a cluster step's `data_version`), the
    run folder's recorded one, the raw folders' .dvc digests (DVC runs), or else the SFT digests."""
    root = lineage_root(params)
    recorded = root / DATA_VERSION_FILE
    for version in (os.environ.get(DATA_VERSION_ENV), recorded.read_text().strip() if recorded.is_file() else ""):
        if version:
            return version
    raw = []
    for path in (params.data.abnormal_root, params.data.normal_root):
        dvc_file = root / f"{path}.dvc"
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
            raw.append(f"{Path(path).name}={outs[0].get('md5', '')}")
    if raw:
        return "dvc:" + ",".join(raw)
    digests = yaml.safe_dump(split_digests(sft_dir), sort_keys=True)
    return "sft:" + hashlib.sha256(digests.encode()).hexdigest()[:16]


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
    manifest, and the data version."""
    tags = dict(git_info())
    tags.update({f"data.sft.{name}.md5": md5 for name, md5 in split_digests(sft_dir).items()})
    recorded = dvc_digests(lineage_root(params) / "dvc.lock")
    for path in (params.data.abnormal_root, params.data.normal_root, "data/01_ingested/manifest.jsonl"):
        if path in recorded:
            tags[f"dvc.{path}"] = recorded[path]
    tags["data.version"] = data_version(params, sft_dir)
    return tags


def pipeline_key(params: Params, sft_dir: Path) -> str:
    """Runs of one pipeline execution share this key: same code (commit and uncommitted
    changes), data and parameters."""
    # what shapes the model; not how it is registered or where it runs (the cluster steps
    # receive only the sections they read, so those would split one execution in two)
    shaping = {k: v for k, v in params_to_dict(params).items() if k not in ("registry", "cluster", "trainjob")}
    git = git_info()
    code = {"commit": git.get("git.commit", ""), "diff": git.get("git.diff_sha256", "")}
    material = {"git": code, "data": split_digests(sft_dir), "params": shaping}
    return hashlib.sha256(yaml.safe_dump(material, sort_keys=True).encode()).hexdigest()[:32]
