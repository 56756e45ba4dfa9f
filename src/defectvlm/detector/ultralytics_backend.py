"""`detector.backend: ultralytics`: a YOLO detector trained from scratch with the optional Ultralytics package.

Licence: Ultralytics is AGPL-3.0, so it is only the extra `defectvlm[ultralytics]`, never a core or
dev dependency, and only this module imports it. What it produces is an ONNX file that inference
runs with onnxruntime (runtime.py) without importing `ultralytics`.

Same split, same outputs as the centernet backend: the split's train/val (test is never read) are
written as an Ultralytics dataset (data/yolo_export.py, label boxes below `regions.min_box_size`
dropped) into a temporary folder, removed after the export (copies of the images have no place in
the registered model); the model config `detector.ultralytics_model` (a .yaml,
random weights: no weight download) trains on the CPU into `<output_dir>/ultralytics` (Ultralytics'
run folder: args.yaml, results.csv, weights/last.pt); the final weights (last.pt, not the
val-picked best.pt) are exported to `detector.onnx` (`[1, 4 + nc, N]`, class names in its
metadata) and measured by train.py's code, as centernet is: detector.json, metrics.json.

Parameters: input_size -> imgsz, batch_size -> batch (and nbs: one optimizer step per batch), lr ->
AdamW lr0 with cosine decay and 5 % warm-up, seed, threads -> torch threads, steps -> whole epochs
(ceil(steps / ceil(train images / batch_size))); crop_size and width are centernet's. Augmentation
(mosaic, flips, HSV, scale) is Ultralytics' own.

Offline: nothing here reaches the network (environment variables and scoped replacements below
say what each would otherwise fetch). Determinism: CPU, `detector.threads` threads, in-process data
loading (workers=0), seeded draws and `deterministic=True` (torch's deterministic algorithms; an op
without one only warns) give the same weights for the same split, params, Ultralytics and torch on
the same kind of CPU; detector.onnx drops the export date and the folder's path, so it is then
byte-identical (tested). Not guaranteed across Ultralytics or torch versions or CPU types; the
Ultralytics run folder's last.pt and best.pt hold the training date, and its args.yaml absolute
paths, so the output folder as a whole is not byte-identical (centernet's is).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from defectvlm.config import Params
from defectvlm.data.images import load_upright
from defectvlm.data.yolo_export import export_yolo
from defectvlm.detector.data import truth_boxes
from defectvlm.detector.loading import ONNX_FILE
from defectvlm.detector.outputs import ONNX_OPSET, WEIGHTS_FILE, write_outputs
from defectvlm.detector.runtime import OnnxDetector, letterbox, to_input
from defectvlm.errors import StepFailure
from defectvlm.io import write_bytes_atomic

DATASET_DIR = "yolo_dataset"
RUN_DIR = "ultralytics"
WARMUP_SHARE = 0.05  # of the epochs, like centernet's 5 % of the steps
# Read by Ultralytics when it is imported, so set before the import:
OFFLINE_ENV = {
    # On import Ultralytics resolves two DNS names to decide whether it is online (for its analytics,
    # error reports and pip update check); this skips the lookup and reports offline.
    "YOLO_OFFLINE": "1",
    # A missing export requirement would be pip-installed from the network: fail instead.
    "YOLO_AUTOINSTALL": "0",
}
MISSING = (
    'detector.backend ultralytics needs the optional Ultralytics package: pip install "defectvlm[ultralytics]". '
    "Ultralytics is licensed AGPL-3.0: a product that ships it, or serves it over a network, must publish its own "
    "source under the AGPL (or hold an Ultralytics enterprise licence). The centernet backend, and running an "
    "exported detector.onnx, do not need it."
)


def import_ultralytics():
    """The `ultralytics` package, imported offline; a StepFailure saying how to install it when missing.

    Importing it patches process globals: `PIL.Image.open` (an unreadable file then makes it try to
    install and load a HEIF plugin), `torch.save`, numpy's and torch's print options. They are put
    back as they were, so the rest of defectvlm in this process (an image check, a saved tensor, a
    printed array) behaves the same whether or not this backend ran."""
    from PIL import Image

    os.environ.update(OFFLINE_ENV)
    saved = Image.open, torch.save, np.get_printoptions(), copy.copy(torch._tensor_str.PRINT_OPTS)
    try:
        import ultralytics
    except ImportError:
        raise StepFailure(MISSING) from None
    finally:
        Image.open, torch.save, numpy_options, torch_options = saved
        np.set_printoptions(**numpy_options)
        torch._tensor_str.PRINT_OPTS = torch_options
    return ultralytics


@contextmanager
def offline_run(threads: int) -> Iterator[None]:
    """Ultralytics module globals replaced for one run and restored afterwards: it has no per-run switch
    for them (its settings file is the user's, for every project).

    - `data.utils.check_font`: checking a dataset fetches Arial.ttf for plots with an HTTP request,
      even with YOLO_OFFLINE set and plots off; no plot is drawn here.
    - `utils.callbacks.add_integration_callbacks`: analytics events, Ultralytics Platform streaming
      (ULTRALYTICS_API_KEY) and the MLflow, DVC, Comet, ClearML... loggers the user's settings turn on
      (defectvlm logs the run to MLflow itself).
    - `utils.torch_utils.NUM_THREADS`: choosing the device sets torch's threads to the CPU count - 1;
      `detector.threads` instead, so the result does not depend on the machine.
    """
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import callbacks, torch_utils

    replaced = [
        (data_utils, "check_font", lambda *args, **kwargs: None),
        (callbacks, "add_integration_callbacks", lambda instance: None),
        (torch_utils, "NUM_THREADS", threads),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    for module, name, value in replaced:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def check_model_config(name: str) -> None:
    """A StepFailure unless `name` is a local model config: a file, or one of the package's (yolo11n.yaml
    is scale n of its yolo11.yaml). Ultralytics would download a URL."""
    from ultralytics.nn.tasks import yaml_model_load

    hint = "a .yaml file, or one of Ultralytics' such as yolo11n.yaml or yolov8n.yaml"
    if "://" in name:
        raise StepFailure(f"detector.ultralytics_model: {name} is a URL (nothing is downloaded); give {hint}")
    try:
        yaml_model_load(name)
    except FileNotFoundError:
        raise StepFailure(f"detector.ultralytics_model: no model config {name!r}; give {hint}") from None


def write_dataset(splits: dict[str, list[dict]], classes: list[str], min_box_size: float, folder: Path) -> Path:
    """train/val as an Ultralytics dataset in a fresh `folder` (no image of an earlier split left);
    returns data.yaml. The label boxes are the detector's truths (truth_boxes), as for centernet."""
    shutil.rmtree(folder, ignore_errors=True)
    rows = {
        name: [
            {**record, "regions": [{**box, "source": "positive"} for box in truth_boxes(record, min_box_size)]}
            for record in records
        ]
        for name, records in splits.items()
    }
    export_yolo(rows, classes, folder)
    return folder / "data.yaml"


