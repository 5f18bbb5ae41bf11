"""Variable-shape fields: pad/pad_value on every batched path (make_loader
too), <name>_lengths in every batch, the drop-in DataLoader's ds.collate,
and README's "Variable-shape fields" snippet as written."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import torch_lmdb
from _readme import snippet

N = 40


def paths_of(i):
    """Sample i's ragged field: samples 0-15 share n = 2, later ones vary."""
    n = 2 if i < 16 else 1 + i % 5
    return np.arange(n * 4, dtype=np.float32).reshape(n, 4) + i


def write_ragged(path, n=N):
    with torch_lmdb.LMDBWriter(path) as w:
        for i in range(n):
            w.write({"index": i, "paths": paths_of(i), "position": np.full(3, i, dtype=np.float32)})
    return path


def check_batch(batch, pad_value=0.0):
    ids = batch["index"].tolist() if "index" in batch else batch["position"][:, 0].long().tolist()
    assert "position_lengths" not in batch  # a field of one shape is not padded
    assert batch["paths_lengths"].dtype == torch.int64
    assert batch["paths_lengths"].tolist() == [list(paths_of(i).shape) for i in ids]
    for row, i in zip(batch["paths"], ids):
        want = torch.from_numpy(paths_of(i))
        assert torch.equal(row[:want.shape[0]], want)
        assert (row[want.shape[0]:] == pad_value).all()


@pytest.fixture
def ragged(tmp_path):
    return write_ragged(str(tmp_path / "ragged.lmdb"))


def test_make_loader_takes_pad_and_every_batch_has_lengths(ragged):
    ds = torch_lmdb.LMDBDataset(ragged)
    for workers in (0, 2):
        loader = torch_lmdb.make_loader(ds, 8, pad=["paths"], pad_value=-1.0, num_workers=workers)
        batches = list(loader)
        assert len(batches) == 5
        assert batches[0]["paths"].shape == (8, 2, 4)  # samples 0-7: one shape, lengths all the same
        for batch in batches:
            check_batch(batch, pad_value=-1.0)
    with pytest.raises(ValueError, match="nope"):
        torch_lmdb.make_loader(ds, 8, pad=["nope"])
    with pytest.raises(ValueError, match="'paths'"):  # unpadded, the loader's error names the field
        list(torch_lmdb.make_loader(ds, 8))


def test_lengths_in_every_batch_of_get_batch_and_iter_batches(ragged):
    ds = torch_lmdb.LMDBDataset(ragged, pad=True)
    check_batch(ds.get_batch([0, 1, 2]))  # equal shapes: lengths all the same
    check_batch(ds[[3, 20, 21]])
    for batch in ds.iter_batches(8):
        check_batch(batch)
    assert "paths_lengths" in ds.get_batch([0, 1], pad=["paths"])
    assert "paths_lengths" not in torch_lmdb.LMDBDataset(ragged).get_batch([0, 1])  # not padded: none


@pytest.mark.parametrize("workers", [0, 2])
def test_drop_in_dataloader_collates_with_ds_collate(ragged, workers):
    ds = torch_lmdb.LMDBDataset(ragged, pad=["paths"])
    batches = list(DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=ds.collate))
    assert len(batches) == 5
    for k, batch in enumerate(batches):
        check_batch(batch)
        want = ds.get_batch(list(range(8 * k, 8 * k + 8)))
        assert list(batch) == list(want)
        for name in want:
            assert torch.equal(batch[name], want[name]), name
    unpadded = torch_lmdb.LMDBDataset(ragged)
    with pytest.raises(ValueError, match="field 'paths'.*pad=True"):
        list(DataLoader(unpadded, batch_size=40, collate_fn=unpadded.collate))


def test_readme_padding_snippet_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_ragged("radio.lmdb", n=200)
    scope = {"torch_lmdb": torch_lmdb, "DataLoader": DataLoader}
    exec(snippet("Variable-shape fields (padding)"), scope)
    check_batch(scope["batch"])  # the make_loader loop's last batch
    ds = scope["ds"]
    seen = []
    for batch in scope["loader"]:  # the drop-in loader
        assert set(batch) == {"paths", "paths_lengths", "position"}
        for row, length, pos in zip(batch["paths"], batch["paths_lengths"], batch["position"]):
            i = int(pos[0])
            assert length.tolist() == list(paths_of(i).shape)
            assert torch.equal(row[:length[0]], torch.from_numpy(paths_of(i)))
            seen.append(i)
    assert sorted(seen) == list(range(len(ds)))
