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
  python3-dev python3-numpy python3-lmdb python3-zarr python3-h5py python3-pytest python3-tqdm python3-yaml \
  python3-matplotlib python3-venv python3-setuptools lmdb-utils dataset-fashion-mnist \
  libblosc-dev python3-dask python3-distributed

.PHONY: print-deb-packages test-debian13 test demo deps build cmake-build python-build install lib-install examples example-cpp ctest pytest clean

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

python-build:
	MAX_JOBS=$(JOBS) $(PYTHON) setup.py -q build_ext --inplace --build-temp build/python

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

pytest: python-build cmake-build examples
	TORCH_LMDB_ROUNDTRIP=$(CURDIR)/$(BUILD)/torch_lmdb_roundtrip TORCH_LMDB_EXAMPLES_BIN=$(CURDIR)/build/examples \
	  $(PYTHON) -m pytest -q -rs tests/python -p no:cacheprovider

clean:
	rm -rf build torch_lmdb/_C*.so *.egg-info

# The same `make test` inside a Debian 13 root (torch 2.6, Python 3.13, zarr 3), cached
# outside the clone (see tools/debian13.sh).
test-debian13:
	tools/debian13.sh test

print-deb-packages:
	@echo $(DEB_PACKAGES)
