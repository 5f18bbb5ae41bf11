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
import numpy as np
import pytest
import zarr

import torch_lmdb
from torch_lmdb import _zarr
from torch_lmdb import convert as tl_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 23


def _zarr_major() -> int:
    from torch_lmdb import _zarr

    return _zarr.zarr_major()


def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, env=env,
                          **kwargs)


def ragged(i):
    return np.arange(2 * (i % 4 + 1), dtype=np.float32).reshape(-1, 2) + i


# (Zarr format, ragged form) pairs the installed zarr-python writes: zarr 2 writes format 2
# with VLenArray or offsets ragged arrays, zarr 3 writes formats 2 and 3 with offsets ones.
STORES = [(fmt, form) for fmt in _zarr.writable_formats() for form in _zarr.ragged_forms(fmt)]
DEFAULT_FORMAT = _zarr.writable_formats()[-1]


def make_zarr(path, n=N, zarr_format=DEFAULT_FORMAT, ragged_form=None):
    """The standard test store, written through the installed zarr-python."""
    root = _zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    root.attrs["simulator"] = "raysim 2.1"
    _zarr.write_array(root, "x", np.arange(n * 12, dtype=np.float32).reshape(n, 3, 4), chunks=(5, 3, 4))
    meta = root.create_group("meta")
    meta.attrs["units"] = "m"
    _zarr.write_array(meta, "label", np.arange(n, dtype=np.int64) * 7, chunks=(4,))
    _zarr.write_array(meta.create_group("sub"), "flag", np.arange(n) % 3 == 0, chunks=(6,))
    form = ragged_form or _zarr.ragged_forms(zarr_format)[0]
    attrs = {"element_shape": [-1, 2]} if form == "vlen" else {"unit": "m"}
    _zarr.write_ragged(root, "paths", [ragged(i) for i in range(n)], chunks=8, form=form, attrs=attrs)
    _zarr.write_strings(root, "names", [f"rx-{i}" for i in range(n)], chunks=(10,), kind="str")
    _zarr.write_strings(root, "blobs", [bytes(range(i % 5)) for i in range(n)], chunks=(7,), kind="bytes")
    _zarr.write_array(root, "code", np.array([f"c{i}" for i in range(n)], dtype="U3"), chunks=(9,))
    _zarr.write_array(root, "raw", np.array([b"r%d" % i for i in range(n)], dtype="S3"), chunks=(9,))
    _zarr.write_array(root, "bs_positions", np.ones((4, 3), dtype=np.float32))  # not per sample: metadata
    return str(path)


def check_zarr_sample(got, i):
    np.testing.assert_array_equal(got["x"].numpy(), np.arange(i * 12, i * 12 + 12, dtype=np.float32).reshape(3, 4))
    assert int(got["meta/label"]) == 7 * i
    assert bool(got["meta/sub/flag"]) == (i % 3 == 0)
    np.testing.assert_array_equal(got["paths"].numpy(), ragged(i))
    assert got["names"] == f"rx-{i}"
    assert got["blobs"] == bytes(range(i % 5))
    assert got["code"] == f"c{i}"
    assert got["raw"] == b"r%d" % i


