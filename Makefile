# make demo | make test | make lab | make playground | make serve  (each sets up .venv and the trained model first)
# LIBRARY=ipex-llm: the same on ipex-llm, bigdl-llm's successor, in .venv-ipex-llm (make test runs the tests that
# load and decode, notebooks 02 and 03 and the serving tests there).
PYTHON ?= python3.11
LIBRARY ?= bigdl-llm
$(if $(filter $(LIBRARY),bigdl-llm ipex-llm),,$(error LIBRARY=$(LIBRARY) is not a library this project runs on: use bigdl-llm or ipex-llm))
VENV := $(if $(filter $(LIBRARY),ipex-llm),.venv-ipex-llm,.venv)
REQUIREMENTS := $(if $(filter $(LIBRARY),ipex-llm),requirements-ipex-llm.txt,requirements.txt)
CONSTRAINTS := $(if $(filter $(LIBRARY),ipex-llm),constraints-ipex-llm.txt,constraints.txt)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKPOINT := data/models/rwkv-4-world-shakespeare/config.json

.PHONY: install demo test lab playground serve checkpoint clean

$(STAMP): $(REQUIREMENTS) $(CONSTRAINTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==24.3.1
	$(PY) -m pip install --quiet -r $(REQUIREMENTS) -c $(CONSTRAINTS)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The fused decoding step's builds for this CPU, compiled into ~/.cache/rwkv-int4-notebooks/kernels (or
# RWKV_KERNEL_CACHE); KERNEL_CHECK=--werror (CI) compiles each with warnings as errors first.
KERNELS_STAMP := $(VENV)/.kernels
$(KERNELS_STAMP): helpers/runtime/rwkv4_decode.c helpers/runtime/fused_decode.py $(STAMP)
	$(PY) -m helpers.tools.build_kernels $(KERNEL_CHECK)
	touch $(KERNELS_STAMP)

install: $(STAMP) $(KERNELS_STAMP)

$(CHECKPOINT): data/trained/rwkv-4-world-shakespeare.safetensors helpers/runtime/tokenization_rwkv_world.py | $(STAMP)
	$(PY) -m helpers.tools.checkpoint --trained

checkpoint: $(CHECKPOINT)

demo: install $(CHECKPOINT)
	$(PY) -m helpers.tools.generate

# The torch path of a CPU without AVX-512 and without a C compiler: bigdl-llm's avx2 kernels, no fused
# step (with a compiler, such a CPU runs the fused step's avx2 build, whose logits equal the avx512
# build's bit for bit: tests/test_fused_decode.py). The tests that decode, and notebooks 02, 03 and 06, run
# again on it against the same committed outputs.
AVX2_PATH := RWKV_FUSED_DECODE=0 RWKV_NATIVE_BUILD=avx2
AVX2_PATH_TESTS := tests/test_low_bit.py tests/test_batching.py tests/test_chat.py notebooks/02_int4_loading.ipynb \
	notebooks/03_generate.ipynb notebooks/06_chat.ipynb

# AS_CPU=epyc-zen3 runs every test as that CPU would see it (tests/cpus/epyc-zen3.cpuinfo: AVX2 and FMA, no
# AVX-512, no VNNI), torch's kernels included; each pass's header says which builds it checked.
AS_CPU_ENV := $(if $(AS_CPU),RWKV_CPUINFO=$(CURDIR)/tests/cpus/$(AS_CPU).cpuinfo ATEN_CPU_CAPABILITY=avx2)

# On ipex-llm: the tests that load, convert, cache and decode, the library's own choice and versions, notebooks 02
# and 03 against the outputs bigdl-llm committed, and the serving tests; not those marked library_independent
# (pyproject.toml: the same on either library), which the first pass runs.
IPEX_LLM_TESTS := tests/test_settings.py tests/test_cpu.py tests/test_low_bit.py tests/test_tensor_loading.py \
	tests/test_low_bit_cache.py tests/test_fused_decode.py tests/test_batching.py tests/test_serving.py \
	notebooks/02_int4_loading.ipynb notebooks/03_generate.ipynb

# The tests run in TEST_PROCESSES processes (pytest-xdist; 0: in pytest's own), each test file and notebook whole
# in one of them (tests/conftest.py builds the files they share first). Their OpenMP threads sleep while they wait
# (OMP_WAIT_POLICY=passive) rather than spin on the cores another process is decoding on.
#
# Notebook 02 removes the trained model's low-bit cache, which other tests read, to show it made again: it runs
# first, on its own.
TEST_PROCESSES ?= 2
PYTEST := OMP_WAIT_POLICY=passive $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile
ALONE := notebooks/02_int4_loading.ipynb

ifeq ($(LIBRARY),ipex-llm)
test: install $(CHECKPOINT)
	RWKV_LIBRARY=ipex-llm $(AS_CPU_ENV) $(PY) -m pytest $(ALONE)
	RWKV_LIBRARY=ipex-llm $(AS_CPU_ENV) $(PYTEST) $(filter-out $(ALONE),$(IPEX_LLM_TESTS)) -m "not library_independent"
else
test: install $(CHECKPOINT)
	$(VENV)/bin/ruff check helpers tests examples
	$(AS_CPU_ENV) $(PY) -m pytest $(ALONE)
	$(AS_CPU_ENV) $(PYTEST) --ignore=$(ALONE)
	$(AS_CPU_ENV) $(AVX2_PATH) $(PY) -m pytest $(ALONE)
	$(AS_CPU_ENV) $(AVX2_PATH) $(PYTEST) $(filter-out $(ALONE),$(AVX2_PATH_TESTS))
endif

lab: install $(CHECKPOINT)
	$(VENV)/bin/jupyter lab notebooks/

playground: install $(CHECKPOINT)
	$(VENV)/bin/voila notebooks/05_prompt_playground.ipynb --no-browser --Voila.ip=127.0.0.1 --port=8866

# The OpenAI-compatible API on $(SERVE_HOST):$(PORT): FastChat's controller, $(WORKERS) RWKV worker(s), the API
# server. API_KEYS=key1,key2 (or RWKV_API_KEYS in the environment): clients must send one; needed for a
# SERVE_HOST other hosts can reach. STATE_CACHE_MB: each worker's memory for the states of prompt prefixes
# (chat turns, system prompts) that later requests begin with. LOW_BIT: the weights' format (sym_int4_head8: with
# the head in sym_int8). (The recipe is not echoed: it holds the keys.)
PORT ?= 8000
WORKERS ?= 1
MAX_BATCH ?= 16
MAX_QUEUE ?= $(MAX_BATCH)
STATE_CACHE_MB ?= 256
LOW_BIT ?= sym_int4
SERVE_HOST ?= 127.0.0.1
# API_KEYS counts when given to make, not when another program's is in the environment
SERVE_KEYS = $(if $(filter command line,$(origin API_KEYS)),$(API_KEYS),$(RWKV_API_KEYS))
serve: install $(CHECKPOINT)
	@RWKV_API_KEYS="$(SERVE_KEYS)" $(PY) -m helpers.serving --host $(SERVE_HOST) --port $(PORT) --workers $(WORKERS) \
		--max-batch $(MAX_BATCH) --max-queue $(MAX_QUEUE) --state-cache-mb $(STATE_CACHE_MB) --low-bit $(LOW_BIT)

clean:
	rm -rf .venv .venv-ipex-llm data/models build