def epochs_for(steps: int, batch_size: int, train_images: int) -> int:
    """Whole epochs covering at least `steps` optimizer steps of `batch_size` images."""
    return math.ceil(steps / math.ceil(train_images / batch_size))


def train_args(params: Params, data_yaml: Path, epochs: int, out: Path) -> dict:
    """The Ultralytics training arguments for detector.* (CPU, seeded, deterministic, offline)."""
    p = params.detector
    return {
        "model": p.ultralytics_model,
        "data": str(data_yaml),  # absolute: Ultralytics resolves a relative one under its own datasets folder
        "pretrained": False,  # from scratch: no weights loaded (or downloaded)
        "epochs": epochs,
        "imgsz": p.input_size,
        "batch": p.batch_size,
        "nbs": p.batch_size,  # nominal batch = batch: no gradient accumulation, one step per batch
        "optimizer": "AdamW",  # "auto" would choose its own learning rate
        "lr0": p.lr,
        "cos_lr": True,
        "warmup_epochs": WARMUP_SHARE * epochs,
        "seed": p.seed,
        "deterministic": True,
        "device": "cpu",
        "workers": 0,
        "amp": False,  # the AMP check (CUDA only) downloads a model to test with
        "plots": False,  # plots need fonts (a download)
        "val": False,  # Ultralytics validates the final epoch only; our metrics come from the ONNX file
        "project": str(out),
        "name": RUN_DIR,
        "exist_ok": True,
    }


