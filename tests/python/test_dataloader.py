"""The dataset inside DataLoaders: every start method, pickling, fork after
reads, reader slots, shared-memory batches."""
import gc
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import torch_lmdb
from conftest import corrupt_record, sample

METHODS = ["fork", "spawn", "forkserver"]


def check_every_index_once(batches, n, width=8):
    seen = np.zeros(n, dtype=int)
    for batch in batches:
        for j, i in enumerate(batch["index"].tolist()):
            seen[i] += 1
            assert torch.equal(batch["x"][j], torch.from_numpy(sample(i, width)["x"]))
            assert batch["label"][j] == f"item-{i}"
    assert (seen == 1).all(), np.flatnonzero(seen != 1)


@pytest.mark.parametrize("persistent", [False, True], ids=["nonpersistent", "persistent"])
@pytest.mark.parametrize("method", METHODS)
def test_every_start_method_sees_every_sample_once(make_db, method, persistent):
    path = make_db(300)
    ds = torch_lmdb.LMDBDataset(path)
    assert ds[5]["index"].item() == 5  # the parent reads before the workers start
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, multiprocessing_context=method,
                        persistent_workers=persistent)
    for _ in range(2 if persistent else 1):
        check_every_index_once(loader, 300)
    # the batched path: whole index lists into ds[indices]
    fast = torch_lmdb.make_loader(ds, batch_size=32, shuffle=True, num_workers=2, multiprocessing_context=method,
                                  persistent_workers=persistent)
    check_every_index_once(fast, 300)
    assert ds[299]["index"].item() == 299  # the parent's handle still works


def test_pickle_carries_configuration_not_handles(make_db):
    path = make_db(10)
    ds = torch_lmdb.LMDBDataset(path, fields=["index"], verify=True)
    ds[0]
    assert ds._handle is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    copy = pickle.loads(blob)
    assert copy._handle is None
    assert copy[3] == {"index": torch.tensor(3)}
    assert copy._options["verify"] is True
    ds.close()
    assert ds[9]["index"].item() == 9


def test_parent_reads_then_forks(make_db):
    import multiprocessing as mp

    path = make_db(50)
    ds = torch_lmdb.LMDBDataset(path)
    assert ds.get_batch(list(range(50)))["index"].tolist() == list(range(50))
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map(_read_index, [(ds, i) for i in range(50)])
    assert got == list(range(50))


def _read_index(args):
    ds, i = args
    return ds[i]["index"].item()


def test_reader_slots_stay_bounded_over_20_epochs(make_db):
    path = make_db(64)
    ds = torch_lmdb.LMDBDataset(path)
    loader = DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=False)
    for _ in range(20):
        assert sum(len(b["index"]) for b in loader) == 64
    # Each epoch's workers leave stale slots behind (they exit without
    # closing); mdb_reader_check on every open reclaims them.
    assert 0 < ds.reader_count() <= 2 * 2 + 2, ds.reader_count()


class _SharedProbe(torch_lmdb.LMDBDataset):
    """Reports, from inside the worker, how each tensor field will cross to the
    main process: through a recycled slab, fresh shared memory, or a copy."""

    def __getitem__(self, index):
        from torch_lmdb._slabs import _is_slab_tensor

        batch = super().__getitem__(index)
        ways = []
        for name in ("index", "x"):
            value = batch[name]
            assert type(value) is torch.Tensor
            ways.append("slab" if _is_slab_tensor(value) else "shared" if value.is_shared() else "copy")
        batch["ways"] = ways
        return batch


def test_worker_batches_cross_without_a_copy(make_db):
    path = make_db(64)
    ds = _SharedProbe(path)
    in_process = ds[[0, 1]]
    assert isinstance(in_process["x"], torch.Tensor) and not in_process["x"].is_shared()
    loader = torch_lmdb.make_loader(ds, batch_size=16, num_workers=1)
    batches = list(loader)
    assert [b["ways"] for b in batches] == [["slab", "slab"]] * 4
    check_every_index_once(batches, 64)


# User code in workers: the batch's tensors are real tensors (arithmetic,
# views, torch functions), and what it returns crosses to the main process.
def _arithmetic_collate(batch):
    assert type(batch["x"]) is torch.Tensor and type(batch["index"]) is torch.Tensor
    return {
        "index": batch["index"],
        "x": batch["x"],  # unchanged: still crosses through its slab
        "x2": batch["x"] * 2 + 1,
        "tail": batch["x"][1:, ::2],  # a strided view of the slab
        "mean": batch["x"].mean(1).double() - batch["index"],
        "label": batch["label"],
    }


class _Normalized(torch.utils.data.Dataset):
    """A wrapper dataset with a transform, doing arithmetic on ds[indices]."""

    def __init__(self, inner, transform):
        self.inner, self.transform = inner, transform

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, indices):
        batch = self.inner[indices]
        return {"index": batch["index"], "y": self.transform(batch["x"] - batch["index"][:, None]),
                "first": batch["x"][0], "label": batch["label"]}


def _halve(x):
    return x / 2


