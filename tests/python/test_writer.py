"""LMDBWriter: values are copied when written (commits run on a background
thread), the C++ conversion of common values agrees with the Python one,
write_many takes any iterable of mappings, commit errors surface and stick."""
import types
import warnings

import numpy as np
import pytest
import torch

import torch_lmdb


def test_values_are_copied_when_written(tmp_path):
    # A simulator that refills one buffer per sample: what is stored is the
    # value at write() time, even though the commit happens later on another
    # thread (small batches: several commits in flight during the loop).
    buf = np.zeros(4096, dtype=np.float32)
    tbuf = torch.zeros(64, dtype=torch.int64)
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path, commit_every=3) as w:
        for i in range(20):
            buf[:] = i
            tbuf.fill_(-i)
            w.write({"x": buf, "t": tbuf, "i": i})
        buf[:] = -1
        tbuf.fill_(99)
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert len(ds) == 20
    for i in range(20):
        got = ds[i]
        assert torch.equal(got["x"], torch.full((4096,), float(i)))
        assert torch.equal(got["t"], torch.full((64,), -i, dtype=torch.int64))
        assert got["i"].item() == i


def test_write_many_copies_a_reused_buffer(tmp_path):
    buf = np.zeros(8, dtype=np.int32)

    def gen():
        for i in range(50):
            buf[:] = i
            yield {"x": buf}

    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path, commit_every=7) as w:
        assert w.write_many(gen()) == 50
    ds = torch_lmdb.LMDBDataset(path)
    assert [ds[i]["x"][0].item() for i in range(50)] == list(range(50))


def test_common_values_keep_their_types(tmp_path):
    # Values the C++ converter takes (exact dict), and the same through a
    # non-dict mapping and as subclasses the Python converter handles.
    class Int(int):
        pass

    sample = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "readonly": np.frombuffer(b"\x01\x02\x03", dtype=np.uint8),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "np_bool": np.bool_(True),
        "np_c64": np.complex64(1 - 2j),
        "t_grad": torch.ones(3, requires_grad=True),
        "t_view": torch.arange(10)[::3],
        "i": -(2**63),
        "sub_int": Int(5),
        "f": float("inf"),
        "b": False,
        "s": "ünï",
        "by": b"\x00",
        "ba": bytearray(b"ab"),
        "np_bytes": np.bytes_(b"xy"),
        "np_str": np.str_("z"),
    }
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write(sample)
        w.write(types.MappingProxyType(sample))
    ds = torch_lmdb.LMDBDataset(path)
    for got in (ds[0], ds[1]):
        assert list(got) == list(sample)
        np.testing.assert_array_equal(got["f32"].numpy(), sample["f32"])
        assert got["readonly"].tolist() == [1, 2, 3]
        np.testing.assert_array_equal(got["fortran"].numpy(), sample["fortran"])
        assert got["np_bool"].dtype == torch.bool and got["np_bool"].item() is True
        assert got["np_c64"].dtype == torch.complex64 and got["np_c64"].item() == 1 - 2j
        assert not got["t_grad"].requires_grad and got["t_grad"].tolist() == [1.0, 1.0, 1.0]
        assert got["t_view"].tolist() == [0, 3, 6, 9]
        assert got["i"].dtype == torch.int64 and got["i"].item() == -(2**63)
        assert got["sub_int"].dtype == torch.int64 and got["sub_int"].item() == 5
        assert got["f"].dtype == torch.float64 and got["f"].item() == float("inf")
        assert got["b"].dtype == torch.bool and got["b"].item() is False
        assert got["s"] == "ünï" and got["by"] == b"\x00" and got["ba"] == b"ab"
        assert got["np_bytes"] == b"xy" and got["np_str"] == "z"


@pytest.mark.parametrize("value, error, match", [
    (2**63, OverflowError, "field 'a': int 9223372036854775808 does not fit in int64"),
    (np.datetime64("2020-01-01"), TypeError, "field 'a': numpy dtype datetime64"),
    # torch < 2.3 has no uint16 (torch 2.3+ round-trips it: test_stack.py)
    *([(np.arange(3, dtype=np.uint16), TypeError, "field 'a': numpy dtype uint16 has no torch equivalent")]
      if not hasattr(torch, "uint16") else []),
])  # (big-endian arrays are stored as their values: test_errors.py)
def test_values_without_a_torch_dtype_are_refused_naming_the_field(tmp_path, value, error, match):
    with torch_lmdb.LMDBWriter(str(tmp_path / "db")) as w:
        with pytest.raises(error, match=match):
            w.write({"a": value})
        assert len(w) == 0


