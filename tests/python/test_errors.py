"""Typed errors: IndexError, KeyError, TypeError, ValueError, and the
torch_lmdb.Error hierarchy for LMDB conditions."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import torch_lmdb


def test_error_hierarchy():
    for cls in (torch_lmdb.MapFullError, torch_lmdb.ReadersFullError, torch_lmdb.NotFoundError,
                torch_lmdb.CorruptedError, torch_lmdb.InvalidDatabaseError, torch_lmdb.LockError):
        assert issubclass(cls, torch_lmdb.Error)
    assert issubclass(torch_lmdb.Error, RuntimeError)


def test_the_error_classes_come_from_one_table_and_keep_their_names_and_bases():
    # _C registers one class per row of csrc/torch_lmdb/errors.h's table; the package exports them.
    names = ("Error", "MapFullError", "ReadersFullError", "NotFoundError", "CorruptedError",
             "InvalidDatabaseError", "LockError", "DiskFullError")
    assert torch_lmdb._C.ERROR_CLASSES == names
    for name in names:
        cls = getattr(torch_lmdb, name)
        assert cls is getattr(torch_lmdb._C, name) and name in torch_lmdb.__all__
        assert cls.__module__ == "torch_lmdb._C" and cls.__name__ == name
        bases = {"Error": (RuntimeError,), "DiskFullError": (torch_lmdb.Error, OSError)}.get(name, (torch_lmdb.Error,))
        assert cls.__bases__ == bases, (name, cls.__bases__)


def test_index_errors(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(3))
    with pytest.raises(IndexError, match="out of range for dataset of size 3"):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    with pytest.raises(IndexError):
        ds.get_batch([0, 7])
    assert ds[-1]["index"].item() == 2
    with pytest.raises(TypeError, match="integers"):
        ds["a"]


def test_unknown_field_is_key_error(make_db):
    with pytest.raises(KeyError, match=r"available: \['index', 'x', 'label'\]"):
        torch_lmdb.LMDBDataset(make_db(3), fields=["index", "nope"])


def test_unsupported_values_are_type_errors(tmp_path):
    with torch_lmdb.LMDBWriter(str(tmp_path / "db")) as w:
        with pytest.raises(TypeError, match="field 'obj' has unsupported type object"):
            w.write({"obj": object()})
        with pytest.raises(TypeError, match="field 'u'"):
            w.write({"u": np.array(["a", "b"], dtype=object)})
        with pytest.raises(TypeError, match="field names must be str"):
            w.write({1: 2})
        w.write({"x": torch.zeros(3)})
        with pytest.raises(TypeError, match="field 'x' of sample 1 has dtype float64"):
            w.write({"x": torch.zeros(3, dtype=torch.float64)})
        with pytest.raises(ValueError, match="has no field 'x'"):
            w.write({"y": torch.zeros(3)})


def test_value_errors(tmp_path, make_db):
    with pytest.raises(ValueError, match="mode"):
        torch_lmdb.LMDBWriter(str(tmp_path / "a"), mode="x")
    with pytest.raises(ValueError, match="map_size"):
        torch_lmdb.LMDBWriter(str(tmp_path / "a"), map_size=-1)


def test_lmdb_conditions_raise_their_classes(tmp_path, make_db):
    path = make_db(3)
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match="already holds 3 samples"):
        torch_lmdb.LMDBWriter(path)
    with torch_lmdb.LMDBWriter(path, mode="a"):
        with pytest.raises(torch_lmdb.LockError, match="another Writer"):
            torch_lmdb.LMDBWriter(path, mode="a")
    with pytest.raises(torch_lmdb.MapFullError, match="auto_grow"):
        with torch_lmdb.LMDBWriter(str(tmp_path / "full"), map_size=128 << 10, auto_grow=False, commit_every=4) as w:
            for _ in range(100):
                w.write({"x": torch.zeros(4096)})
    with pytest.raises(FileNotFoundError):
        torch_lmdb.LMDBDataset(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(torch_lmdb.NotFoundError, match="data.mdb"):
        torch_lmdb.info(str(tmp_path / "empty"))


def test_readahead_of_a_path_already_open_in_the_process_is_not_silently_ignored(make_db):
    # One LMDB environment per file and process: it keeps the OS readahead it was opened with.
    path = make_db(3)
    ds = torch_lmdb.LMDBDataset(path)
    assert ds[0]["index"].item() == 0
    with pytest.warns(RuntimeWarning, match="already open in this process with readahead off; "
                                            "readahead=True has no effect"):
        other = torch_lmdb.LMDBDataset(path, os_readahead=True)
        assert other[1]["index"].item() == 1


def test_read_only_directory_falls_back_to_lock_free_reads_with_a_warning(tmp_path):
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="tlmdb-ro-")  # world-traversable, unlike pytest's tmp root
    os.chmod(base, 0o755)
    path = os.path.join(base, "db")
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(5):
            w.write({"index": i})
    os.remove(os.path.join(path, "lock.mdb"))
    os.remove(os.path.join(path, "writer.lock"))
    os.chmod(path, 0o555)
    code = (
        "import sys, warnings; sys.path.insert(0, sys.argv[1]); import torch_lmdb\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ds = torch_lmdb.LMDBDataset(sys.argv[2])\n"
        "    assert len(ds) == 5 and ds[4]['index'].item() == 4\n"
        "    assert any('lock=False' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "try:\n"
        "    torch_lmdb.LMDBDataset(sys.argv[2], lock=True)\n"
        "    raise SystemExit('lock=True must fail on a read-only directory')\n"
        "except torch_lmdb.LockError:\n"
        "    pass\n"
    )
    # The unprivileged child may not be able to read the checkout: give it a copy of the package.
    root = os.path.join(base, "pkg")
    shutil.copytree(os.path.dirname(torch_lmdb.__file__), os.path.join(root, "torch_lmdb"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    user = 65534 if os.geteuid() == 0 else None  # root ignores directory permissions
    try:
        proc = subprocess.run([sys.executable, "-c", code, root, path], user=user, group=user,
                              capture_output=True, text=True, cwd="/")
    finally:
        os.chmod(path, 0o755)
        shutil.rmtree(base)
    assert proc.returncode == 0, proc.stderr


def test_field_names_not_encodable_as_utf8_are_value_errors_naming_the_field(tmp_path):
    import fractions

    with torch_lmdb.LMDBWriter(str(tmp_path / "db")) as w:
        # the C++ fast path (an int) and the Python converter's path (a Fraction)
        for value in (1, "text", fractions.Fraction(1, 2)):
            with pytest.raises(ValueError, match=r"field name '\\ud800' cannot be stored"):
                w.write({"ok": 1, "\ud800": value})
        with pytest.raises(ValueError, match=r"field name '\\udcff'"):
            w.write_many([{"\udcff": 1}])
        w.write({"ok": 1})
    assert len(torch_lmdb.LMDBDataset(str(tmp_path / "db"))) == 1


def test_a_str_fields_argument_is_one_field(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(3), fields="index")
    assert ds[2] == {"index": torch.tensor(2)}
    assert [f["name"] for f in ds.schema] == ["index"]


def test_unknown_pad_fields_are_value_errors_naming_them_and_the_available_ones(make_db):
    path = make_db(4)
    want = r"unknown field\(s\) \['nope'\].*available: \['index', 'x', 'label'\]"
    with pytest.raises(ValueError, match=want):
        torch_lmdb.LMDBDataset(path, pad=["nope"])
    ds = torch_lmdb.LMDBDataset(path, pad=["x"])
    with pytest.raises(ValueError, match=want):
        ds.get_batch([0, 1], pad=["x", "nope"])
    with pytest.raises(ValueError, match=want):
        ds.iter_batches(2, pad="nope")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['x'\].*available: \['index'\]"):
        torch_lmdb.LMDBDataset(path, fields=["index"], pad=["x"])
    assert ds.get_batch([0, 1], pad="x")["x"].shape == (2, 8)


def test_tensor_and_numpy_indices(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(10))
    assert ds[torch.tensor(3)]["index"].item() == 3
    assert ds[torch.tensor(-1, dtype=torch.int32)]["index"].item() == 9
    assert ds[np.int64(4)]["index"].item() == 4
    assert ds[np.array(5)]["index"].item() == 5
    assert ds[torch.tensor([1, 2])]["index"].tolist() == [1, 2]
    assert ds[np.array([7, 8])]["index"].tolist() == [7, 8]
    assert ds.get_batch(torch.tensor([0, 9]))["index"].tolist() == [0, 9]
    with pytest.raises(TypeError, match=r"tensor of dtype torch.float32 and shape \[\]"):
        ds[torch.tensor(1.0)]
    with pytest.raises(TypeError, match=r"shape \[2, 2\]"):
        ds[torch.zeros(2, 2, dtype=torch.long)]
    with pytest.raises(IndexError, match=r"index 10 out of range for dataset of size 10"):
        ds[torch.tensor(10)]


def test_negative_index_out_of_range_names_the_index_given(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(10))
    with pytest.raises(IndexError, match=r"^index -11 out of range for dataset of size 10"):
        ds[-11]
    with pytest.raises(IndexError, match=r"^index -12 out of range"):
        ds.get_batch([0, -12])
    assert ds[-10]["index"].item() == 0


def test_sizes_out_of_range_are_value_errors_naming_argument_and_range(tmp_path, make_db):
    for name, value in (("map_size", 2**70), ("map_size", 0), ("commit_every", 2**64), ("commit_bytes", -5),
                        ("map_size", True), ("map_size", 1.5)):
        with pytest.raises(ValueError, match=rf"{name} must be an int from 1 to 2\*\*63 - 1, got {value!r}"):
            torch_lmdb.LMDBWriter(str(tmp_path / "w"), **{name: value})
    path = make_db(2)
    for value in (-1, 0, 2**40, "8"):
        with pytest.raises(ValueError, match=rf"max_readers must be an int from 1 to 1048576, got {value!r}"):
            torch_lmdb.LMDBDataset(path, max_readers=value)


def test_a_tiny_map_size_is_a_minimum_initial_size_that_grows(tmp_path):
    path = str(tmp_path / "tiny")
    with torch_lmdb.LMDBWriter(path, map_size=1, commit_every=16) as w:
        assert w.map_size >= torch_lmdb.writer.MIN_MAP_SIZE
        for i in range(200):
            w.write({"x": torch.full((1024,), i, dtype=torch.float32)})
    ds = torch_lmdb.LMDBDataset(path)
    assert len(ds) == 200 and torch.equal(ds[199]["x"], torch.full((1024,), 199.0))


# Values viewed without a copy while the GIL is released must stay alive even
# if another thread replaces them in the sample dict meanwhile (a 4 MiB str
# freed under the writer is unmapped: a crash). In a child process, so that a
# crash is a failed test, not a dead test run.
_MUTATE_DURING_WRITE = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
import torch_lmdb
n = 4 << 20
sample = {"s": "a" * n, "b": b"a" * n}
done = False
def mutate():
    k = 0
    while not done:
        c = "ab"[k % 2]
        sample["s"] = c * n
        sample["b"] = c.encode() * n
        k += 1
t = threading.Thread(target=mutate)
t.start()
try:
    with torch_lmdb.LMDBWriter(sys.argv[2], commit_every=4) as w:
        w.write_many(sample for _ in range(48))
        for _ in range(16):
            w.write(sample)
finally:
    done = True
    t.join()
ds = torch_lmdb.LMDBDataset(sys.argv[2])
assert len(ds) == 64
for i in range(64):
    s, b = ds[i]["s"], ds[i]["b"]
    assert len(s) == n and s in ("a" * n, "b" * n), i
    assert len(b) == n and b in (b"a" * n, b"b" * n), i
"""


