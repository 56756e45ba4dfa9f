"""defectvlm export: a merged checkpoint plain transformers loads, proven to score like base+adapter,
and refused when a trained tensor would be dropped."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from tests.conftest import read_json, run_cli


def test_export_is_plain_transformers_and_passes_parity(trained, tmp_path):
    out = tmp_path / "export"
    assert run_cli("export", "--model", trained[2], "--out", out) == 0
    meta = read_json(out / "defectvlm.json")
    assert meta["parity"]["passed"] and meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["regions"] > 0
    assert meta["family"] == "qwen2_5_vl" and meta["threshold"] == 0.5 and meta["classes"]
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in k or "modules_to_save" in k for k in weights)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))  # no PEFT involved
    trained_projector = trained[0].get_base_model().model.visual.merger.mlp[0].weight
    assert model.model.visual.merger.mlp[0].weight.equal(trained_projector)


def test_export_refuses_an_adapter_whose_trained_tensor_has_no_place(trained, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained[2], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = None  # as the old non_lora layout: PEFT would load it silently without them
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("export", "--model", adapter, "--out", tmp_path / "export") == 1
    err = capsys.readouterr().err
    assert "would be dropped" in err and "base_model.model.model.visual.blocks.3.attn.proj.weight" in err
    assert not (tmp_path / "export").exists()
