"""Lineage digests: the SFT split digests pin the images' content; git facts; dvc.lock digests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image

from defectvlm.io import read_jsonl
from defectvlm.tracking.lineage import dvc_digests, file_md5, git_info, split_digests
from tests.conftest import prepare_sft, run_cli, write_params


def prepare(params: Path, out: Path) -> dict[str, str]:
    return split_digests(prepare_sft(params, out))


def test_changing_one_image_changes_only_its_splits_digest(tmp_path):
    raw = tmp_path / "raw"
    assert run_cli("demo-data", "--out", raw, "--n-abnormal", 10, "--n-normal", 10, "--seed", 3) == 0
    params = write_params(
        tmp_path / "params.yaml",
        {"data": {"abnormal_root": str(raw / "abnormal_root"), "normal_root": str(raw / "normal_root")}},
    )
    before = prepare(params, tmp_path / "before")
    assert set(before) == {"train", "val", "test"}
    assert prepare(params, tmp_path / "again") == before  # same data, same digests

    record = read_jsonl(tmp_path / "before" / "04" / "test.jsonl")[0]
    image_path = Path(record["images"][0])
    with Image.open(image_path) as image:
        changed = image.copy()
    changed.putpixel((0, 0), (255, 0, 0))
    changed.save(image_path, quality=95)  # same size, same labels: only the pixels differ
    after = prepare(params, tmp_path / "after")
    assert after["test"] != before["test"]
    assert after["train"] == before["train"] and after["val"] == before["val"]


def test_git_info_reads_the_repository_or_the_image_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTVLM_GIT_COMMIT", raising=False)
    assert git_info(tmp_path) == {}
    monkeypatch.setenv("DEFECTVLM_GIT_COMMIT", "abc123")
    assert git_info(tmp_path) == {"git.commit": "abc123", "git.source": "image"}

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "c")
    git("tag", "v1")
    info = git_info(tmp_path)
    assert info == {"git.commit": git("rev-parse", "HEAD"), "git.dirty": "false", "git.tag": "v1"}
    (tmp_path / "f.txt").write_text("b")
    assert git_info(tmp_path)["git.dirty"] == "true"
    (tmp_path / "untracked.txt").write_text("c")
    (tmp_path / "f.txt").write_text("a")
    assert git_info(tmp_path)["git.dirty"] == "false"  # untracked files (data, dvc.lock) do not count


def test_dvc_digests_lists_every_dependency_and_output_of_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    deps:\n    - path: data/raw/a\n      md5: d1.dir\n"
        "    outs:\n    - path: data/01/manifest.jsonl\n      md5: m1\n  sft:\n    cmd: y\n    outs:\n"
        "    - path: data/04/test.jsonl\n      md5: t1\n",
        encoding="utf-8",
    )
    assert dvc_digests(lock) == {"data/01/manifest.jsonl": "m1", "data/04/test.jsonl": "t1", "data/raw/a": "d1.dir"}
    assert dvc_digests(tmp_path / "missing.lock") == {}
    assert len(file_md5(lock)) == 32