@pytest.mark.storm
def test_values_replaced_by_another_thread_during_a_write_stay_alive(tmp_path):
    root = os.path.dirname(os.path.dirname(torch_lmdb.__file__))
    # A fixed mmap threshold: every freed 4 MiB value is unmapped at once (glibc
    # otherwise raises the threshold and recycles the memory, hiding the bug).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MUTATE_DURING_WRITE, root, str(tmp_path / "db")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_ragged_batch_error_names_the_python_option(tmp_path):
    """The core's message names C++'s BatchOptions::pad; Python users read pad=True."""
    path = str(tmp_path / "ragged")
    with torch_lmdb.LMDBWriter(path) as w:
        for n in (2, 3, 2):
            w.write({"paths": torch.zeros(n, 4)})
    ds = torch_lmdb.LMDBDataset(path)
    for read in (lambda: ds.get_batch([0, 1]), lambda: next(iter(ds.iter_batches(3)))):
        with pytest.raises(ValueError, match=r"field 'paths' has shape \[3, 4\].*pass pad=True") as info:
            read()
        assert "BatchOptions" not in str(info.value)
        assert "make_loader" in str(info.value) and "collate_fn=ds.collate" in str(info.value)  # where pad goes
    assert ds.get_batch([0, 1], pad=True)["paths"].shape == (2, 3, 4)


