"""A database written by C++ reads in Python, and the reverse."""
import os
import subprocess

import numpy as np
import pytest
import torch

import torch_lmdb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.environ.get("TORCH_LMDB_ROUNDTRIP", os.path.join(ROOT, "build", "cmake", "torch_lmdb_roundtrip"))


def recipe(i):
    return {"i": i, "x": (np.arange(12, dtype=np.float32) * i).reshape(3, 4), "name": f"sample-{i}",
            "raw": bytes(i % 7)}


@pytest.fixture(scope="module")
def tool():
    assert os.path.exists(TOOL), f"build the C++ tool first (make build): {TOOL}"
    return TOOL


def test_cpp_written_reads_in_python(tool, tmp_path):
    path = str(tmp_path / "cpp")
    subprocess.run([tool, "write", path, "25"], check=True)
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert len(ds) == 25
    for i in range(25):
        got, want = ds[i], recipe(i)
        assert got["i"].item() == i
        assert torch.equal(got["x"], torch.from_numpy(want["x"]))
        assert got["name"] == want["name"] and got["raw"] == want["raw"]


def test_python_written_reads_in_cpp(tool, tmp_path):
    path = str(tmp_path / "py")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many(recipe(i) for i in range(25))
    proc = subprocess.run([tool, "check", path, "25"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # and the check fails on a database that differs
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        w.write(recipe(99))
    assert subprocess.run([tool, "check", path, "25"], capture_output=True).returncode != 0
