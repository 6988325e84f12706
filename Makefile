# moelab — build, install dependencies, test, demo.
#
#   make          build ./moelab and the Lua module build/moelab.so (installs
#                 missing Debian packages first)
#   make demo     build, fetch the corpus, run experiments/quickstart.lua
#   make test     build and run every test; ends with "N passed, N failed"
#   make asan     the tests under AddressSanitizer and UndefinedBehaviorSanitizer (gcc),
#                 then under clang's UndefinedBehaviorSanitizer where clang is installed
#   make fuzz     libFuzzer on the checkpoint loader, the JSON parser and the
#                 configuration reader, FUZZ_SECONDS each (default 600); needs clang
#   make bench    speed as ratios measured in one run (not part of the tests)
#   make bench-scaling  speed and peak memory against d_model, context and experts
#   make bench-mpi  data parallelism: 2 ranks x 1 thread against 1 rank x 2
#                 threads, training the reference model (tests/bench_mpi.lua)
#   make bench-gemm  single-threaded sgemm on the model's shapes: OpenBLAS against
#                 BLIS, libxsmm and oneDNN (installs GEMM_PKGS for this target only)
#   make data     write data/kjv.txt from the bible-kjv package
#   make deps     install missing Debian packages (needs root)
#   make install  PREFIX (/usr/local) and DESTDIR as usual: bin/moelab,
#                 lib/lua/5.4/moelab.so, share/lua/5.4/moelab/*.lua,
#                 share/moelab/plots/*.gp, share/man/man1/moelab.1
#   make uninstall  removes what make install put there (same PREFIX, DESTDIR)
#   make clean

CC      ?= cc
PKGS    := libgsl-dev libopenblas-dev libsqlite3-dev liblua5.4-dev gnuplot-nox \
           libcmocka-dev pkg-config bible-kjv sqlite3 lua5.4 libsleef-dev libxsmm-dev \
           libopenmpi-dev openmpi-bin
# what `make asan`'s clang pass and `make fuzz` add: libFuzzer and the
# sanitizers' runtimes (libclang-rt-dev), and OpenMP for clang (libomp-dev)
CLANG_PKGS := clang libclang-rt-dev libomp-dev
# what `make bench-gemm` adds: the libraries it measures against OpenBLAS
GEMM_PKGS := libblis-dev libdnnl-dev
# the packages check-deps and deps look at
DEP_PKGS ?= $(PKGS)
BLAS_INC := /usr/include/x86_64-linux-gnu/openblas-pthread
# Open MPI (src/dist.c): linked always, started only under mpirun (README,
# Several machines); the fallbacks are Debian's paths, for a first build
# before pkg-config knows ompi-c
MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null || echo -I/usr/lib/x86_64-linux-gnu/openmpi/include)
MPI_LIBS := $(shell pkg-config --libs ompi-c 2>/dev/null || echo -L/usr/lib/x86_64-linux-gnu/openmpi/lib -lmpi)
OPT     ?= -O3 -march=native
CFLAGS  ?= $(OPT)
# -fPIC for moelab.so; hidden visibility so that it exports luaopen_moelab alone
# and calls stay direct (measured: ./moelab no slower, see README's Install)
# -fno-trapping-math: we never read floating-point exception flags, and without
# it gcc keeps AVX2 loops with a select (a clamp, a ReLU) scalar; it changes no
# result (see README, Speed)
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -fopenmp -fno-math-errno -fno-trapping-math -g -fPIC \
           -fvisibility=hidden \
           -Isrc -I/usr/include/lua5.4 \
           $(shell pkg-config --cflags openblas 2>/dev/null || echo -I$(BLAS_INC)) $(MPI_CFLAGS)