def _cli(*args, cwd=None):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=root), timeout=120)


def test_a_missing_database_is_one_error_everywhere(tmp_path):
    (tmp_path / "empty.lmdb").mkdir()
    message = "[Errno 2] no torch_lmdb database (no such file or directory): 'nope.lmdb'"
    with pytest.raises(FileNotFoundError) as raised:
        torch_lmdb.LMDBDataset(["nope.lmdb"])
    assert str(raised.value) == message and raised.value.filename == "nope.lmdb"
    with pytest.raises(FileNotFoundError, match="'nope.lmdb'"):
        torch_lmdb.info("nope.lmdb")
    for command in ("info", "verify"):
        proc = _cli(command, "nope.lmdb", cwd=str(tmp_path))
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == f"torch-lmdb {command}: error: FileNotFoundError: {message}\n"
    proc = _cli("verify", "empty.lmdb", cwd=str(tmp_path))  # a directory without data.mdb
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("torch-lmdb verify: error: FileNotFoundError: [Errno 2] no torch_lmdb database "
                           "(no data.mdb): 'empty.lmdb'\n")


@pytest.mark.parametrize("many", [False, True], ids=["write", "write_many"])
def test_big_endian_arrays_are_stored_as_their_values(tmp_path, many):
    sample = {"f": np.arange(4, dtype=">f8"), "i": np.arange(6, dtype=">i4").reshape(2, 3)[:, ::2],
              "s": np.array(7, dtype=">i2"), "c": np.array([1 + 2j], dtype=">c16")}
    with torch_lmdb.LMDBWriter(str(tmp_path / "db")) as w:
        w.write_many([sample]) if many else w.write(sample)
    got = torch_lmdb.LMDBDataset(str(tmp_path / "db"))[0]
    for name, value in sample.items():
        want = torch.from_numpy(value.astype(value.dtype.newbyteorder("=")))
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


@pytest.mark.parametrize("many", [False, True], ids=["write", "write_many"])
def test_a_str_with_a_lone_surrogate_is_refused_naming_the_field(tmp_path, many):
    with torch_lmdb.LMDBWriter(str(tmp_path / "db")) as w:
        w.write({"s": "ok"})
        with pytest.raises(ValueError, match=r"field 's'.*UTF-8"):
            w.write_many([{"s": "a\ud800b"}]) if many else w.write({"s": "a\ud800b"})
        assert len(w) == 1
