# The two commands a newcomer needs: `make train` and `make test`. Both install into .venv first.
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := .venv/bin/pip
# albumentations asks the internet for a newer release at import unless told not to; hsflow never downloads.
export NO_ALBUMENTATIONS_UPDATE := 1
# MLflow 3 reports usage to its telemetry service unless told not to: off for every target (the mlflow servers too);
# `make ui MLFLOW_DISABLE_TELEMETRY=false` turns it on.
export MLFLOW_DISABLE_TELEMETRY ?= true
export PYTHONUNBUFFERED := 1
# Keep freed feature-map memory in the heap instead of returning it to the kernel (3x faster CPU forwards; see
# hsflow/__init__.py, which sets the same for `python -m hsflow.*` run by hand).
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install train refresh test test-fast bench bench-scale ui serve review score crawl-demo server server-stop clean

# Re-install only when the project's requirements change.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

install: .venv/.installed

train: install            ## train the default model on the shipped demo (offline, CPU, minutes)
	$(PY) -m hsflow.train experiment=recommended $(ARGS)

refresh: install          ## new rulings in the store: train a challenger, score it and the champion on the newest complete year, promote or keep (docs/refresh.md)
	$(PY) -m hsflow.refresh experiment=recommended $(ARGS)

test: install             ## run the test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: install        ## while editing: the in-process unit tests only (no training CLI, server or crawl), < 2 min
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: install            ## speed figures side by side -> bench/results.json
	$(PY) bench/speed.py $(ARGS)

bench-scale: install      ## 3,000 codes / ~26,000 photos, stage by stage -> bench/scale_3000.json (ARGS="955 42": demo size)
	bash bench/scale.sh $(ARGS)

ui: install               ## MLflow UI over the project's tracking store on http://127.0.0.1:5000 (prints a link per experiment)
	$(PY) -m hsflow.ui $(ARGS)

serve: install            ## the champion (else the latest make-train model) as a REST service: POST base64 photos to http://127.0.0.1:5001/invocations
	$(PY) -m hsflow.serve $(ARGS)

score: install            ## a batch of photos scored on Spark (or --engine local): ARGS="--output out.jsonl DIR..." (docs/recommend.md)
	$(PY) -m hsflow.score $(ARGS)

review: install           ## the review page over the champion (else the latest make-train model) on http://127.0.0.1:8000
	$(PY) -m hsflow.review $(ARGS)

server: install           ## a team's tracking server: PostgreSQL + mlflow server with sign-in on http://127.0.0.1:5000, data in data/server (docs/team.md)
	$(PY) -m hsflow.server start $(ARGS)

server-stop: install      ## stop `make server` (both processes; the data stays)
	$(PY) -m hsflow.server stop $(ARGS)

crawl-demo: install       ## serve the shipped demo through the local portal stand-in and crawl it into data/crawl
	$(PY) -m crawler.crawl_demo $(ARGS)

clean:
	rm -rf outputs multirun cache .pytest_cache
