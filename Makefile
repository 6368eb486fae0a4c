# Two commands do all set-up on a fresh machine:
#   make run   ARGS="--port tcp:8888"   run dockerspaces (creates .venv)
#   make test                            run the whole test suite (creates .venv)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
ARGS   ?= --port tcp:8888
TESTS  ?= tests

.PHONY: run test lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd --nodaemon --pidfile= dockerspaces $(ARGS)

test: $(VENV)/.installed
	$(PY) -m twisted.trial $(TRIAL_ARGS) $(TESTS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dockerspaces tests bench
	$(VENV)/bin/mypy dockerspaces

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
