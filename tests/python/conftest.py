import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the in-place build (python3 setup.py build_ext --inplace)

import torch_lmdb  # noqa: E402


def sample(i: int, width: int = 8):
    """Sample i of the standard test dataset (content derived from i)."""
    return {
        "index": i,
        "x": np.arange(width, dtype=np.float32) + i,
        "label": f"item-{i}",
    }


@pytest.fixture
def make_db(tmp_path):
    """make_db(n, name="db", first=0, width=8) -> path of a closed database."""

    def make(n, name="db", first=0, width=8, **writer_kwargs):
        path = str(tmp_path / name)
        with torch_lmdb.LMDBWriter(path, **writer_kwargs) as w:
            for i in range(first, first + n):
                w.write(sample(i, width))
        return path

    return make


def corrupt_record(path: str, index: int) -> None:
    """Flips a byte in the middle of record `index` (with py-lmdb, as a bad disk would)."""
    import lmdb

    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        samples = env.open_db(b"samples", txn=txn)
        key = index.to_bytes(8, "big")
        value = bytearray(txn.get(key, db=samples))
        value[len(value) // 2] ^= 0xFF
        txn.put(key, bytes(value), db=samples)
    env.close()
