"""Pretrain the tiny Qwen2.5-VL on the generic corpus and write the weights the package ships.

    python -m defectvlm.models.pretrain_tiny            # regenerates models/tiny_pretrained/

Vision tower, projector and language model train together (AdamW, warm-up + cosine, gradient
clipping) from the `tiny-random` weights on `--items` items of `defectvlm.models.generic_corpus`,
which never sees the demo's images, classes or wording. The token embeddings and the LM head
stay tiny-random's (frozen, as fine-tuning keeps them), so fine-tuning meets the same wide head
that lets LoRA reach confident answers. The first `--curriculum` share of the steps sees only
single-region items (the answer depends on one crop or note); `--recall-share` of the items are
text-only recall items (generic_corpus's module doc). `--probe` items drawn after the corpus
are scored teacher-forced at the end (per answer word: the share of first tokens right).
The weights file records this script's arguments and the corpus digest in its metadata
(`tiny.pretrained_recipe()`), and the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from defectvlm.models import generic_corpus, tiny
from defectvlm.train.data import Collator, Encoded, SftDataset, batches
from defectvlm.train.loop import lr_lambda

DEFAULTS = {  # the recipe of the shipped models/tiny_pretrained/ (its metadata records them)
    "items": 8000,
    "recall_share": 0.4,
    "curriculum": 0.3,
    "steps": 8000,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_ratio": 0.05,
    "crop_loss_weight": 1.0,
    "seed": 0,
}
CROP_SIZE = 84  # the SFT step's default crop side (sft.crop_size)
FROZEN = ("model.language_model.embed_tokens.", "lm_head.")
PLAIN_WORDS = (generic_corpus.PLAIN, generic_corpus.MARKED)
LOG_EVERY = 25


def build_corpus(
    seed: int, items: int, folder: Path, recall_share: float = DEFAULTS["recall_share"], first: int = 0
) -> tuple[list[dict], str]:
    """The samples (images written under `folder`) and a digest of their content; item
    indices from `first` on (the probe draws past the corpus)."""
    digest = hashlib.sha256()
    samples = []
    for index in range(first, first + items):
        if np.random.default_rng([seed, index, 3]).random() < recall_share:
            sample, image_bytes = generic_corpus.build_recall_item(seed, index), b""
        else:
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

    def __call__(self, grid_thw: torch.Tensor | None, samples: list[dict]) -> torch.Tensor:
        """Cross-entropy over the crops of the last forward (images in order: whole, then crops)."""
        if not any(sample["meta"]["crops"] for sample in samples):
            return torch.zeros(())
        embeddings = torch.split(self.captured.pop(), (grid_thw.prod(-1) // self.merge).tolist())
        crops, targets, position = [], [], 0
        for sample in samples:
            if not sample["meta"]["crops"]:
                continue
            things = sample["meta"]["things"]
            crops += [embeddings[position + 1 + k].mean(0) for k in range(len(things))]
            targets += [self.labels.index(thing) for thing in things]
            position += 1 + len(things)
        return torch.nn.functional.cross_entropy(self.head(torch.stack(crops)), torch.tensor(targets))


class TextOrImageCollator(Collator):
    """The SFT collator; a batch of text-only items goes to the processor without images."""

    def __call__(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        if any(item.images for item in items):
            return super().__call__(items)
        batch = self.processor(text=[item.text for item in items], padding=True, return_tensors="pt")
        batch["labels"] = torch.stack([self.answer_labels(ids) for ids in batch["input_ids"]])
        return dict(batch)


def step_order(samples: list[dict], dataset: SftDataset, recipe: dict) -> list[list[int]]:
    """Index batches: the first `curriculum` share of the steps from single-region items only."""
    lengths = [item.length for item in dataset.items]
    size, steps, seed = recipe["batch_size"], recipe["steps"], recipe["seed"]
    easy_steps = int(steps * recipe["curriculum"])
    single = [i for i, s in enumerate(samples) if len(s["meta"]["things"]) == 1]
    order: list[list[int]] = []
    for epoch in range(steps):  # enough epochs for any corpus size
        if len(order) >= easy_steps:
            break
        order += [[single[i] for i in b] for b in batches([lengths[i] for i in single], size, seed, epoch, True)]
    order = order[:easy_steps]
    for epoch in range(steps):
        if len(order) >= steps:
            break
        order += batches(lengths, size, seed, 1000 + epoch, True)
    return order[:steps]


def pretrain(recipe: dict, log=print, probe_items: int = 0) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict, tokenizer JSON, recipe with the corpus digest)."""
    model, processor = tiny.build_tiny(generic_corpus.MIN_PIXELS, generic_corpus.MAX_PIXELS)
    for name, parameter in model.named_parameters():  # tiny-random's embeddings and head, as fine-tuning keeps them
        parameter.requires_grad_(not name.startswith(FROZEN))
    torch.manual_seed(recipe["seed"])
    crop_loss = CropLoss(model)
    with tempfile.TemporaryDirectory() as folder:
        samples, corpus_digest = build_corpus(recipe["seed"], recipe["items"], Path(folder), recipe["recall_share"])
        dataset, collate = SftDataset(samples, processor), TextOrImageCollator(processor)
        order = step_order(samples, dataset, recipe)
        steps = len(order)
        parameters = [p for p in (*model.parameters(), *crop_loss.head.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=recipe["lr"], weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, recipe["warmup_ratio"]))
        model.train()
        start, recent = time.perf_counter(), []
        for step, index in enumerate(order, start=1):
            batch = collate([dataset[i] for i in index])
            loss = model(**batch).loss
            aux = crop_loss(batch.get("image_grid_thw"), [samples[i] for i in index])
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
        if probe_items:
            held_out, _ = build_corpus(recipe["seed"], probe_items, Path(folder), 0.5, first=recipe["items"])
            for task in ("list", "recall"):
                log(f"probe {task}: " + json.dumps(probe(model, processor, [s for s in held_out if s["task"] == task])))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    return state, processor.tokenizer.backend_tokenizer.to_str(), {**recipe, "corpus_sha256": corpus_digest}


