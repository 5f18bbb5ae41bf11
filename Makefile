# torch_lmdb: one entry point.
#   make demo    install missing Debian packages, build, run the end-to-end demo (examples/demo.py)
#   make test    install missing Debian packages, build, run ctest + the C++ example + pytest
#   make build   C++ library, tests and the Python extension (in place)
#   make install PREFIX=/usr/local
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= /usr/bin/python3
BUILD ?= build/cmake
PREFIX ?= $(CURDIR)/build/install
JOBS ?= $(shell nproc)

DEB_PACKAGES := build-essential cmake ninja-build ccache pkg-config libtorch-dev python3-torch \
  liblmdb-dev libcereal-dev nlohmann-json3-dev pybind11-dev libxxhash-dev libgtest-dev libbenchmark-dev \
  python3-dev python3-numpy python3-lmdb python3-zarr python3-h5py python3-pytest python3-pytest-xdist python3-tqdm python3-yaml \
  python3-matplotlib python3-venv python3-setuptools lmdb-utils dataset-fashion-mnist \
  libblosc-dev python3-dask python3-distributed libcurl4-openssl-dev nginx-light liburing-dev

# Compilers and runtimes of the checking builds (test-sanitize, test-tsan, test-odr, fuzz).
# Not in DEB_PACKAGES: that list keys the cached Debian 13 root.
SANITIZER_PACKAGES := clang-14 libclang-rt-14-dev llvm-14
FUZZ_SECONDS ?= 60

.PHONY: print-deb-packages test-debian13 sanitizer-deps test-sanitize test-tsan test-odr fuzz fuzz-build fuzz-corpus test demo deps build cmake-build python-build install lib-install examples example-cpp ctest pytest clean

test: deps build ctest example-cpp pytest

demo: deps python-build examples
	$(PYTHON) examples/demo.py --work build/demo --bin build/examples

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing Debian packages; run:"; echo "  sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

build: cmake-build python-build

cmake-build:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=$(PREFIX)
	cmake --build $(BUILD) -j $(JOBS)

# Through ccache where installed, with paths relative to the tree: the pip-install test
# (tests/python/test_stack.py) builds a copy of the tree and finds these objects again.
CCACHE_ENV = $(if $(wildcard /usr/lib/ccache),PATH=/usr/lib/ccache:$$PATH CCACHE_BASEDIR=$(CURDIR) CCACHE_NOHASHDIR=1)
python-build:
	$(CCACHE_ENV) MAX_JOBS=$(JOBS) $(PYTHON) setup.py -q build_ext --inplace --build-temp build/python

install: cmake-build
	cmake --install $(BUILD) --prefix $(PREFIX)

# The library alone (no tests), installed: what the examples need.
lib-install:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=$(PREFIX)
	cmake --build $(BUILD) -j $(JOBS) --target torch_lmdb
	cmake --install $(BUILD) --prefix $(PREFIX)

# Native example trainers (radio localization, Fashion-MNIST) against the installed package.
examples: lib-install
	cmake -S examples -B build/examples -G Ninja -DCMAKE_PREFIX_PATH=$(PREFIX)
	cmake --build build/examples -j $(JOBS)

ctest: cmake-build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --no-tests=error

# The install test: a standalone project that find_package()s the installed library.
example-cpp: install
	cmake -S examples/cpp -B build/example-cpp -G Ninja -DCMAKE_PREFIX_PATH=$(PREFIX)
	cmake --build build/example-cpp
	build/example-cpp/train_tiny build/example-cpp/tiny.lmdb

# pytest runs $(JOBS) test processes (pytest-xdist). PYTEST_MARK selects by marker, e.g.
# PYTEST_MARK='not storm' leaves out the long storms and damage runs (tests/python/conftest.py).
PYTEST_MARK ?=
pytest: python-build cmake-build examples
	TORCH_LMDB_ROUNDTRIP=$(CURDIR)/$(BUILD)/torch_lmdb_roundtrip TORCH_LMDB_EXAMPLES_BIN=$(CURDIR)/build/examples \
	  $(PYTHON) -m pytest -q -rs --durations=15 -n $(JOBS) tests/python -p no:cacheprovider $(if $(PYTEST_MARK),-m "$(PYTEST_MARK)")

