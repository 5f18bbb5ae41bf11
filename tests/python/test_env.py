"""One LMDB environment per file and process; read-only storage."""
import os
import subprocess
import warnings

import pytest
import torch

import torch_lmdb
from conftest import sample


def _can_mount() -> bool:
    return os.geteuid() == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root to bind-mount a directory read-only")
def test_a_read_only_mount_reads_without_a_lock_file_and_says_so(make_db, tmp_path):
    path = make_db(5)
    os.remove(os.path.join(path, "lock.mdb"))
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", path, str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = torch_lmdb.LMDBDataset(str(ro))
            assert [int(ds[i]["index"]) for i in range(5)] == list(range(5))
        assert any("without locking" in str(w.message) and str(ro) in str(w.message) for w in caught), \
            [str(w.message) for w in caught]
        assert ds.reader_count() == -1
        with pytest.raises(torch_lmdb.LockError):
            torch_lmdb.LMDBDataset(str(ro), lock=True)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_writer_and_datasets_of_one_path_in_one_process(make_db):
    path = make_db(4)
    ds = torch_lmdb.LMDBDataset(path)  # opened first: the writer joins its environment
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        for i in range(4, 10):
            w.write(sample(i))
        w.flush()
        assert len(ds) == 4
        assert ds.refresh() == 10 and len(ds) == 10
        batch = ds.get_batch([0, 9])
        assert batch["index"].tolist() == [0, 9]
        with pytest.raises(torch_lmdb.LockError):
            torch_lmdb.LMDBWriter(path, mode="a")
    ds.refresh()
    assert torch.equal(ds[9]["x"], torch.from_numpy(sample(9)["x"]))


def test_disk_full_error_is_an_os_error():
    assert issubclass(torch_lmdb.DiskFullError, torch_lmdb.Error)
    assert issubclass(torch_lmdb.DiskFullError, OSError)
