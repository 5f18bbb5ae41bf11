import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the in-place build (python3 setup.py build_ext --inplace)

import torch_lmdb  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "storm: a long storm or damage run (minutes of processes, kills and flipped bytes); "
        "CI runs these on Debian 12 only (tools/debian13.sh passes -m 'not storm')")


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


def layout_checksum(meta: dict) -> str:
    """The metadata layout checksum as docs/FORMAT.md defines it (what a writer
    stores as ``layout_xxh3_64``), computed independently of the C++ code."""
    import ctypes
    import ctypes.util
    import json

    lib = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    keys = ["byte_order", "checksum", "format", "format_version", "samples_per_value", "schema"]
    text = json.dumps({k: meta[k] for k in keys if k in meta}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    return f"{lib.XXH3_64bits(text, len(text)):016x}"


def restamp_layout(txn, meta_db) -> None:
    """Rewrites ``layout_xxh3_64`` in an open py-lmdb write transaction after
    the metadata was changed on purpose (a database another writer made)."""
    import json

    meta = {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor(db=meta_db)}
    txn.put(b"layout_xxh3_64", json.dumps(layout_checksum(meta)).encode(), db=meta_db)
