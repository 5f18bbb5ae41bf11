"""Builds torch_lmdb._C from the same C++ sources as CMake (csrc/SOURCES.txt).

    pip install --no-build-isolation .        # into a venv with --system-site-packages
    python3 setup.py build_ext --inplace      # in place, for tests
"""
import re
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'TORCH_LMDB_VERSION "([^"]+)"', (ROOT / "csrc/torch_lmdb/version.h").read_text()).group(1)
SOURCES = [f"csrc/{line.strip()}" for line in (ROOT / "csrc/SOURCES.txt").read_text().splitlines() if line.strip()]

setup(
    name="torch_lmdb",
    version=VERSION,
    description="LMDB datasets of named tensors for PyTorch and LibTorch",
    packages=["torch_lmdb"],
    python_requires=">=3.9",
    ext_modules=[
        CppExtension(
            "torch_lmdb._C",
            SOURCES + ["csrc/python/bindings.cpp"],
            include_dirs=[str(ROOT / "csrc")],
            libraries=["lmdb", "xxhash"],
            # torch 1.13's BuildExtension adds -std=c++14 itself: override it.
            extra_compile_args=["-std=c++17", "-O2", "-Wno-unused-parameter"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["torch-lmdb = torch_lmdb.cli:main"]},
)
