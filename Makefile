# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install the exact versions in constraints.txt.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast lint lock bench clean images docs

# torch/torchvision first and pinned: transformers' Qwen-VL image processors need torchvision,
# and this exact pair is the one every machine of the team (and CI) installs.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m defectvlm.train.prebuild
	touch $@

install: $(VENV)/.installed

# The raw folders are versioned by DVC (`dvc add`: data/raw/*.dvc, content in the DVC cache),
# so a registered model's data version can be restored with `dvc checkout`.
data/raw/demo_summary.json: | $(VENV)/.installed
	$(BIN)/defectvlm demo-data --out data/raw
	$(BIN)/dvc add -q data/raw/abnormal_root data/raw/normal_root

# The pipeline is `dvc repro` and nothing else: data -> detector and VLM phases -> evaluate -> the cascade
# (detector alone vs detector + VLM) -> register -> predict and export of the registered version. Every
# step records its time; the run ends with the table of them, the CPU model and the calibration figure.
demo: $(VENV)/.installed data/raw/demo_summary.json
	rm -f reports/stage_times.jsonl
	DEFECTVLM_STAGE_TIMES=reports/stage_times.jsonl $(BIN)/dvc repro
	$(BIN)/defectvlm stage-times --file reports/stage_times.jsonl
	@echo "demo done: reports/report.md, reports/cascade/cascade_report.md, reports/predict/report.html; the registered version exported to exports/candidate"

# Both over the two cores (pytest-xdist): a test file stays on one worker, so its module fixtures are built once.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=20

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks

# The docs site (mkdocs.yml, docs/) into site/; --strict turns a broken link or a missing page into an error.
docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_ingest.py --keep
	$(BIN)/python benchmarks/bench_prepare.py

# The cluster pipeline's images, named as pipelines/finetune.yaml names them (cluster.image_registry
# in params.yaml); needs Docker with BuildKit. Push them with `docker push <name>`.
images: $(VENV)/.installed
	for kind in data train; do \
	  docker build -f dockerfiles/$$kind.Dockerfile --build-arg GIT_COMMIT=$$(git rev-parse HEAD) -t $$($(BIN)/python -m defectvlm.cluster.images $$kind) . || exit 1; \
	done

# Re-resolve and pin every dependency (run after changing pyproject.toml).
lock: $(VENV)/.installed
	{ echo "# Exact versions of everything \`make\` installs (regenerate with \`make lock\`)."; \
	  echo "# A commit plus a data version reproduce the same environment from this file."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v "^defectvlm"; } > constraints.txt

clean:
	rm -rf $(VENV) data runs reports site .pytest_cache .hypothesis