# libxsmm (small products, src/smm.c) is a static library that calls BLAS
# (OpenBLAS) for what it does not JIT-compile: it comes before -lopenblas
LDLIBS  := -llua5.4 -lsqlite3 -lgsl -lxsmm -lopenblas -lsleef $(MPI_LIBS) -lcmocka -lm -lrt -ldl -lpthread -fopenmp
LDLIBS_MAIN := -llua5.4 -lsqlite3 -lgsl -lxsmm -lopenblas -lsleef $(MPI_LIBS) -lm -lrt -ldl -lpthread -fopenmp
# a Lua C module leaves the lua_* symbols to the interpreter that loads it;
# libxsmm's symbols stay inside it (it exports luaopen_moelab alone)
LDLIBS_MODULE := -Wl,--exclude-libs,libxsmm.a -lsqlite3 -lgsl -lxsmm -lopenblas -lsleef $(MPI_LIBS) -lm -lrt -ldl \
                 -lpthread -fopenmp

BUILD   ?= build
CORE    := common config json machine dist smm ops moe/router moe/layer moe/parallel moe/stratified moe/merge moe/moefy model data safetensors checkpoint placement
RECORD  := recorder recwriter paths plot plot_figures trainer
BIND    := lmoelab
LIBOBJ  := $(addprefix $(BUILD)/,$(addsuffix .o,$(CORE) $(RECORD) $(BIND)))
TESTS   := $(patsubst tests/%.c,%,$(wildcard tests/test_*.c))
PLOTS_DIR := $(CURDIR)/plots
BIN     ?= moelab
MODULE  := $(BUILD)/moelab.so

