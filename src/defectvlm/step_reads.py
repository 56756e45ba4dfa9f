"""What the steps of `defectvlm.steps` read: the params keys and source files (their DVC code
deps) that several steps share. tests/pipeline/test_stage_reads.py checks every step's lists
against what it really reads."""

SRC = "src/defectvlm/"
CORE = tuple(SRC + f for f in ("cli.py", "config", "io.py", "step_functions.py"))
DATA_KEYS = ("data.abnormal_root", "data.normal_root")
LABEL_KEYS = ("labels.format", "labels.coord_format", "labels.label_map")
SCAN_KEYS = ("ingest.verify", "ingest.image_extensions", "ingest.workers")
SCAN_CODE = tuple(SRC + f"data/{f}.py" for f in ("images", "ingest", "labels", "pairing"))
TINY_WEIGHTS = SRC + "models/tiny_pretrained"  # model.name_or_path: tiny loads them (a new base reruns the steps)
MODEL_CODE = (
    *(SRC + f"models/{f}.py" for f in ("attention", "families", "loading", "tiny", "tiny_families")),
    TINY_WEIGHTS,
)
TRAIN_KEYS = tuple(
    f"train.{key}"
    for key in (
        "output_dir", "deepspeed", "seed", "batch_size", "grad_accum", "max_length", "group_by_length", "num_workers",
        "warmup_ratio", "weight_decay", "max_grad_norm", "gradient_checkpointing", "qlora", "logging_steps",
        "eval_steps", "save_steps", "save_total_limit", "metric_for_best_model", "greater_is_better", "lora",
    )
)  # fmt: skip
TRAIN_FILES = ("artifacts", "build", "checkpoints", "data", "distributed", "loader", "loop", "phases", "validation")
# training picks its best checkpoint with the scoring pass (evaluate/), whose answers use the templates
TRAIN_CODE = (
    *CORE,
    *MODEL_CODE,
    *(SRC + f"train/{f}.py" for f in TRAIN_FILES),
    *(SRC + f"evaluate/{f}.py" for f in ("metrics", "scoring", "shared_prefix")),
    *(SRC + f"data/{f}.py" for f in ("images", "sft")),
    SRC + "data/templates",
)
# the adapter carries the prompt it was trained with (best/prompt.json), built from these
PROMPT_KEYS = tuple(
    f"sft.{key}"
    for key in ("crop_size", "knowledge", "language", "region_encoding", "regions_per_prompt", "summary", "templates")
)
PHASES_ENABLED = tuple(f"train.phase{n}.enabled" for n in (1, 2, 3))
# a registered model scoring images: load_model, the training prompt (sft + templates), the scoring pass
SCORING_CODE = (
    *CORE,
    *MODEL_CODE,
    *(SRC + f"inference/{f}.py" for f in ("loading", "predict", "sources")),
    *(SRC + f"train/{f}.py" for f in ("artifacts", "data")),
    *(SRC + f for f in ("data/images.py", "data/sft.py", "data/templates", "evaluate/scoring.py", "seeding.py")),
    SRC + "evaluate/shared_prefix.py",
)
PREDICT_CODE = (
    *SCORING_CODE,
    *(SRC + f for f in ("inference/report.py", "detector/loading.py", "detector/runtime.py")),
)
EXPORT_CODE = (*SCORING_CODE, SRC + "inference/export.py", SRC + "train/phases.py")
DEPLOY_CODE = tuple(
    SRC + f
    for f in ("config", "io.py", "step_functions.py", "serve/deploy.py", "cluster/images.py", "tracking/registry.py")
)
RAW = ("${data.abnormal_root}", "${data.normal_root}")
# the detector's proposals (its folder's detector.json may override them)
PROPOSAL_KEYS = ("detector.confidence", "detector.nms_iou", "detector.threads", "regions.max_boxes_per_image")
# an InferenceService: the image, resources and scheduling of `cluster`, the serving settings
DEPLOY_KEYS = (
    *(f"cluster.{key}" for key in ("image_registry", "secrets", "service_account", "accelerator_type", "gpus")),
    *(f"cluster.{key}" for key in ("train_cpu", "train_memory", "node_selector", "tolerations")),
    *("model.min_pixels", "model.max_pixels", "registry.require_export_parity"),
    *("serve.max_boxes", "serve.token_env", "tracking.uri"),
)
# regions.negatives_from: detector | both trains out-of-fold detectors with train_detector's code and
# detector.* settings (not output_dir: they write nothing there)
OUT_OF_FOLD_KEYS = tuple(
    f"detector.{k}"
    for k in (
        "batch_size",
        "confidence",
        "crop_size",
        "input_size",
        "lr",
        "nms_iou",
        "seed",
        "steps",
        "threads",
        "width",
    )
)
REGIONS_CODE = (
    *CORE,
    *(SRC + f"data/{f}.py" for f in ("boxes", "images", "regions")),
    SRC + "models/families.py",
    SRC + "seeding.py",
    *(SRC + f"detector/{f}.py" for f in ("data", "model", "out_of_fold", "runtime", "train")),
)
