"""Builds torch_lmdb._C from the same C++ sources as CMake (csrc/SOURCES.txt).

The project metadata is in pyproject.toml; this file adds what needs code: the version
(from csrc/torch_lmdb/version.h) and the extension (sources from csrc/SOURCES.txt, compile
flags from csrc/COMPILE_FLAGS.txt, both also read by CMakeLists.txt).

    pip install --no-build-isolation .        # into a venv with --system-site-packages
    python3 setup.py build_ext --inplace      # in place, for tests
"""
import re
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'TORCH_LMDB_VERSION "([^"]+)"', (ROOT / "csrc/torch_lmdb/version.h").read_text()).group(1)


def _lines(name):
    return [line.strip() for line in (ROOT / "csrc" / name).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


SOURCES = [f"csrc/{source}" for source in _lines("SOURCES.txt")]
# torch 1.13's BuildExtension adds -std=c++14 itself; -std=c++17 comes after it and wins.
FLAGS = ["-std=c++17", "-O2"] + _lines("COMPILE_FLAGS.txt")

setup(
    version=VERSION,
    ext_modules=[
        CppExtension(
            "torch_lmdb._C",
            SOURCES + ["csrc/python/bindings.cpp", "csrc/python/bind_writer.cpp", "csrc/python/bind_stage.cpp"],
            include_dirs=[str(ROOT / "csrc")],
            libraries=["lmdb", "xxhash", "blosc", "curl", "uring"],
            extra_compile_args=FLAGS,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