PREFIX  ?= /usr/local
DESTDIR ?=
LUA_V   := 5.4
BINDIR  := $(PREFIX)/bin
LUA_CDIR := $(PREFIX)/lib/lua/$(LUA_V)
LUA_LDIR := $(PREFIX)/share/lua/$(LUA_V)
DATADIR := $(PREFIX)/share/moelab
MAN1DIR := $(PREFIX)/share/man/man1
LUA_LIB := $(wildcard lua/moelab/*.lua)
PLOT_GP := $(wildcard plots/*.gp)

.PHONY: all deps data demo test asan bench bench-scaling bench-mpi bench-gemm clean check-deps install uninstall \
        fuzz fuzz-build

all: check-deps $(BIN) $(MODULE)

# Installs only what is missing; quiet when everything is there.
check-deps:
	@missing=""; for p in $(DEP_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(MAKE) --no-print-directory deps; fi

deps:
	@missing=""; for p in $(DEP_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
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

# The Lua module for a stock lua5.4: `require "moelab"` calls luaopen_moelab.
$(MODULE): $(LIBOBJ)
	$(CC) $(CFLAGS) -shared -o $@ $^ $(LDLIBS_MODULE)

# The installed program and module find the installed plots and Lua helpers
# from where they are (src/paths.h), so installing is copying what was built.
# Paths are quoted: PREFIX and DESTDIR may hold spaces.
install: all
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(LUA_CDIR)" "$(DESTDIR)$(LUA_LDIR)/moelab" \
	  "$(DESTDIR)$(DATADIR)/plots" "$(DESTDIR)$(MAN1DIR)"
	install -m 755 $(BIN) "$(DESTDIR)$(BINDIR)/moelab"
	install -m 644 $(MODULE) "$(DESTDIR)$(LUA_CDIR)/moelab.so"
	install -m 644 $(LUA_LIB) "$(DESTDIR)$(LUA_LDIR)/moelab"
	install -m 644 $(PLOT_GP) "$(DESTDIR)$(DATADIR)/plots"
	install -m 644 doc/moelab.1 "$(DESTDIR)$(MAN1DIR)/moelab.1"

# Removes the files install copied and the folders that are moelab's own;
# shared folders (bin, lib/lua/5.4, man1) stay.
uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/moelab" "$(DESTDIR)$(LUA_CDIR)/moelab.so" \
	  "$(DESTDIR)$(MAN1DIR)/moelab.1"
	rm -f $(foreach f,$(notdir $(LUA_LIB)),"$(DESTDIR)$(LUA_LDIR)/moelab/$(f)")
	rm -f $(foreach f,$(notdir $(PLOT_GP)),"$(DESTDIR)$(DATADIR)/plots/$(f)")
	@for d in "$(DESTDIR)$(LUA_LDIR)/moelab" "$(DESTDIR)$(DATADIR)/plots" "$(DESTDIR)$(DATADIR)"; do \
	  [ ! -d "$$d" ] || rmdir "$$d" 2>/dev/null || echo "uninstall: kept $$d: it holds other files"; done

$(BUILD)/bench_%: tests/bench_%.c tests/testutil.h $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS)

# tools/dump_grads.c: moelab's gradients on one batch, for tools/compare_grads.py
$(BUILD)/dump_grads: tools/dump_grads.c $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS_MAIN)

$(BUILD)/test_%: tests/test_%.c tests/testutil.h tests/testmodel.h tests/testproc.h $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -DMOELAB_PLOTS_DIR='"$(PLOTS_DIR)"' -Itests -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS)

data: data/kjv.txt

data/kjv.txt: | check-deps
	@mkdir -p data
	bible "Gen1:1-Rev22:21" > data/kjv.txt.tmp && mv data/kjv.txt.tmp data/kjv.txt
	@echo "data: wrote data/kjv.txt ($$(wc -c < data/kjv.txt) bytes)"

demo: all data/kjv.txt
	./moelab run experiments/quickstart.lua

# test_threads runs again on OpenBLAS's and libxsmm's AVX2 kernels (Haswell,
# what AMD machines use) and, where the processor has AVX-512, on those
# (SkylakeX): the same bits on any thread count must hold for each kernel
# family, whichever the machine. test_grad and test_threads run once more with
# libxsmm's JIT off (@nojit, tests/run.sh): OpenBLAS then computes the small
# products that libxsmm's kernels otherwise do (src/smm.h).
CORES   := Haswell $(shell grep -q avx512f /proc/cpuinfo 2>/dev/null && echo SkylakeX)

# passive OpenMP waiting for the tests: CI shares its machine, and the tests
# time nothing (moelab itself spins briefly first; see main.c).
# test_install runs make install and make uninstall with this BUILD, BIN and OPT
# into a temporary prefix, and the stock lua5.4 on the installed module; a
# module built with AddressSanitizer loads into it only after its runtime.
# (clang's UBSan pass: its runtime, which the stock interpreter lacks too)
LUA_PRELOAD = $(if $(findstring -fsanitize=address,$(CFLAGS)),$(shell $(CC) -print-file-name=libasan.so),$(if \
  $(and $(findstring clang,$(CC)),$(findstring -fsanitize=undefined,$(CFLAGS))),$(shell \
  $(CC) -print-file-name=libclang_rt.ubsan_standalone-x86_64.so)))
test: check-deps $(BIN) $(MODULE) $(addprefix $(BUILD)/,$(TESTS))
	@OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} BUILD=$(BUILD) MOELAB=$(CURDIR)/$(BIN) \
	  MOELAB_SRC=$(CURDIR) MOELAB_MAKE=$(MAKE) BIN=$(BIN) OPT="$(OPT)" MOELAB_LUA=lua$(LUA_V) \
	  MOELAB_LUA_PRELOAD="$(LUA_PRELOAD)" sh tests/run.sh $(TESTS) $(addprefix test_threads@,$(CORES)) \
	  test_grad@nojit test_threads@nojit

# Speed, as ratios measured in one run (SPEC §5); not part of the tests.
# First what a user gets (run:train and run:evaluate on the corpus; the
# ratios the targets are judged on), then the layers alone and the recorder.
# BENCH_ARGS: bench_user.lua's options, e.g. BENCH_ARGS="steps=300".
bench: all data/kjv.txt $(BUILD)/bench_moe $(BUILD)/bench_recorder
	@./$(BIN) run tests/bench_user.lua $(BENCH_ARGS)
	@echo
	@if [ -z "$$OMP_WAIT_POLICY$$GOMP_SPINCOUNT" ]; then export GOMP_SPINCOUNT=300; fi; \
	  $(BUILD)/bench_moe
	@echo
	@$(BUILD)/bench_recorder

# How speed and memory scale with d_model, context and experts (README, Speed).
bench-scaling: all data/kjv.txt
	@MOELAB=./$(BIN) ./$(BIN) run tests/bench_scaling.lua $(BENCH_ARGS)

bench-mpi: all data/kjv.txt
	@MOELAB=./$(BIN) ./$(BIN) run tests/bench_mpi.lua $(BENCH_ARGS)

# OpenBLAS against BLIS, libxsmm and oneDNN on the model's sgemm shapes, one
# thread each (tests/bench_gemm.c; issue 11); BENCH_GEMM_ARGS="samples ms" to
# change its 31 samples of about 4 ms. Only this target links those libraries;
# OpenBLAS comes first, so that cblas_sgemm is OpenBLAS's (BLIS has one too).
GEMM_LDLIBS := -lopenblas -lblis -lxsmm -ldnnl -lm -ldl -lrt -lpthread -fopenmp
bench-gemm:
	@$(MAKE) --no-print-directory check-deps DEP_PKGS="$(PKGS) $(GEMM_PKGS)"
	@$(MAKE) --no-print-directory $(BUILD)/bench_gemm
	@$(BUILD)/bench_gemm $(BENCH_GEMM_ARGS)

$(BUILD)/bench_gemm: tests/bench_gemm.c $(BUILD)/machine.o $(BUILD)/smm.o $(BUILD)/common.o | $(BUILD)
	$(CC) $(CFLAGS) -o $@ $^ $(GEMM_LDLIBS)

# clang's UBSan checks what gcc's does not (applying an offset to a null
# pointer, for one), so where clang is installed the tests run a second time
# under it. CLANG_O1: clang does not vectorize at -O1 and says so for every
# `omp simd` loop (-Wpass-failed); that is the optimisation level, not the code.
CLANG_O1 := -O1 -Wno-pass-failed -fno-omit-frame-pointer
asan:
	$(MAKE) --no-print-directory test BUILD=build-asan BIN=build-asan/moelab \
	  OPT="-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
	@if command -v clang >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory check-deps DEP_PKGS="$(CLANG_PKGS)" && \
	  $(MAKE) --no-print-directory test CC=clang BUILD=build-ubsan-clang BIN=build-ubsan-clang/moelab \
	    OPT="$(CLANG_O1) -fsanitize=undefined -fno-sanitize-recover=undefined"; \
	else echo "asan: clang is not installed; skipping the clang UBSan pass"; fi

# libFuzzer harnesses (tests/fuzz/), each run for FUZZ_SECONDS on a corpus
# seeded with real checkpoints; fails if any harness crashes (the input is
# kept in build-fuzz/artifacts/). make fuzz FUZZ_SECONDS=30 for a quick run.
FUZZ_SECONDS ?= 600
FUZZERS := checkpoint json config
FUZZ_OPT := $(CLANG_O1) -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined

fuzz:
	@$(MAKE) --no-print-directory check-deps DEP_PKGS="$(PKGS) $(CLANG_PKGS)"
	@$(MAKE) --no-print-directory fuzz-build CC=clang BUILD=build-fuzz OPT="$(FUZZ_OPT)"
	@OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
	  sh tests/fuzz/run.sh build-fuzz $(FUZZ_SECONDS) $(FUZZERS)

# make fuzz's build step; it sets CC, BUILD and OPT.
fuzz-build: $(addprefix $(BUILD)/fuzz_,$(FUZZERS)) $(BUILD)/corpus/.seeded

$(BUILD)/fuzz_%: tests/fuzz/fuzz_%.c $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -fsanitize=fuzzer -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS_MAIN)

$(BUILD)/make_seeds: tests/fuzz/make_seeds.c $(BUILD)/libmoelab.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoelab.a $(LDLIBS_MAIN)

$(BUILD)/corpus/.seeded: $(BUILD)/make_seeds
	OMP_NUM_THREADS=1 $(BUILD)/make_seeds $(BUILD)/corpus && touch $@

clean:
	rm -rf build build-asan build-ubsan-clang build-fuzz moelab
