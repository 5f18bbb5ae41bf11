"""torch-lmdb convert of an untrusted source: runs no code, reads no file outside it, ends.

Every conversion runs in a subprocess with a timeout, so a regression that blocks fails
instead of hanging the suite.
"""
import base64
import os
import pickle
import shutil
import zipfile

import pytest

from test_convert import _Marker, cli, write_v2_array_by_hand
from torch_lmdb import _zarr

TIMEOUT = 120


def convert(*args):
    return cli("convert", *args, "--no-progress", timeout=TIMEOUT)


def pickle_store(store, marker):
    """A format 2 store whose arrays run pickles creating `marker`: 'obj' when a chunk is
    read, 'rec' (a structured object dtype) when zarr-python 2 decodes its fill value."""
    payload = pickle.dumps(_Marker(str(marker)))
    write_v2_array_by_hand(store, "obj", {"shape": [2], "chunks": [2], "dtype": "|O",
                                          "filters": [{"id": "pickle", "protocol": 5}]}, {"0": payload})
    write_v2_array_by_hand(store, "rec", {"shape": [2], "chunks": [2], "dtype": [["a", "|O"]],
                                          "filters": [{"id": "pickle", "protocol": 5}],
                                          "fill_value": base64.standard_b64encode(payload).decode()}, {})
    return store


def zip_store(store, path):
    with zipfile.ZipFile(path, "w") as zf:
        for directory, _, files in os.walk(store):
            for name in files:
                full = os.path.join(directory, name)
                zf.write(full, os.path.relpath(full, store))
    return path


@pytest.mark.parametrize("how", ["symlinked-array-dir", "symlinked-store", "zip", "file-url"])
def test_zarr_pickle_is_refused_for_every_way_to_name_a_store(tmp_path, how):
    marker = tmp_path / "ran"
    elsewhere = pickle_store(str(tmp_path / "elsewhere"), marker)
    if how == "symlinked-array-dir":  # the store's array directories are symlinks to elsewhere
        src = str(tmp_path / "s.zarr")
        os.makedirs(src)
        shutil.copy(os.path.join(elsewhere, ".zgroup"), src)
        for name in ("obj", "rec"):
            os.symlink(os.path.join(elsewhere, name), os.path.join(src, name))
    elif how == "symlinked-store":
        src = str(tmp_path / "s.zarr")
        os.symlink(elsewhere, src)
    elif how == "zip":
        src = zip_store(elsewhere, str(tmp_path / "s.zip"))
    else:
        src = "file://" + elsewhere
    out = tmp_path / "o.lmdb"
    proc = convert("--zarr-path", src, "--output", str(out))
    assert proc.returncode == 1, proc.stderr
    if _zarr.zarr_major() >= 3 and how in ("zip", "file-url"):  # checked only as a directory: refused unread
        assert "is not a local directory store" in proc.stderr
    else:
        assert "uses the Pickle codec" in proc.stderr and "--allow-pickle" in proc.stderr
        assert "array 'obj'" in proc.stderr or "array 'rec'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


def h5_reaching_outside(tmp_path, how):
    """An HDF5 file with 'x' (4 samples) and 'out', whose data lies in another file."""
    import h5py
    import numpy as np

    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["d"] = np.arange(4, dtype=np.int64) + 100
    src = str(tmp_path / "s.h5")
    with h5py.File(src, "w") as f:
        f["x"] = np.arange(4, dtype=np.int64)
        if how == "external-storage":
            f.create_dataset("out", shape=(4,), dtype="u1", external=[(str(secret), 0, 4)])
        elif how == "external-link":
            f["out"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/d")
        else:
            layout = h5py.VirtualLayout(shape=(4,), dtype="i8")
            layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "d", shape=(4,))
            f.create_virtual_dataset("out", layout)
    return src, str(secret if how == "external-storage" else tmp_path / "other.h5")


@pytest.mark.parametrize("how", ["external-storage", "external-link", "virtual-dataset"])
def test_hdf5_data_outside_the_file_needs_allow_external(tmp_path, how):
    import torch_lmdb

    src, outside = h5_reaching_outside(tmp_path, how)
    out = tmp_path / "o.lmdb"
    proc = convert("--hdf5-path", src, "--output", str(out))
    assert proc.returncode == 1, proc.stderr
    assert f"'out' reads the file(s) '{outside}' outside the source" in proc.stderr
    assert "--allow-external" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
    proc = convert("--hdf5-path", src, "--output", str(out), "--allow-external")
    assert proc.returncode == 0, proc.stderr
    got = torch_lmdb.LMDBDataset(str(out))[1]
    assert int(got["out"]) == (ord("o") if how == "external-storage" else 101)


def sparse_store(store, samples, written):
    """A float32 array 'x' of `samples` x 2 in chunks of 10 samples, of which only the
    chunks `written` exist."""
    import numpy as np

    chunk = np.arange(20, dtype="<f4").tobytes()
    write_v2_array_by_hand(store, "x", {"shape": [samples, 2], "chunks": [10, 2], "dtype": "<f4"},
                           {f"{k}.0": chunk for k in written})
    return store


