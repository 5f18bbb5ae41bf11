"""LMDBDataset.iter_batches: C++ reader threads read batches ahead in order;
sequential, shuffled and block-shuffled epochs; seeds; errors; early exit."""
import pytest
import torch

import torch_lmdb
from conftest import corrupt_record


def indices_of(batches):
    return [i for b in batches for i in b["index"].tolist()]


@pytest.mark.parametrize("threads, batches_ahead", [(1, 1), (2, 3), (3, 8)])
@pytest.mark.parametrize("shuffle, block_size", [(False, None), (True, None), (True, 16)])
def test_every_index_once_with_the_content_of_get_batch(make_db, threads, batches_ahead, shuffle, block_size):
    ds = torch_lmdb.LMDBDataset([make_db(70, "a"), make_db(53, "b", first=70)])
    it = ds.iter_batches(32, shuffle=shuffle, seed=5, batches_ahead=batches_ahead, threads=threads, block_size=block_size)
    assert len(it) == 4
    batches = list(it)
    assert [len(b["label"]) for b in batches] == [32, 32, 32, 27]
    got = indices_of(batches)
    assert sorted(got) == list(range(123))
    assert (got == list(range(123))) == (not shuffle)
    for k, b in enumerate(batches):
        assert b["index"].tolist() == it.batch_indices(k)
        want = ds.get_batch(it.batch_indices(k))
        assert torch.equal(b["x"], want["x"]) and b["label"] == want["label"]


def test_drop_last_and_empty_tail(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(50))
    assert [len(b["label"]) for b in ds.iter_batches(16, drop_last=True)] == [16, 16, 16]
    assert [len(b["label"]) for b in ds.iter_batches(25, drop_last=True)] == [25, 25]
    assert [len(b["label"]) for b in ds.iter_batches(64)] == [50]
    assert list(ds.iter_batches(64, drop_last=True)) == []


def test_seeds_make_epochs_repeatable(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(200))
    first = indices_of(ds.iter_batches(50, shuffle=True, seed=1))
    assert indices_of(ds.iter_batches(50, shuffle=True, seed=1, threads=3)) == first
    assert indices_of(ds.iter_batches(50, shuffle=True, seed=2)) != first
    torch.manual_seed(7)
    a = indices_of(ds.iter_batches(50, shuffle=True))
    b = indices_of(ds.iter_batches(50, shuffle=True))
    torch.manual_seed(7)
    assert indices_of(ds.iter_batches(50, shuffle=True)) == a
    assert a != b  # the next epoch draws another seed


def test_block_shuffle_reads_a_few_key_ranges_at_a_time(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(1000))
    block, window = 25, 4
    order = indices_of(ds.iter_batches(100, shuffle=True, seed=3, block_size=block, window_blocks=window))
    assert sorted(order) == list(range(1000))
    for start in range(0, 1000, block * window):
        run = order[start:start + block * window]
        blocks = {i // block for i in run}
        assert len(blocks) == window  # each window is exactly `window` whole blocks...
        assert sorted(run) == sorted(i for b in blocks for i in range(b * block, (b + 1) * block))
        assert run != sorted(run)  # ...shuffled within
    assert [i // block for i in order[::block * window]] != sorted(i // block for i in order[::block * window])


def test_a_corrupted_record_is_raised_at_its_batch_naming_path_and_index(make_db):
    path = make_db(40)
    corrupt_record(path, 21)
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    it = ds.iter_batches(10, threads=2, batches_ahead=4)
    assert indices_of([next(it), next(it)]) == list(range(20))  # the batches before it arrive
    with pytest.raises(torch_lmdb.CorruptedError, match=r"index 21") as info:
        next(it)
    assert path in str(info.value)
    assert list(it) == []  # the stream is finished


def test_breaking_out_stops_the_threads(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(400, width=1024))
    for _ in range(100):  # would hang or crash if a dropped stream left its threads blocked
        for b in ds.iter_batches(8, shuffle=True, seed=0, batches_ahead=4, threads=2):
            break
    assert ds.reader_count() <= 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=4, batches_ahead=0), "batches_ahead"),
    (dict(batch_size=4, threads=0), "threads"), (dict(batch_size=4, shuffle=True, block_size=-1), "block_size"),
])
def test_bad_arguments_are_value_errors(make_db, kwargs, match):
    ds = torch_lmdb.LMDBDataset(make_db(5))
    with pytest.raises(ValueError, match=match):
        ds.iter_batches(**kwargs)


def test_padded_fields(tmp_path):
    path = str(tmp_path / "db")
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(10):
            w.write({"v": torch.arange(i + 1, dtype=torch.float32)})
    ds = torch_lmdb.LMDBDataset(path, pad=True)
    batches = list(ds.iter_batches(4, pad_value=-1))
    assert batches[0]["v"].shape == (4, 4) and batches[0]["v"][0].tolist() == [0, -1, -1, -1]
    assert batches[2]["v_lengths"].tolist() == [[9], [10]]