clean:
	rm -rf build torch_lmdb/_C*.so *.egg-info

# The same `make test` inside a Debian 13 root (torch 2.6, Python 3.13, zarr 3), cached
# outside the clone (see tools/debian13.sh).
test-debian13:
	tools/debian13.sh test

print-deb-packages:
	@echo $(DEB_PACKAGES)

# ---- checking builds: the C++ library + gtests only, each in its own build dir ----
# Package install as in `deps`, for the sanitizer toolchain.
sanitizer-deps: deps
	@missing=$$(for p in $(SANITIZER_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing Debian packages; run:"; echo "  sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

CHECK_CMAKE = cmake -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTORCH_LMDB_BUILD_TOOLS=OFF
SAN_ENV = ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
  LSAN_OPTIONS=suppressions=$(CURDIR)/tests/sanitizers/lsan.supp:print_suppressions=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$(CURDIR)/tests/sanitizers/ubsan.supp \
  ASAN_SYMBOLIZER_PATH=/usr/bin/llvm-symbolizer-14

# AddressSanitizer + UndefinedBehaviorSanitizer (clang-14), every gtest. The same
# build dir holds the fuzz targets (the library is built once for both).
ASAN_CONFIGURE = $(CHECK_CMAKE) -S . -B build/asan -DCMAKE_CXX_COMPILER=clang++-14 -DTORCH_LMDB_BUILD_FUZZERS=ON
test-sanitize: sanitizer-deps
	$(ASAN_CONFIGURE)
	cmake --build build/asan -j $(JOBS) --target torch_lmdb_tests
	cd build/asan && $(SAN_ENV) ctest --output-on-failure -j $(JOBS) --no-tests=error

# ThreadSanitizer (clang-14): the concurrency gtests (named *Concurrent* or *Threads*, and the
# streams' cold reads, whose reader threads share the requests ahead).
test-tsan: sanitizer-deps
	$(CHECK_CMAKE) -S . -B build/tsan -DCMAKE_CXX_COMPILER=clang++-14 -DTORCH_LMDB_SANITIZE=thread
	cmake --build build/tsan -j $(JOBS) --target torch_lmdb_tests
	cd build/tsan && TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$(CURDIR)/tests/sanitizers/tsan.supp \
	  ctest --output-on-failure -j $(JOBS) --no-tests=error -R 'Concurrent|Threads|ColdReads.*Stream'

# gcc LTO link of the library, which fails on ODR violations (-Werror=odr) between its
# translation units. gcc compares the types of all of them at that link whatever the
# optimisation level: -O0 keeps the check and makes its compile and link quick. (The gtests
# link the shared library, so their own link could only compare the test files among
# themselves; they run in the other builds.)
test-odr: deps
	$(CHECK_CMAKE) -S . -B build/odr -DCMAKE_CXX_COMPILER=g++ -DTORCH_LMDB_ODR_CHECK=ON \
	  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O0
	cmake --build build/odr -j $(JOBS) --target torch_lmdb

# libFuzzer targets (tests/fuzz), each run FUZZ_SECONDS on a copy of its seed corpus.
FUZZ_TARGETS := record meta open
fuzz-build: sanitizer-deps
	$(ASAN_CONFIGURE)
	cmake --build build/asan -j $(JOBS) --target $(addprefix fuzz_,$(FUZZ_TARGETS)) fuzz_make_corpus

fuzz: fuzz-build
	tests/fuzz/run.sh build/asan $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Regenerates the seed corpus in the tree (tests/fuzz/corpus/<target>/).
fuzz-corpus: fuzz-build
	rm -rf tests/fuzz/corpus && build/asan/fuzz_make_corpus tests/fuzz/corpus