def test_write_many_refuses_a_non_mapping_and_keeps_what_came_before(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        with pytest.raises(TypeError, match="a sample must be a mapping of field name to value, got list"):
            w.write_many(iter([{"x": 1}, {"x": 2}, [("x", 3)]]))
        assert len(w) == 2
    assert len(torch_lmdb.LMDBDataset(path)) == 2


def test_flush_waits_for_the_commit(tmp_path):
    with torch_lmdb.LMDBWriter(str(tmp_path / "db"), commit_every=4) as w:
        w.write_many({"x": torch.full((1024,), float(i))} for i in range(10))
        assert len(w) == 10
        w.flush()
        assert w._w.committed == 10


@pytest.mark.parametrize("options", [{}, {"compression": "lz4", "compress_threads": 3, "samples_per_value": 1}],
                         ids=["raw", "compressed-on-threads"])
def test_a_failed_commit_stays_failed_and_keeps_the_committed_prefix(tmp_path, options):
    # With compression on threads, two batches are in flight when a commit fails.
    path = str(tmp_path / "full")
    w = torch_lmdb.LMDBWriter(path, map_size=256 << 10, auto_grow=False, commit_every=4, **options)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(torch_lmdb.MapFullError, match="auto_grow"):
        for i in range(1000):
            x = torch.rand(4096, generator=gen)  # incompressible: the map fills either way
            x[0] = float(i)
            w.write({"x": x})
    for again in (lambda: w.write({"x": torch.zeros(4096)}), w.flush, w.close):
        with pytest.raises(torch_lmdb.MapFullError):
            again()
    del w
    with pytest.warns(RuntimeWarning, match="incomplete"):
        ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert 0 < len(ds) < 1000 and len(ds) % 4 == 0
    with warnings.catch_warnings(record=True) as again:  # reported once per process
        warnings.simplefilter("always")
        assert torch_lmdb.info(path)["complete"] is False
    assert not [w for w in again if "incomplete" in str(w.message)]
    for i in range(len(ds)):
        assert ds[i]["x"][0].item() == float(i)


def test_conjugate_and_negative_views_are_stored_as_their_values(tmp_path):
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    neg = torch.tensor([1.0, -2.0])._neg_view()
    assert z.conj().is_conj() and neg.is_neg()
    path = str(tmp_path / "views")
    with torch_lmdb.LMDBWriter(path) as w:
        w.write({"conj": z.conj(), "neg": neg, "conj_imag": z.conj().imag})
    got = torch_lmdb.LMDBDataset(path)[0]
    assert torch.equal(got["conj"], torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64))
    assert torch.equal(got["neg"], torch.tensor([-1.0, 2.0]))
    assert torch.equal(got["conj_imag"], torch.tensor([-2.0, 4.0]))


def test_a_rejected_first_sample_defines_no_schema(tmp_path):
    path = str(tmp_path / "first")
    with torch_lmdb.LMDBWriter(path) as w:
        with pytest.raises(ValueError, match="17 dimensions"):
            w.write({"a": torch.zeros(1), "deep": torch.zeros([1] * 17)})
        w.write({"y": torch.ones(3)})
    ds = torch_lmdb.LMDBDataset(path)
    assert list(ds[0]) == ["y"]
    assert [f["name"] for f in ds.schema] == ["y"]


def test_a_writer_forked_child_does_not_keep_the_writer_lock(tmp_path):
    import os
    import signal

    path = str(tmp_path / "fork")
    w = torch_lmdb.LMDBWriter(path)
    w.write({"i": 0})
    pid = os.fork()
    if pid == 0:  # a child that outlives the writer (as a DataLoader worker would)
        signal.pause()
        os._exit(0)
    try:
        w.close()
        with torch_lmdb.LMDBWriter(path, mode="a") as again:
            again.write({"i": 1})
        assert len(torch_lmdb.LMDBDataset(path)) == 2
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
