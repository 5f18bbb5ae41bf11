import numpy as np
import pytest
import torch

import torch_lmdb

TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
NUMPY_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64,
                np.complex64, np.complex128]


def rand(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape).to(dtype)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype_and_shape_round_trips(tmp_path, dtype):
    samples = []
    for i in range(3):
        samples.append({
            "scalar": rand((), dtype),
            "empty": rand((0, 3), dtype),
            "noncontig": rand((4, 5), dtype).t(),
            "big": rand((300, 128), dtype),
        })
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        assert w.write_many(samples) == 3
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert len(ds) == 3
    for i, want in enumerate(samples):
        got = ds[i]
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == dtype and got[k].shape == want[k].shape, k
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_and_scalars(tmp_path, dtype):
    a = (np.arange(12) % 3).astype(dtype).reshape(3, 4)[:, ::2]  # non-contiguous view
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write({"a": a, "s": dtype(1)})
    got = torch_lmdb.LMDBDataset(path)[0]
    assert got["a"].numpy().dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got["a"].numpy(), a)
    assert got["s"].shape == () and got["s"].numpy().dtype == np.dtype(dtype)


def test_python_scalars_str_and_bytes(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write({"i": 7, "f": 2.5, "b": True, "c": 1 + 2j, "s": "héllo wörld", "raw": b"\x00\xff", "e": b"", "es": ""})
    got = torch_lmdb.LMDBDataset(path)[0]
    assert got["i"].dtype == torch.int64 and got["i"].item() == 7
    assert got["f"].dtype == torch.float64 and got["f"].item() == 2.5
    assert got["b"].dtype == torch.bool and got["b"].item() is True
    assert got["c"].item() == 1 + 2j
    assert got["s"] == "héllo wörld" and isinstance(got["s"], str)
    assert got["raw"] == b"\x00\xff" and isinstance(got["raw"], bytes)
    assert got["e"] == b"" and got["es"] == ""


def test_get_batch_stacks_and_pads(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(6):
            w.write({"paths": torch.full((i + 1, 4), float(i)), "pos": torch.tensor([i, i, i], dtype=torch.float32),
                     "tag": f"t{i}"})
    ds = torch_lmdb.LMDBDataset(path)
    assert ds.schema[0]["shape"] == [-1, 4]
    with pytest.raises(ValueError, match="field 'paths'"):
        ds.get_batch([0, 3])
    b = ds.get_batch([0, 3], pad=True, pad_value=-1)
    assert list(b) == ["paths", "paths_lengths", "pos", "tag"]
    assert b["paths"].shape == (2, 4, 4)
    assert torch.equal(b["paths_lengths"], torch.tensor([[1, 4], [4, 4]]))
    assert torch.equal(b["paths"][0, 1:], torch.full((3, 4), -1.0))
    assert torch.equal(b["pos"], torch.tensor([[0.0] * 3, [3.0] * 3]))
    assert b["tag"] == ["t0", "t3"]
    # negative indices work in batches too; ds[list] is the same batched path
    assert ds[[1, 1]]["tag"] == ["t1", "t1"]
    assert torch.equal(ds.get_batch([-1, 2], pad=True)["pos"], torch.tensor([[5.0] * 3, [2.0] * 3]))
    # fields subset and a per-sample transform
    sub = torch_lmdb.LMDBDataset(path, fields=["pos"], transform=lambda s: s["pos"].sum())
    assert sub[2].item() == 6.0
    assert list(sub.get_batch([1])) == ["pos"]


def test_several_files_are_one_dataset(make_db):
    a = make_db(5, "a")
    b = make_db(7, "b", first=5)
    ds = torch_lmdb.LMDBDataset([a, b])
    assert len(ds) == 12
    assert [ds[i]["index"].item() for i in range(12)] == list(range(12))
    assert ds.get_batch([11, 0, 5])["index"].tolist() == [11, 0, 5]


def test_info_and_metadata(make_db):
    path = make_db(4, user_metadata={"source": "test"})
    meta = torch_lmdb.info(path)
    assert meta["num_samples"] == 4 and meta["complete"] is True and meta["format_version"] == 2
    assert meta["metadata"]["user"] == {"source": "test"}
    assert [f["name"] for f in meta["fields"]] == ["index", "x", "label"]
    assert meta["file_size"] > 0 and meta["map_size"] >= meta["file_size"]
    ds = torch_lmdb.LMDBDataset(path)
    assert ds.metadata["checksum"] == "xxh3_64"
    assert ds.schema[1] == {"name": "x", "kind": "tensor", "dtype": "float32", "shape": [8]}


def test_writer_append_and_progress(make_db, capsys):
    path = make_db(3)
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        assert len(w) == 3
        assert w.write_many(({"index": i, "x": np.zeros(8, np.float32), "label": "z"} for i in range(3, 10)),
                            progress=True, total=7) == 7
    assert "7/7" in capsys.readouterr().err
    assert len(torch_lmdb.LMDBDataset(path)) == 10


def test_exception_in_with_block_keeps_samples_but_not_complete(tmp_path):
    path = str(tmp_path / "db")
    with pytest.raises(RuntimeError, match="boom"):
        with torch_lmdb.LMDBWriter(path) as w:
            for i in range(5):
                w.write({"i": i})
            raise RuntimeError("boom")
    with pytest.warns(RuntimeWarning, match="incomplete"):
        ds = torch_lmdb.LMDBDataset(path)
    assert len(ds) == 5 and ds.metadata["complete"] is False
    assert [ds[i]["i"].item() for i in range(5)] == list(range(5))


def test_map_grows_from_a_tiny_initial_size(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path, map_size=64 << 10, commit_every=16) as w:
        for i in range(200):
            w.write({"x": torch.full((4096,), float(i))})
        assert w.map_size > 64 << 10
    ds = torch_lmdb.LMDBDataset(path)
    assert len(ds) == 200 and ds[199]["x"][0].item() == 199.0
