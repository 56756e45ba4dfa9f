"""Pretrain the tiny Qwen2.5-VL on the generic corpus and write the weights the package ships.

    python -m defectvlm.models.pretrain_tiny            # regenerates models/tiny_pretrained/

Vision tower, projector and language model train together (AdamW, warm-up + cosine, gradient
clipping) from a fresh initialisation of the `tiny-random` architecture on `--items` items of
`defectvlm.models.generic_corpus`, which never sees the demo's images, classes or wording.
The weights file records this script's arguments and the corpus digest in its metadata
(`tiny.pretrained_recipe()`), and the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from defectvlm.models import generic_corpus, tiny
from defectvlm.train.data import Collator, SftDataset, batches
from defectvlm.train.loop import lr_lambda

DEFAULTS = {
    "items": 3000,
    "steps": 700,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_ratio": 0.05,
    "init_range": 0.02,  # transformers' default: tiny-random's wider 0.1 suits a frozen head, not training
    "crop_loss_weight": 1.0,
    "seed": 0,
}
CROP_SIZE = 84  # the SFT step's default crop side (sft.crop_size)
LOG_EVERY = 25


def build_corpus(seed: int, items: int, folder: Path) -> tuple[list[dict], str]:
    """The samples (images written under `folder`) and a digest of their content."""
    digest = hashlib.sha256()
    samples = []
    for index in range(items):
        sample, image_bytes = generic_corpus.build_item(seed, index, folder, CROP_SIZE)
        samples.append(sample)
        digest.update(image_bytes)
        digest.update(json.dumps(sample, sort_keys=True, ensure_ascii=False).replace(str(folder), "").encode())
    return samples, digest.hexdigest()


class CropLoss:
    """Auxiliary objective: each region crop's mean visual embedding (the projector's output) is
    classified into what the region holds by a linear head that trains along and is then dropped.
    It gives the vision tower and projector a direct signal, as a VLM's vision encoder gets from
    its own pretraining; through the language model alone it learns far too slowly on a CPU."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration):
        self.labels = [generic_corpus.NOTHING, *generic_corpus.THINGS]
        self.head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(self.labels))
        self.merge = model.config.vision_config.spatial_merge_size**2
        self.captured: list[torch.Tensor] = []
        model.model.visual.register_forward_hook(lambda _module, _inputs, out: self.captured.append(out.pooler_output))

    def __call__(self, grid_thw: torch.Tensor, samples: list[dict]) -> torch.Tensor:
        """Cross-entropy over the crops of the last forward (images in order: whole, then crops)."""
        embeddings = torch.split(self.captured.pop(), (grid_thw.prod(-1) // self.merge).tolist())
        crops, targets, position = [], [], 0
        for sample in samples:
            things = sample["meta"]["things"]
            crops += [embeddings[position + 1 + k].mean(0) for k in range(len(things))]
            targets += [self.labels.index(thing) for thing in things]
            position += 1 + len(things)
        return torch.nn.functional.cross_entropy(self.head(torch.stack(crops)), torch.tensor(targets))


def pretrain(recipe: dict, log=print) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict, tokenizer JSON, recipe with the corpus digest and the last losses)."""
    processor = tiny.build_processor(generic_corpus.MIN_PIXELS, generic_corpus.MAX_PIXELS)
    config = tiny.tiny_config(processor.tokenizer)
    config.text_config.initializer_range = config.vision_config.initializer_range = recipe["init_range"]
    torch.manual_seed(recipe["seed"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    crop_loss = CropLoss(model)
    with tempfile.TemporaryDirectory() as folder:
        samples, corpus_digest = build_corpus(recipe["seed"], recipe["items"], Path(folder))
        dataset, collate = SftDataset(samples, processor), Collator(processor)
        lengths = [item.length for item in dataset.items]
        size, steps = recipe["batch_size"], recipe["steps"]
        epochs = math.ceil(steps * size / len(samples)) + 1
        order = [b for epoch in range(epochs) for b in batches(lengths, size, recipe["seed"], epoch, True)][:steps]
        parameters = [*model.parameters(), *crop_loss.head.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=recipe["lr"], weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, recipe["warmup_ratio"]))
        model.train()
        start, recent = time.perf_counter(), []
        for step, index in enumerate(order, start=1):
            batch = collate([dataset[i] for i in index])
            loss = model(**batch).loss
            aux = crop_loss(batch["image_grid_thw"], [samples[i] for i in index])
            optimizer.zero_grad()
            (loss + recipe["crop_loss_weight"] * aux).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            recent = [*recent[-(LOG_EVERY - 1) :], (loss.item(), aux.item())]
            if step % LOG_EVERY == 0 or step == steps:
                text, crops = (sum(r[k] for r in recent) / len(recent) for k in (0, 1))
                log(f"step {step}/{steps} loss {text:.3f} crop loss {crops:.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    return state, processor.tokenizer.backend_tokenizer.to_str(), {**recipe, "corpus_sha256": corpus_digest}


def write(out: Path, state: dict[str, torch.Tensor], tokenizer_json: str, recipe: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metadata = {tiny.RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    save_file(state, out / tiny.WEIGHTS_FILE, metadata=metadata)
    (out / tiny.TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--out", type=Path, default=Path(str(tiny.PRETRAINED)), help="folder for the two files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = {name: getattr(args, name) for name in DEFAULTS}
    state, tokenizer_json, recipe = pretrain(recipe)
    write(args.out, state, tokenizer_json, recipe)
    print(f"wrote {args.out / tiny.WEIGHTS_FILE} ({json.dumps(recipe, sort_keys=True)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