def train_ultralytics(params: Params, splits: dict[str, list[dict]], classes: list[str], log=print) -> dict:
    """Train, export and check a YOLO detector on `splits` (train, val); returns metrics.json's content."""
    ultralytics = import_ultralytics()
    p = params.detector
    check_model_config(p.ultralytics_model)
    out = Path(p.output_dir).resolve()
    (out / WEIGHTS_FILE).unlink(missing_ok=True)  # a centernet run's weights: not this detector's
    epochs = epochs_for(p.steps, p.batch_size, len(splits["train"]))
    shutil.rmtree(out / RUN_DIR, ignore_errors=True)
    log(f"ultralytics {ultralytics.__version__}: {p.ultralytics_model} from scratch, {epochs} epochs")
    with tempfile.TemporaryDirectory(prefix="defectvlm-yolo-") as scratch:
        data_yaml = write_dataset(splits, classes, params.regions.min_box_size, Path(scratch) / DATASET_DIR)
        model, train_seconds, losses = _fit(params, data_yaml, epochs, out, log)
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with offline_run(p.threads):
                exported = model.export(
                    format="onnx", imgsz=p.input_size, batch=1, opset=ONNX_OPSET, dynamic=False, nms=False,
                    simplify=False, device="cpu",  # simplify needs onnxslim, which it would pip-install
                )  # fmt: skip
        torch.set_num_threads(p.threads)
        write_portable_onnx(Path(exported), out, Path(scratch))

    training = {
        "train_seconds": round(train_seconds, 1),
        "steps": epochs * math.ceil(len(splits["train"]) / p.batch_size),
        "epochs": epochs,
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
    }
    keys = {"model": p.ultralytics_model, "ultralytics": ultralytics.__version__}
    parity = partial(onnx_parity, model.model, records=splits["val"][:2], size=p.input_size)
    return write_outputs(params, splits["val"], classes, keys, training, parity)


def _fit(params: Params, data_yaml: Path, epochs: int, out: Path, log) -> tuple:
    """Ultralytics' trainer, offline, into `out`/ultralytics: (the final model, seconds, loss per epoch)."""
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    losses: list[float] = []

    def epoch_end(trainer) -> None:
        losses.append(float(sum(trainer.tloss.values())))  # box + cls + dfl, mean over the epoch
        log(f"detector epoch {trainer.epoch + 1}/{trainer.epochs}: loss {losses[-1]:.4f}")

    with offline_run(params.detector.threads):
        trainer = DetectionTrainer(overrides=train_args(params, data_yaml, epochs, out))
        trainer.add_callback("on_train_epoch_end", epoch_end)
        started = time.perf_counter()
        trainer.train()
        return YOLO(str(trainer.last)), time.perf_counter() - started, losses


def write_portable_onnx(source: Path, out: Path, scratch: Path) -> None:
    """Ultralytics' export as `out`/detector.onnx without its `date` metadata and with the paths under
    `out` and the temporary `scratch` (the dataset) made relative: equal weights give equal bytes."""
    import onnx

    model = onnx.load(str(source))
    kept = [entry for entry in model.metadata_props if entry.key != "date"]
    for entry in kept:
        entry.value = entry.value.replace(f"{out}{os.sep}", "").replace(f"{scratch}{os.sep}", "")
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    write_bytes_atomic(out / ONNX_FILE, model.SerializeToString())


def onnx_parity(net: torch.nn.Module, detector: OnnxDetector, records: list[dict], size: int) -> dict:
    """torch vs onnxruntime on a few val images: the largest |difference| / max(1, |torch|) over the
    whole output (boxes in pixels: relative; scores: absolute)."""
    net = net.float().eval()
    worst = 0.0
    for record in records:
        canvas, _ = letterbox(load_upright(record["path"]), size, size)
        pixels = to_input(canvas)
        with torch.no_grad():
            output = net(torch.from_numpy(pixels))
        expected = (output[0] if isinstance(output, (list, tuple)) else output).numpy()[0]
        got = detector.session.run(None, {detector.input_name: pixels})[0][0]
        worst = max(worst, float((np.abs(expected - got) / np.maximum(1.0, np.abs(expected))).max()))
    return {"max_rel_diff": float(f"{worst:.3g}")}
