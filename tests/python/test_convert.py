"""torch-lmdb convert: Zarr, HDF5 and pickle-in-LMDB sources, shards, limit, resume, verify."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import h5py
import lmdb
import numcodecs
import numpy as np
import pytest
import zarr

import torch_lmdb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 23


def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, env=env,
                          **kwargs)


def ragged(i):
    return np.arange(2 * (i % 4 + 1), dtype=np.float32).reshape(-1, 2) + i


def make_zarr(path, n=N):
    root = zarr.open_group(str(path), mode="w")
    root.attrs["simulator"] = "raysim 2.1"
    root.array("x", np.arange(n * 12, dtype=np.float32).reshape(n, 3, 4), chunks=(5, 3, 4))
    meta = root.create_group("meta")
    meta.attrs["units"] = "m"
    meta.array("label", np.arange(n, dtype=np.int64) * 7, chunks=(4,))
    meta.create_group("sub").array("flag", np.arange(n) % 3 == 0, chunks=(6,))
    paths = root.empty("paths", shape=n, dtype=object, object_codec=numcodecs.VLenArray("<f4"), chunks=(8,))
    for i in range(n):
        paths[i] = ragged(i).ravel()
    paths.attrs["element_shape"] = [-1, 2]
    names = root.empty("names", shape=n, dtype=object, object_codec=numcodecs.VLenUTF8(), chunks=(10,))
    names[:] = np.array([f"rx-{i}" for i in range(n)], dtype=object)
    root.array("bs_positions", np.ones((4, 3), dtype=np.float32))  # not per sample: goes to metadata
    return str(path)


def check_zarr_sample(got, i):
    np.testing.assert_array_equal(got["x"].numpy(), np.arange(i * 12, i * 12 + 12, dtype=np.float32).reshape(3, 4))
    assert int(got["meta/label"]) == 7 * i
    assert bool(got["meta/sub/flag"]) == (i % 3 == 0)
    np.testing.assert_array_equal(got["paths"].numpy(), ragged(i))
    assert got["names"] == f"rx-{i}"


def test_zarr_nested_ragged_attrs(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    proc = cli("convert", "--zarr-path", src, "--output-dir", str(tmp_path / "out"), "--verify", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = str(tmp_path / "out" / "sim.lmdb")
    assert proc.stdout.strip() == out
    assert "verified 23 samples" in proc.stderr
    ds = torch_lmdb.LMDBDataset(out)
    assert len(ds) == N
    schema = {f["name"]: f for f in ds.schema}
    assert set(schema) == {"x", "meta/label", "meta/sub/flag", "paths", "names"}
    assert schema["paths"]["shape"] == [-1, 2] and schema["names"]["kind"] == "str"
    for i in range(N):
        check_zarr_sample(ds[i], i)
    user = ds.metadata["user"]
    assert user["attrs"]["/"] == {"simulator": "raysim 2.1"}
    assert user["attrs"]["meta/"] == {"units": "m"}
    assert user["attrs"]["paths"] == {"element_shape": [-1, 2]}
    assert user["source"]["format"] == "zarr" and user["source"]["path"] == os.path.abspath(src)
    assert user["mismatched_arrays"]["bs_positions"]["value"] == np.ones((4, 3)).tolist()
    assert ds.metadata["complete"] is True


def test_mismatched_large_array_is_refused_unless_skipped(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    zarr.open_group(src, mode="a").array("grid", np.zeros((600, 600), dtype=np.float32))
    proc = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "a.lmdb"))
    assert proc.returncode == 1
    assert "'grid'" in proc.stderr and "--skip-mismatched" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "b.lmdb"), "--skip-mismatched")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "b.lmdb"))
    assert "grid" in ds.metadata["user"]["skipped_arrays"] and "grid" not in {f["name"] for f in ds.schema}


def test_hdf5_nested_vlen_strings_attrs(tmp_path):
    src = str(tmp_path / "sim.h5")
    with h5py.File(src, "w") as f:
        f.attrs["campaign"] = "indoor"
        f.create_dataset("cir", data=np.random.default_rng(0).normal(size=(N, 2, 8)).astype(np.float32), chunks=(6, 2, 8))
        g = f.create_group("target")
        g.create_dataset("position", data=np.arange(N * 3, dtype=np.float64).reshape(N, 3))
        g["position"].attrs["frame"] = "ENU"
        v = f.create_dataset("paths", shape=(N,), dtype=h5py.vlen_dtype(np.float32))
        for i in range(N):
            v[i] = ragged(i).ravel()
        v.attrs["element_shape"] = [-1, 2]
        f.create_dataset("tag", data=[f"t{i}" for i in range(N)], dtype=h5py.string_dtype())
    proc = cli("convert", "--hdf5-path", src, "--output-dir", str(tmp_path), "--verify")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "sim.lmdb"))
    with h5py.File(src, "r") as f:
        for i in range(N):
            got = ds[i]
            np.testing.assert_array_equal(got["cir"].numpy(), f["cir"][i])
            np.testing.assert_array_equal(got["target/position"].numpy(), f["target/position"][i])
            np.testing.assert_array_equal(got["paths"].numpy(), ragged(i))
            assert got["tag"] == f"t{i}"
    attrs = ds.metadata["user"]["attrs"]
    assert attrs["/"] == {"campaign": "indoor"} and attrs["target/position"] == {"frame": "ENU"}


def make_pickle_lmdb(path, n=N):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(str(i).encode(), pickle.dumps({"image": np.full((4, 4), i, dtype=np.uint8),
                                                   "target": float(i) / 2, "id": i, "name": f"s{i}"}))
        txn.put(b"__len__", pickle.dumps(n))
    env.close()
    return str(path)


def test_pickle_lmdb_numeric_key_order_and_len_key(tmp_path):
    src = make_pickle_lmdb(tmp_path / "old.lmdb")
    proc = cli("convert", "--pickle-lmdb-path", src, "--output-dir", str(tmp_path / "new"), "--verify")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "new" / "old.lmdb"))
    assert len(ds) == N  # __len__ is not a sample
    for i in range(N):  # "10" comes after "9": numeric order, not byte order
        got = ds[i]
        assert int(got["id"]) == i and got["name"] == f"s{i}" and float(got["target"]) == i / 2
        assert got["image"].dtype.is_floating_point is False and int(got["image"][0, 0]) == i
    assert ds.metadata["user"]["skipped_keys"] == ["__len__"]
    assert "executes code" in cli("convert", "--help").stdout


def test_shards_limit_and_fields(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    proc = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "s.lmdb"), "--shards", "3",
               "--limit", "20", "--fields", "x,paths", "--verify")
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert paths == [str(tmp_path / f"s-{k:05d}-of-00003.lmdb") for k in range(3)]
    sizes = [len(torch_lmdb.LMDBDataset(p)) for p in paths]
    assert sizes == [6, 7, 7]
    ds = torch_lmdb.LMDBDataset(paths)
    assert len(ds) == 20 and {f["name"] for f in ds.schema} == {"x", "paths"}
    for i in range(20):
        got = ds[i]
        np.testing.assert_array_equal(got["x"].numpy().ravel(), np.arange(i * 12, i * 12 + 12))
        np.testing.assert_array_equal(got["paths"].numpy(), ragged(i))
    bad = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "t.lmdb"), "--fields", "x,nope")
    assert bad.returncode == 1 and "'nope'" in bad.stderr and "available" in bad.stderr


def test_existing_output_is_not_overwritten_and_verify_catches_a_changed_source(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    out = str(tmp_path / "o.lmdb")
    assert cli("convert", "--zarr-path", src, "--output", out).returncode == 0
    again = cli("convert", "--zarr-path", src, "--output", out)
    assert again.returncode == 1 and "--resume" in again.stderr
    zarr.open_group(src, mode="a")["x"][5, 0, 0] = -1.0  # the source no longer matches the output
    proc = cli("convert", "--zarr-path", src, "--output", out, "--resume", "--verify")
    assert proc.returncode == 1
    assert "index 5" in proc.stderr and "'x'" in proc.stderr


def entries(path):
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(b"samples", txn=txn, create=False))["entries"]
    except lmdb.Error:
        return 0
    finally:
        env.close()


@pytest.mark.parametrize("sig,shards", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_interrupted_conversion_is_incomplete_then_resumes(tmp_path, sig, shards):
    n = 200_000  # tiny samples: long enough to interrupt, quick to write
    src = str(tmp_path / "big.zarr")
    root = zarr.open_group(src, mode="w")
    root.array("v", np.arange(n, dtype=np.int64), chunks=(1000,))
    out = str(tmp_path / "big.lmdb")
    args = ["convert", "--zarr-path", src, "--output", out, "--commit-every", "500", "--no-progress",
            "--shards", str(shards)]
    proc = subprocess.Popen([sys.executable, "-m", "torch_lmdb", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    first = out if shards == 1 else str(tmp_path / "big-00000-of-00002.lmdb")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(first, "data.mdb")) and entries(first) > 0:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    outputs = [out] if shards == 1 else [str(tmp_path / f"big-{k:05d}-of-00002.lmdb") for k in range(2)]
    written = 0
    for p in outputs:
        if os.path.exists(p):
            info = torch_lmdb.info(p)
            assert info["complete"] is False  # never claims to be complete
            written += info["num_samples"]
    assert 0 < written < n
    done = cli(*args, "--resume", "--verify")
    assert done.returncode == 0, done.stderr
    ds = torch_lmdb.LMDBDataset(outputs)
    assert len(ds) == n and all(torch_lmdb.info(p)["complete"] for p in outputs)
    batch = ds.get_batch(list(range(0, n, 997)))
    np.testing.assert_array_equal(batch["v"].numpy(), np.arange(0, n, 997))