@pytest.mark.parametrize("zarr_format,ragged_form", STORES, ids=[f"format{f}-{r}" for f, r in STORES])
def test_zarr_nested_ragged_attrs(tmp_path, zarr_format, ragged_form):
    src = make_zarr(tmp_path / "sim.zarr", zarr_format=zarr_format, ragged_form=ragged_form)
    proc = cli("convert", "--zarr-path", src, "--output-dir", str(tmp_path / "out"), "--verify", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = str(tmp_path / "out" / "sim.lmdb")
    assert proc.stdout.strip() == out
    assert "verified 23 samples" in proc.stderr
    ds = torch_lmdb.LMDBDataset(out)
    assert len(ds) == N
    schema = {f["name"]: f for f in ds.schema}
    assert set(schema) == {"x", "meta/label", "meta/sub/flag", "paths", "names", "blobs", "code", "raw"}
    assert schema["paths"]["shape"] == [-1, 2] and schema["names"]["kind"] == "str"
    for i in range(N):
        check_zarr_sample(ds[i], i)
    user = ds.metadata["user"]
    assert user["attrs"]["/"] == {"simulator": "raysim 2.1"}
    assert user["attrs"]["meta/"] == {"units": "m"}
    if ragged_form == "vlen":
        assert user["attrs"]["paths"] == {"element_shape": [-1, 2]}
    else:
        assert user["attrs"]["paths"] == {"unit": "m", "ragged": True}
    assert user["source"]["format"] == "zarr" and user["source"]["path"] == os.path.abspath(src)
    assert user["mismatched_arrays"]["bs_positions"]["value"] == np.ones((4, 3)).tolist()
    assert ds.metadata["complete"] is True


def test_mismatched_large_array_is_refused_unless_skipped(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    _zarr.write_array(zarr.open_group(src, mode="a"), "grid", np.zeros((600, 600), dtype=np.float32))
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
    proc = cli("convert", "--pickle-lmdb-path", src, "--output-dir", str(tmp_path / "new"), "--verify",
               "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "new" / "old.lmdb"))
    assert len(ds) == N  # __len__ is not a sample
    for i in range(N):  # "10" comes after "9": numeric order, not byte order
        got = ds[i]
        assert int(got["id"]) == i and got["name"] == f"s{i}" and float(got["target"]) == i / 2
        assert got["image"].dtype.is_floating_point is False and int(got["image"][0, 0]) == i
    assert ds.metadata["user"]["skipped_keys"] == ["__len__"]
    assert "executes code" in cli("convert", "--help").stdout


class _Marker:
    """Unpickling this creates the file `path`: proof that code from a source ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_lmdb_needs_allow_pickle_and_unpickles_nothing_without_it(tmp_path):
    marker = tmp_path / "ran"
    env = lmdb.open(str(tmp_path / "evil.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(_Marker(str(marker))))
    env.close()
    proc = cli("convert", "--pickle-lmdb-path", str(tmp_path / "evil.lmdb"), "--output", str(tmp_path / "o.lmdb"))
    assert proc.returncode == 1 and "--allow-pickle" in proc.stderr and "evil.lmdb" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.lmdb").exists()


def write_v2_array_by_hand(store, name, meta, chunks):
    """A format 2 array written without zarr (for codecs the installed zarr does not write)."""
    os.makedirs(os.path.join(store, name))
    with open(os.path.join(store, ".zgroup"), "w") as f:
        json.dump({"zarr_format": 2}, f)
    zarray = {"zarr_format": 2, "order": "C", "compressor": None, "fill_value": None, "filters": None}
    zarray.update(meta)
    with open(os.path.join(store, name, ".zarray"), "w") as f:
        json.dump(zarray, f)
    for key, data in chunks.items():
        with open(os.path.join(store, name, key), "wb") as f:
            f.write(data)


def test_zarr_pickle_codec_is_refused_before_any_chunk_is_read(tmp_path):
    store, marker = str(tmp_path / "evil.zarr"), tmp_path / "ran"
    write_v2_array_by_hand(store, "obj", {"shape": [2], "chunks": [2], "dtype": "|O",
                                          "filters": [{"id": "pickle", "protocol": 5}]},
                           {"0": pickle.dumps(_Marker(str(marker)))})
    out = str(tmp_path / "o.lmdb")
    proc = cli("convert", "--zarr-path", store, "--output", out)
    assert proc.returncode == 1, proc.stderr
    assert "array 'obj' uses the Pickle codec" in proc.stderr and "--allow-pickle" in proc.stderr
    assert not marker.exists() and not os.path.exists(out)
    with pytest.raises(tl_convert.ConversionError, match="'obj' uses the Pickle codec"):
        tl_convert.open_source("zarr", store)
    assert not marker.exists()
    # With the flag, the array is read (and its pickle runs): the flag is what stands between.
    proc = cli("convert", "--zarr-path", store, "--output", out, "--allow-pickle")
    assert marker.exists(), proc.stderr


@pytest.mark.parametrize("zarr_format", _zarr.writable_formats())
def test_corrupt_zarr_metadata_names_the_file(tmp_path, zarr_format):
    src = make_zarr(tmp_path / "sim.zarr", zarr_format=zarr_format)
    bad = os.path.join(src, "meta", "label", ".zarray" if zarr_format == 2 else "zarr.json")
    with open(bad, "w") as f:
        f.write('{"zarr_format": 2, "shape": [')
    proc = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "o.lmdb"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"Zarr metadata file '{bad}' is not valid JSON" in proc.stderr


def test_what_the_installed_zarr_cannot_read_is_refused_naming_the_reason(tmp_path):
    store = str(tmp_path / "s.zarr")
    if _zarr.zarr_major() < 3:  # zarr-python 2 and a format 3 store
        os.makedirs(store)
        with open(os.path.join(store, "zarr.json"), "w") as f:
            json.dump({"zarr_format": 3, "node_type": "group", "attributes": {}}, f)
        want = f"'{store}' is a Zarr format 3 store (zarr.json); zarr-python {zarr.__version__} reads format 2 only"
    else:  # zarr-python 3 and a ragged VLenArray array written by zarr-python 2
        write_v2_array_by_hand(store, "paths", {"shape": [2], "chunks": [2], "dtype": "|O",
                                                "filters": [{"id": "vlen-array", "dtype": "<f4"}]}, {})
        want = f"array 'paths' is a ragged VLenArray array, which zarr-python {zarr.__version__} cannot read"
    proc = cli("convert", "--zarr-path", store, "--output", str(tmp_path / "o.lmdb"))
    assert proc.returncode == 1 and want in proc.stderr, proc.stderr


@pytest.mark.skipif(3 not in _zarr.writable_formats(),
                    reason=f"zarr-python {zarr.__version__} writes no sharded arrays (Zarr format 3 needs zarr-python 3)")
def test_zarr3_sharded_arrays_are_read_whole_shards_at_a_time(tmp_path):
    src = str(tmp_path / "sharded.zarr")
    root = _zarr.open_group(src, mode="w", zarr_format=3)
    n = 50
    img = (np.arange(n * 6) % 251).astype(np.uint8).reshape(n, 2, 3)
    _zarr.write_array(root, "img", img, chunks=(5, 2, 3),
                      shards=(20, 2, 3))
    _zarr.write_array(root, "y", np.arange(n, dtype=np.float64) / 3, chunks=(2,), shards=(10,))
    source = tl_convert.open_source("zarr", src)
    assert source.block % 20 == 0 and source.block % 10 == 0  # blocks cover whole shards
    proc = cli("convert", "--zarr-path", src, "--output", str(tmp_path / "o.lmdb"), "--verify")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "o.lmdb"))
    for i in range(n):
        got = ds[i]
        np.testing.assert_array_equal(got["img"].numpy(), img[i])
        assert float(got["y"]) == i / 3


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
    """Samples committed in `path` so far; 0 while the file is still being created."""
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4)
    except lmdb.Error:  # data.mdb exists but holds no meta pages yet
        return 0
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
    root = _zarr.open_group(src, mode="w")
    _zarr.write_array(root, "v", np.arange(n, dtype=np.int64), chunks=(1000,))
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


@pytest.mark.skipif(_zarr_major() >= 3, reason="its store is written with zarr-python 2's API "
                    "(numcodecs compressors, chunk keys by hand); Debian 12 runs it")
def test_compression_defaults_to_lz4_prints_each_fields_codec_and_can_follow_the_source(tmp_path):
    import numcodecs

    src = str(tmp_path / "z.zarr")
    root = zarr.open_group(src, mode="w")
    data = np.tile(np.arange(256, dtype=np.float32), (40, 1))
    root.create_dataset("cir", data=data, shape=data.shape, dtype=data.dtype, chunks=(10, 256),
                        compressor=numcodecs.Blosc(cname="zstd"))
    root.create_dataset("raw", data=data, shape=data.shape, dtype=data.dtype, chunks=(10, 256), compressor=None)
    out = str(tmp_path / "default.lmdb")
    proc = cli("convert", "--zarr-path", src, "--output", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert {f["name"]: f["codec"] for f in torch_lmdb.info(out)["fields"]} == {"cir": "lz4", "raw": "lz4"}
    assert f"'{src}': field 'cir': lz4" in proc.stderr.splitlines()
    assert f"'{src}': field 'raw': lz4" in proc.stderr.splitlines()
    out = str(tmp_path / "source.lmdb")
    proc = cli("convert", "--zarr-path", src, "--output", out, "--no-progress", "--compression", "source")
    assert proc.returncode == 0, proc.stderr
    assert {f["name"]: f["codec"] for f in torch_lmdb.info(out)["fields"]} == {"cir": "zstd", "raw": "none"}
    assert f"'{src}': field 'cir': zstd" in proc.stderr.splitlines()


@pytest.mark.skipif(_zarr_major() >= 3, reason="its store is written with zarr-python 2's API "
                    "(numcodecs compressors, chunk keys by hand); Debian 12 runs it")
def test_big_endian_arrays_convert_and_a_failed_start_leaves_no_output(tmp_path):
    src = str(tmp_path / "be.zarr")
    root = zarr.open_group(src, mode="w")
    big = (np.arange(30, dtype=">f8") / 7).reshape(10, 3)
    root.create_dataset("x", data=big, shape=big.shape, dtype=big.dtype, chunks=(4, 3))
    n = np.arange(10, dtype=">i4")
    root.create_dataset("n", data=n, shape=n.shape, dtype=n.dtype, chunks=(4,))
    # zarr-python 2 returns plain arrays in native order, but VLenArray elements as stored
    _zarr.write_ragged(root, "r", [np.arange(i % 3 + 1, dtype=">f8") for i in range(10)], chunks=4,
                       form=_zarr.ragged_forms(2)[0])
    out = str(tmp_path / "be.lmdb")
    proc = cli("convert", "--zarr-path", src, "--output", out, "--verify", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ds = torch_lmdb.LMDBDataset(out)
    np.testing.assert_array_equal(ds[9]["x"].numpy(), big[9])
    assert int(ds[3]["n"]) == 3 and ds[5]["r"].tolist() == [0.0, 1.0, 2.0]
    os.remove(os.path.join(src, "x", "0.0"))  # the first block fails: zarr 2 fills it, so break it instead
    with open(os.path.join(src, "x", "0.0"), "wb") as f:
        f.write(b"not a chunk")
    for target, existed in ((str(tmp_path / "new" / "o.lmdb"), False), (str(tmp_path / "mine"), True)):
        if existed:
            os.makedirs(target)
        proc = cli("convert", "--zarr-path", src, "--output", target, "--no-progress")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert os.path.isdir(target) == existed  # removed when created by the failed run, kept otherwise


def test_a_group_path_carries_the_store_roots_attributes_as_a_split_does(tmp_path):
    src = make_zarr(tmp_path / "sim.zarr")
    zarr.open_group(os.path.join(src, "meta"), mode="r+").attrs["kind"] = "labels"
    proc = cli("convert", "--zarr-path", os.path.join(src, "meta"), "--output", str(tmp_path / "m.lmdb"),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    user = torch_lmdb.LMDBDataset(str(tmp_path / "m.lmdb")).metadata["user"]
    assert user["source_attrs"] == {"simulator": "raysim 2.1"}
    assert user["group"] == "meta" and user["group_attrs"] == {"units": "m", "kind": "labels"}
    assert int(torch_lmdb.LMDBDataset(str(tmp_path / "m.lmdb"))[3]["label"]) == 21
