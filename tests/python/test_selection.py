"""Selections: ds.select, ds.filter, stored named selections, the select CLI."""
import os
import subprocess
import sys

import pytest
import torch

import torch_lmdb

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def ids(batches):
    return [i for b in batches for i in b["index"].tolist()]


def test_select_reads_only_the_chosen_samples_in_every_path(make_db):
    ds = torch_lmdb.LMDBDataset(make_db(100))
    chosen = [90, 3, 41, 7, 64, 12, 55]
    view = ds.select(chosen)
    assert len(view) == 7
    assert view[0]["index"].item() == 90 and view[-1]["index"].item() == 55
    assert view.get_batch([1, 0])["index"].tolist() == [3, 90]
    assert sorted(ids(view.iter_batches(3, shuffle=True, seed=4))) == sorted(chosen)
    loader = torch_lmdb.make_loader(view, 2, shuffle=True, seed=1)
    assert sorted(ids(loader)) == sorted(chosen)
    # Ranks and block shuffle work in the view's positions.
    got = []
    for rank in range(2):
        got += ids(view.iter_batches(2, shuffle=True, seed=5, block_size=2, rank=rank, world_size=2))
    assert sorted(got) == sorted(chosen)
    # A view of a view composes; negative positions and masks work.
    assert view.select([-1, 0])[0]["index"].item() == 55
    assert view.select(torch.tensor([True, False] * 3 + [True])).selection.tolist() == [90, 41, 64, 55]
    with pytest.raises(IndexError, match="index 7 out of range for dataset of size 7"):
        view[7]
    with pytest.raises(IndexError, match="selection position 1: index 100 out of range"):
        ds.select([0, 100])
    with pytest.raises(ValueError, match="index 3 appears twice"):
        ds.select([3, 4, 3])
    assert len(ds.select([3, 3], allow_duplicates=True)) == 2


def test_selected_loader_pickles_and_resumes_in_selection_positions(make_db):
    view = torch_lmdb.LMDBDataset(make_db(60)).select(list(range(0, 60, 2)))
    loader = torch_lmdb.make_loader(view, 4, shuffle=True, seed=3, num_workers=2, multiprocessing_context="spawn")
    it = iter(loader)
    first = [next(it)["index"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["num_samples"] == 30 and state["position"] == 12
    rest = torch_lmdb.make_loader(view, 4, shuffle=True, seed=0)
    rest.load_state_dict(state)
    seen = sum(first, []) + ids(rest)
    assert sorted(seen) == list(range(0, 60, 2))


def test_filter_stores_a_named_selection_that_reopens_and_checks_the_data(make_db):
    path = make_db(500)
    ds = torch_lmdb.LMDBDataset(path)
    calls = []

    def odd(batch):
        calls.append(sorted(batch))
        return batch["index"] % 2 == 1

    view = ds.filter(odd, fields=["index"], name="odd", batch_size=128)
    assert calls[0] == ["index"] and len(calls) == 4  # only the named field, in batches of 128
    assert view.selection.tolist() == list(range(1, 500, 2))
    assert torch_lmdb.info(path)["selections"] == ["odd"]
    assert os.path.isfile(os.path.join(path, "selections", "odd.sel"))
    reopened = torch_lmdb.LMDBDataset(path, selection="odd")
    assert len(reopened) == 250 and reopened[3]["index"].item() == 7
    # A filter of a view maps through it.
    again = reopened.filter(lambda b: b["index"] < 100, fields="index")
    assert again.selection.tolist() == list(range(1, 100, 2))
    with pytest.raises(torch_lmdb.NotFoundError, match="selections/missing.sel"):
        torch_lmdb.LMDBDataset(path, selection="missing")
    with pytest.raises(ValueError, match="selection name '../x'"):
        ds.filter(odd, fields=["index"], name="../x")
    with pytest.raises(TypeError, match="bool mask of shape"):
        ds.filter(lambda b: [1, 2], fields=["index"])
    with pytest.raises(KeyError, match="nope"):
        ds.filter(odd, fields=["nope"])
    # Appending makes it data of another identity: the selection is refused.
    with torch_lmdb.LMDBWriter(path, mode="a") as w:
        w.write({"index": 500, "x": torch.zeros(8), "label": "more"})
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match="built for other data.*rebuild"):
        torch_lmdb.LMDBDataset(path, selection="odd")


def test_damaged_selection_file_is_refused(make_db):
    path = make_db(50)
    torch_lmdb.LMDBDataset(path).filter(lambda b: b["index"] < 10, fields=["index"], name="low")
    file = os.path.join(path, "selections", "low.sel")
    data = bytearray(open(file, "rb").read())
    data[45] ^= 1
    open(file, "wb").write(bytes(data))
    with pytest.raises(torch_lmdb.CorruptedError, match="low.sel' is damaged: the checksum"):
        torch_lmdb.LMDBDataset(path, selection="low")
    open(file, "wb").write(bytes(data[:20]))
    with pytest.raises(torch_lmdb.CorruptedError, match="less than a header"):
        torch_lmdb.LMDBDataset(path, selection="low")


def test_named_selection_of_a_shard_directory(tmp_path):
    from torch_lmdb import dask as tl_dask  # noqa: F401  (shard directories)
    from torch_lmdb import _manifest

    out = str(tmp_path / "shards")
    _manifest.prepare_output(out, overwrite=False)
    records = [_manifest.write_shard(out, k, [{"index": k * 10 + i} for i in range(10)]) for k in range(3)]
    _manifest.write_manifest(out, records)
    ds = torch_lmdb.LMDBDataset(out)
    ds.filter(lambda b: b["index"] >= 15, fields=["index"], name="late")
    assert os.path.isfile(os.path.join(out, "selections", "late.sel"))
    view = torch_lmdb.LMDBDataset(out, selection="late")
    assert sorted(ids(view.iter_batches(4))) == list(range(15, 30))
    assert torch_lmdb.info(out)["selections"] == ["late"]


def test_select_cli_builds_from_an_id_list(make_db, tmp_path):
    path = make_db(30)
    excl = tmp_path / "ids.txt"
    excl.write_text("# scene 3\n3\n4\n\n29\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "torch_lmdb", "select", path, "--name", "clean", "--exclude-file",
                          str(excl)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "27 of 30 samples" in run.stdout
    view = torch_lmdb.LMDBDataset(path, selection="clean")
    assert view.selection.tolist() == [i for i in range(30) if i not in (3, 4, 29)]
    run = subprocess.run([sys.executable, "-m", "torch_lmdb", "select", path, "--name", "few", "--include-file",
                          str(excl)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert torch_lmdb.LMDBDataset(path, selection="few").selection.tolist() == [3, 4, 29]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n31\n")
    run = subprocess.run([sys.executable, "-m", "torch_lmdb", "select", path, "--name", "x", "--include-file",
                          str(bad)], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "bad.txt:2: index 31 out of range for dataset of size 30" in run.stderr
    info = subprocess.run([sys.executable, "-m", "torch_lmdb", "info", path], capture_output=True, text=True, env=env)
    assert "selections:     clean (27 samples), few (3 samples)" in info.stdout
