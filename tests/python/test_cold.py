"""Cold reads: every batched path with page requests (a batch's pages requested
ahead), the automatic switch, its bound and errors, damaged records raised at
their batch."""
import os

import pytest
import torch

import torch_lmdb
from conftest import corrupt_record

WIDTH = 4096  # 16 KiB of float32 a sample


def _write(path, n):
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(n):
            w.write({"index": i, "x": torch.full((WIDTH,), float(i))})
    return path


def _evict(path):
    """Drops the file from the page cache (no process may map it)."""
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _check(batch, seen):
    index = batch["index"]
    assert torch.equal(batch["x"], index.to(torch.float32)[:, None].expand(-1, WIDTH))
    seen.extend(index.tolist())


def test_every_batched_path_reads_every_index_once_with_page_requests(tmp_path):
    n = 500
    path = _write(str(tmp_path / "db"), n)
    _evict(path)
    ds = torch_lmdb.LMDBDataset(path, page_requests="always")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    seen = []
    for k in range(0, n, 64):
        _check(ds.get_batch(order[k:k + 64]), seen)
    assert sorted(seen) == list(range(n))
    calls = (n + 63) // 64
    assert ds.io_stats()["page_request_batches"] == calls
    seen = []
    for batch in ds.iter_batches(64, shuffle=True, seed=1, threads=2):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))
    assert ds.io_stats()["page_request_batches"] == 2 * calls
    seen = []
    for batch in torch_lmdb.make_loader(ds, 64, shuffle=True, num_workers=2):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))
    # Plain reads give the same batches.
    plain = torch_lmdb.LMDBDataset(path, page_requests="never")
    for k in range(0, n, 64):
        a, b = ds.get_batch(order[k:k + 64]), plain.get_batch(order[k:k + 64])
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])
    assert plain.io_stats()["page_request_batches"] == 0


def test_auto_page_requests_engage_on_cold_data(tmp_path):
    n = 1500
    path = _write(str(tmp_path / "db"), n)
    _evict(path)
    ds = torch_lmdb.LMDBDataset(path)  # page_requests="auto"
    seen = []
    for batch in ds.iter_batches(64, shuffle=True, seed=2):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))
    stats = ds.io_stats()
    assert stats["page_request_batches"] > 0 and stats["pages_requested"] > 0, stats


def test_a_damaged_record_is_raised_at_its_batch_with_page_requests(tmp_path):
    path = _write(str(tmp_path / "db"), 300)
    corrupt_record(path, 150)
    _evict(path)
    ds = torch_lmdb.LMDBDataset(path, verify=True, page_requests="always")
    batches = ds.iter_batches(64, threads=2)  # sequential: 150 is in batch 2
    for k in range(2):
        assert next(batches)["index"][0].item() == 64 * k
    with pytest.raises(torch_lmdb.CorruptedError, match="index 150"):
        next(batches)
    with pytest.raises(torch_lmdb.CorruptedError, match="index 150"):
        ds.get_batch(list(range(140, 160)))
    assert ds.get_batch(list(range(192, 256)))["index"][0].item() == 192


def test_page_request_arguments_are_checked(tmp_path):
    path = _write(str(tmp_path / "db"), 4)
    with pytest.raises(ValueError, match="page_requests must be 'auto', 'always' or 'never'"):
        torch_lmdb.LMDBDataset(path, page_requests="sometimes")
    with pytest.raises(ValueError, match="page_request_bytes must be an int >= 0"):
        torch_lmdb.LMDBDataset(path, page_request_bytes=-1)
    ds = torch_lmdb.LMDBDataset(path, page_requests="always", page_request_bytes=0, keep_cache=False)
    assert ds.get_batch([3, 1])["index"].tolist() == [3, 1]
    assert ds.io_stats()["page_request_batches"] == 0  # a bound of 0 bytes: no page requests


def _takes_o_direct(path):
    try:
        os.close(os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_keep_cache_false_reads_cold_records_with_o_direct_in_the_process_and_its_workers(tmp_path, context):
    n = 600
    path = _write(str(tmp_path / "db"), n)
    _evict(path)
    ds = torch_lmdb.LMDBDataset(path, keep_cache=False, page_requests="always")
    seen = []
    for batch in ds.iter_batches(64, shuffle=True, seed=3, threads=2):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))
    direct = _takes_o_direct(path)
    # The parent read with its own rings; workers forked after it make theirs.
    assert (ds.io_stats()["direct_records"] > n // 2) == direct
    _evict(path)
    seen = []
    for batch in torch_lmdb.make_loader(ds, 64, shuffle=True, num_workers=2, multiprocessing_context=context):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("keep_cache", [False, True])
def test_a_cold_block_shuffle_reads_its_windows_ahead_in_long_reads(tmp_path, keep_cache):
    n = 1024
    path = _write(str(tmp_path / "db"), n)
    _evict(path)
    ds = torch_lmdb.LMDBDataset(path, keep_cache=keep_cache)
    seen = []
    for batch in ds.iter_batches(64, shuffle=True, seed=2, threads=2, block_size=128):
        _check(batch, seen)
    assert sorted(seen) == list(range(n))
    stats = ds.io_stats()
    if keep_cache or _takes_o_direct(path):
        assert stats["window_records"] > n * 9 // 10, stats
        assert stats["window_bytes"] >= n * WIDTH * 4, stats
        assert stats["direct_records"] < n // 10, stats
    # A warm epoch (keep_cache) reads nothing ahead.
    if keep_cache:
        for batch in ds.iter_batches(64, shuffle=True, seed=3, threads=2, block_size=128):
            _check(batch, [])
        assert ds.io_stats()["window_bytes"] == stats["window_bytes"]
