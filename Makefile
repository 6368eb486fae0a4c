# Two commands do all set-up on a fresh machine:
#   make run   ARGS="--port tcp:8888"   run dockerspaces (creates .venv)
#   make test                            run the whole test suite (creates .venv)
# and three more legs of CI:
#   make test-fast-off                   the unit tests with every fast path of
#                                        dockerspaces/twistedseam.py off
#   make test-deps DEPS=oldest|newest    the unit tests in a fresh venv (DEPS_VENV) on
#                                        ci/constraints-$(DEPS).txt
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
ARGS   ?= --port tcp:8888
TESTS  ?= tests
UNIT    = $(subst /,.,$(basename $(wildcard tests/test_*.py)))
DEPS   ?= oldest
DEPS_VENV ?= /tmp/dockerspaces-deps-$(DEPS)

.PHONY: run test test-fast-off test-deps lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd --nodaemon --pidfile= dockerspaces $(ARGS)

test: $(VENV)/.installed
	$(PY) -m twisted.trial $(TRIAL_ARGS) $(TESTS)

test-fast-off: $(VENV)/.installed
	DOCKERSPACES_FAST_PATHS=0 $(PY) -m twisted.trial $(TRIAL_ARGS) $(UNIT)

test-deps:
	rm -rf $(DEPS_VENV)
	$(PYTHON) -m venv $(DEPS_VENV)
	$(DEPS_VENV)/bin/python -m pip install -q -c ci/constraints-$(DEPS).txt -e '.[test]' \
	    --config-settings editable_mode=compat
	$(DEPS_VENV)/bin/python -m twisted.trial $(TRIAL_ARGS) $(UNIT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dockerspaces tests bench
	$(VENV)/bin/ruff format --check dockerspaces tests bench twisted
	$(VENV)/bin/mypy dockerspaces

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