# zarr-python 3 gives no count of a store's chunks that means missing data
# (it skips chunks equal to the fill value): the chunk check is zarr 2's and
# HDF5's; the free-space estimate applies to both.
COUNTS_CHUNKS = _zarr.zarr_major() < 3


def test_missing_chunks_are_refused_unless_allowed(tmp_path):
    import torch_lmdb

    src, out = sparse_store(str(tmp_path / "s.zarr"), 50, [0, 3]), tmp_path / "o.lmdb"
    proc = convert("--zarr-path", src, "--output", str(out))
    if not COUNTS_CHUNKS:  # converted, the missing chunks as fill values
        assert proc.returncode == 0, proc.stderr
        assert len(torch_lmdb.LMDBDataset(str(out))) == 50
        return
    assert proc.returncode == 1 and "array 'x' stores 2 of the 5 chunks its 50 samples need" in proc.stderr
    assert "--allow-missing-chunks" in proc.stderr and not out.exists()
    proc = convert("--zarr-path", src, "--output", str(out), "--limit", "40")  # 2 of 4: half is not more than half
    assert proc.returncode == 0, proc.stderr
    proc = convert("--zarr-path", src, "--output", str(tmp_path / "all.lmdb"), "--allow-missing-chunks")
    assert proc.returncode == 0, proc.stderr
    assert len(torch_lmdb.LMDBDataset(str(tmp_path / "all.lmdb"))) == 50


def test_a_store_declaring_more_samples_than_fit_is_refused_before_writing(tmp_path):
    src, out = sparse_store(str(tmp_path / "huge.zarr"), 10 ** 15, [0]), tmp_path / "o.lmdb"
    if COUNTS_CHUNKS:
        proc = convert("--zarr-path", src, "--output", str(out))
        assert proc.returncode == 1 and "stores 1 of the 100,000,000,000,000 chunks" in proc.stderr
    proc = convert("--zarr-path", src, "--output", str(out), "--allow-missing-chunks")
    assert proc.returncode == 1, proc.stderr
    if COUNTS_CHUNKS:  # (zarr-python 3 fails earlier, opening it: one line, nothing written)
        assert "1,000,000,000,000,000 samples need about 7450580.6 GiB before compression, more than the" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "oversized"])
@pytest.mark.parametrize("entry", [".zattrs", "x/.zarray"])
def test_metadata_that_is_not_a_small_regular_file_is_refused_naming_it(tmp_path, kind, entry):
    src = sparse_store(str(tmp_path / "s.zarr"), 10, [0])
    bad = os.path.join(src, entry)
    if os.path.exists(bad):
        os.remove(bad)
    if kind == "fifo":  # reading it blocks forever
        os.mkfifo(bad)
    elif kind == "dev-zero":  # reading it never ends
        os.symlink("/dev/zero", bad)
    else:  # sparse: 64 MiB + 1 byte of metadata
        with open(bad, "wb") as f:
            f.truncate((64 << 20) + 1)
    proc = convert("--zarr-path", src, "--output", str(tmp_path / "o.lmdb"))
    assert proc.returncode == 1, proc.stderr
    want = "is not a regular file" if kind != "oversized" else "holds 67108865 bytes, more than the 64 MiB"
    assert f"Zarr metadata file '{bad}' {want}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.lmdb").exists()


@pytest.mark.parametrize("meta,want", [
    ({"shape": [-5], "chunks": [2]}, "array 'x' has shape [-5]: every dimension must be an integer >= 0"),
    ({"shape": [4], "chunks": [0]}, "array 'x' has chunk shape [0]: every dimension must be an integer >= 1"),
], ids=["negative-shape", "zero-chunks"])
def test_impossible_shapes_are_one_line_errors_naming_the_array(tmp_path, meta, want):
    src = str(tmp_path / "s.zarr")
    write_v2_array_by_hand(src, "x", dict(meta, dtype="<f4"), {})
    proc = convert("--zarr-path", src, "--output", str(tmp_path / "o.lmdb"))
    assert proc.returncode == 1 and want in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.lmdb").exists()


def test_nan_infinity_and_bytes_attributes_are_stored_in_json_safe_form(tmp_path):
    import json

    import h5py
    import numpy as np

    import torch_lmdb

    src = str(tmp_path / "s.h5")
    with h5py.File(src, "w") as f:
        f["x"] = np.arange(3, dtype=np.float32)
        f["calib"] = np.array([1.0, np.nan])  # not per sample: kept in the metadata
        f.attrs["gain"] = np.nan
        f.attrs["limits"] = np.array([-np.inf, 0.5, np.inf])
        f["x"].attrs["raw"] = np.bytes_(b"\xff\xfe")
        f["x"].attrs["unit"] = np.bytes_(b"m/s")
    out = str(tmp_path / "o.lmdb")
    proc = convert("--hdf5-path", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    user = torch_lmdb.LMDBDataset(out).metadata["user"]
    json.dumps(user, allow_nan=False)  # strict JSON
    assert user["source_attrs"] == {"gain": "NaN", "limits": ["-Infinity", 0.5, "Infinity"]}
    assert user["attrs"]["x"] == {"raw": {"base64": "//4="}, "unit": "m/s"}
    assert user["mismatched_arrays"]["calib"]["value"] == [1.0, "NaN"]
