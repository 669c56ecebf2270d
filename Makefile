# Two commands on a fresh machine:  `make demo` (the main job on the embedded default)  and  `make test`.
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --no-cache-dir -r requirements.txt
	# sam2 is an sdist: build it against the torch above, without CUDA kernels (they are optional in sam2)
	SAM2_BUILD_CUDA=0 .venv/bin/pip install -q --no-cache-dir --no-build-isolation --no-deps sam2==1.1.0
	touch $@

venv: .venv/installed

demo: venv
	$(PY) demo.py

test: venv
	$(PY) -m pytest tests -q

.PHONY: venv demo test
