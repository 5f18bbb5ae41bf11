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


def test_key_order_matches_lmdbs_default_comparator(tmp_path):
    """torch_lmdb compares its 8-byte keys as integers; py-lmdb (LMDB's default
    memcmp order) must find every key of a tree it built, and the reverse."""
    import lmdb

    n = 70_000  # keys past 2**16: every byte position of the key changes, many leaf pages
    path = str(tmp_path / "ours")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many({"i": i} for i in range(n))
    env = lmdb.open(path, max_dbs=4, readonly=True, lock=False)
    samples = env.open_db(b"samples", create=False)
    with env.begin() as txn:
        keys = [int.from_bytes(k, "big") for k in txn.cursor(db=samples).iternext(values=False)]
        assert keys == list(range(n))
        for i in (0, 255, 256, 65_535, 65_536, n - 1):
            assert txn.get(i.to_bytes(8, "big"), db=samples) is not None, i
    env.close()

    # the tree rebuilt by py-lmdb in a scrambled insertion order reads back in torch_lmdb
    rebuilt = str(tmp_path / "rebuilt")
    src = lmdb.open(path, max_dbs=4, readonly=True, lock=False)
    dst = lmdb.open(rebuilt, max_dbs=4, map_size=1 << 30)
    for name in (b"samples", b"meta"):
        db_in, db_out = src.open_db(name, create=False), dst.open_db(name)
        with src.begin() as rtxn, dst.begin(write=True) as wtxn:
            rows = list(rtxn.cursor(db=db_in))
            for j in np.random.default_rng(0).permutation(len(rows)):
                wtxn.put(rows[j][0], rows[j][1], db=db_out)
    src.close()
    dst.close()
    ds = torch_lmdb.LMDBDataset(rebuilt, verify=True)
    picks = [0, 255, 256, 65_535, 65_536, n - 1, 12_345]
    assert ds.get_batch(picks)["i"].tolist() == picks
    assert [ds[i]["i"] for i in (1, 300, 69_000)] == [1, 300, 69_000]
