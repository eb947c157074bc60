# `make test` and `make demo` set themselves up from nothing: a .venv beside this file,
# the package installed editable with the extras each needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test demo venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test,examples]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(VENV)/bin/lora-jax demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