def _check_arithmetic(batches, n, width=8):
    seen = []
    for b in batches:
        index = b["index"]
        x = torch.from_numpy(np.stack([sample(i, width)["x"] for i in index.tolist()]))
        assert torch.equal(b["x"], x)
        assert torch.equal(b["x2"], x * 2 + 1)
        assert torch.equal(b["tail"], x[1:, ::2])
        assert torch.equal(b["mean"], x.mean(1).double() - index)
        assert torch.equal(b["mean"], torch.full((len(index),), 3.5, dtype=torch.float64))
        assert b["label"] == [f"item-{i}" for i in index.tolist()]
        seen += index.tolist()
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("method", METHODS)
def test_collate_fn_wrapper_dataset_and_transform_do_arithmetic_on_worker_batches(make_db, method):
    path = make_db(96)
    ds = torch_lmdb.LMDBDataset(path)
    loader = torch_lmdb.make_loader(ds, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=method,
                                    collate_fn=_arithmetic_collate)
    _check_arithmetic(list(loader), 96)
    wrapped = _Normalized(ds, _halve)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(wrapped), batch_size=8, drop_last=False)
    loader = DataLoader(wrapped, batch_size=None, sampler=sampler, num_workers=2, multiprocessing_context=method)
    seen = []
    for b in loader:
        assert torch.equal(b["y"], torch.arange(8, dtype=torch.float32).expand(len(b["index"]), 8) / 2)
        assert torch.equal(b["first"], torch.from_numpy(sample(b["index"][0].item())["x"]))
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(96))


def test_a_forked_child_dropping_held_batches_frees_none_of_them(make_db):
    import gc
    import os

    path = make_db(320, width=1024)
    ds = torch_lmdb.LMDBDataset(path)
    loader = torch_lmdb.make_loader(ds, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True,
                                    generator=torch.Generator().manual_seed(0))
    held = []
    for k, batch in enumerate(loader):  # the first 12 batches are held, the rest recycled
        if k < 12:
            held.append(batch)
    check = [(b["index"].clone(), b["x"].clone()) for b in held]
    pid = os.fork()
    if pid == 0:  # the child drops every batch it inherited
        code = 0
        try:
            held.clear()
            batch = None
            gc.collect()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    for _ in range(2):  # the workers keep producing, into free slabs only
        for batch in loader:
            for j, i in enumerate(batch["index"].tolist()):
                assert torch.equal(batch["x"][j], torch.from_numpy(sample(i, 1024)["x"]))
    for b, (index, x) in zip(held, check):
        assert torch.equal(b["index"], index) and torch.equal(b["x"], x)


def test_corrupted_record_names_path_and_index_in_worker_too(make_db):
    path = make_db(20)
    corrupt_record(path, 13)
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    with pytest.raises(torch_lmdb.CorruptedError, match=r"index 13") as info:
        ds[13]
    assert path in str(info.value)
    loader = DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(torch_lmdb.CorruptedError, match=r"index 13"):
        for _ in loader:
            pass


def test_checksums_are_verified_by_default_in_every_read_path(make_db):
    # 2 KiB records: a batch hashes each record while it copies it; the flip
    # lies in x's payload.
    path = make_db(40, width=512)
    corrupt_record(path, 13)
    ds = torch_lmdb.LMDBDataset(path)
    for read in (lambda: ds[13], lambda: ds.get_batch([12, 13, 14]),
                 lambda: list(torch_lmdb.make_loader(ds, batch_size=8)),
                 lambda: list(ds.iter_batches(8))):
        with pytest.raises(torch_lmdb.CorruptedError, match=r"index 13.*checksum mismatch") as info:
            read()
        assert path in str(info.value)
    assert sorted(ds.get_batch([12, 14, 30])["index"].tolist()) == [12, 14, 30]
    # verify=False returns the altered bytes as stored.
    unchecked = torch_lmdb.LMDBDataset(path, verify=False)
    x = unchecked.get_batch([12, 13])["x"]
    assert torch.equal(x[0], torch.from_numpy(sample(12, 512)["x"]))
    assert not torch.equal(x[1], torch.from_numpy(sample(13, 512)["x"]))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_large_worker_batches_recycle_buffers_never_overwriting_held_ones(make_db, method):
    # 16 KiB samples, batches of 8: 128 KiB tensors travel through recycled slabs.
    gc.collect()  # earlier tests' loaders awaiting collection (and their workers' slabs) are not this test's count
    path = make_db(640, width=4096)
    ds = torch_lmdb.LMDBDataset(path)
    loader = torch_lmdb.make_loader(ds, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=method)
    held = list(loader)  # 80 batches kept alive: more than a worker's 16 slabs
    check_every_index_once(held, 640, width=4096)
    # Batches dropped as soon as they are read: their buffers are reused.
    count = 0
    for batch in loader:
        for j, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["x"][j], torch.from_numpy(sample(i, 4096)["x"]))
        count += 1
    assert count == 80
    assert torch_lmdb._C.slab_count() <= 12  # 2 workers x (prefetch + in flight), not one per batch
    check_every_index_once(held, 640, width=4096)  # still intact after the second epoch


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_persistent_drop_in_workers_read_samples_appended_after_refresh(make_db, method):
    # README: a persistent worker given an index past what it knows refreshes itself.
    path = make_db(40)
    ds = torch_lmdb.LMDBDataset(path)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True,
                        multiprocessing_context=method, timeout=120)
    check_every_index_once(loader, 40)
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        for i in range(40, 70):
            w.write(sample(i))
    assert ds.refresh() == 70
    check_every_index_once(loader, 70)  # the new samples, as written
    check_every_index_once(loader, 70)