@torch.no_grad()
def probe(model, processor, samples: list[dict]) -> dict:
    """Teacher-forced accuracy of the answer words of `list` or `recall` items: per region, the first token
    of plain/marked (among those two) and of the thing's name (among the things), by truth."""
    tokenizer, collate = processor.tokenizer, TextOrImageCollator(processor)
    first = {word: tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in (PLAIN_WORDS)}
    things = {t: tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in generic_corpus.THINGS}
    right: dict[str, list[int]] = {}
    dataset = SftDataset(samples, processor)
    for i, sample in enumerate(samples):
        batch = collate([dataset[i]])
        logits = model(**batch).logits[0]
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        answer_start = next(k for k, label in enumerate(labels) if label != -100)
        encoded = tokenizer(sample["messages"][2]["content"], add_special_tokens=False, return_offsets_mapping=True)
        assert ids[answer_start : answer_start + len(encoded["input_ids"])] == encoded["input_ids"]
        starts = {offset[0]: k for k, offset in enumerate(encoded["offset_mapping"])}
        offset = 0
        for line, thing in zip(sample["messages"][2]["content"].split("\n"), sample["meta"]["things"], strict=True):
            word_at = offset + line.index(": ") + 1  # the space before the word starts its token
            checks = [
                (
                    "label",
                    word_at,
                    first,
                    generic_corpus.PLAIN if thing == generic_corpus.NOTHING else generic_corpus.MARKED,
                )
            ]
            if thing != generic_corpus.NOTHING:
                checks.append(("thing", offset + line.index(" | ") + 2, things, thing))
            for kind, at, choices, truth in checks:
                position = answer_start + starts[at] - 1
                options = list(choices)
                guess = options[int(torch.argmax(logits[position, [choices[o] for o in options]]))]
                right.setdefault(f"{kind}:{truth}", []).append(int(guess == truth))
            offset += len(line) + 1
    return {key: f"{sum(v)}/{len(v)}" for key, v in sorted(right.items())}


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
    parser.add_argument("--probe", type=int, default=0, help="held-out items to score at the end (not recorded)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = {name: getattr(args, name) for name in DEFAULTS}
    state, tokenizer_json, recipe = pretrain(recipe, probe_items=args.probe)
    write(args.out, state, tokenizer_json, recipe)
    print(f"wrote {args.out / tiny.WEIGHTS_FILE} ({json.dumps(recipe, sort_keys=True)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
