"""torch-lmdb convert of stores with splits (one database per group), and the CLI's messages."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import torch_lmdb
from torch_lmdb import _source, _zarr, cli
from torch_lmdb import convert as tl_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {"train": 37, "val": 11}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, env=env)


def split_values(split, n):
    """Deterministic per-split columns (complex, nested bool, ragged-free str)."""
    offset = 1000 if split == "val" else 0
    i = np.arange(n) + offset
    cir = (i[:, None, None] + np.arange(6).reshape(1, 2, 3) * 1j).astype(np.complex64)
    return {"cir": cir, "tx_position": np.stack([i, -i, i * 0.5], axis=1).astype(np.float64),
            "labels/los": i % 3 == 0, "scene": [f"{split}-scene-{k}" for k in i]}


def make_split_zarr(path, sizes=SIZES):
    root = _zarr.open_group(str(path), mode="w")
    root.attrs["simulator"] = "raysim 2.1"
    _zarr.write_array(root, "bs_positions", np.ones((4, 3), dtype=np.float32))  # small, not per sample
    for split, n in sizes.items():
        values = split_values(split, n)
        group = root.create_group(split)
        group.attrs["split"] = split
        _zarr.write_array(group, "cir", values["cir"], chunks=(5, 2, 3))
        _zarr.write_array(group, "tx_position", values["tx_position"], chunks=(5, 3))
        _zarr.write_array(group.create_group("labels"), "los", values["labels/los"], chunks=(5,))
        _zarr.write_strings(group, "scene", values["scene"], chunks=(5,))
    return str(path)


def make_plain_zarr(path, n=SIZES["train"]):
    """One dataset (no splits): the train split's arrays at the root."""
    root = _zarr.open_group(str(path), mode="w")
    values = split_values("train", n)
    _zarr.write_array(root, "cir", values["cir"], chunks=(5, 2, 3))
    _zarr.write_array(root.create_group("labels"), "los", values["labels/los"], chunks=(5,))
    return str(path)


def make_split_hdf5(path, sizes=SIZES):
    with h5py.File(path, "w") as f:
        f.attrs["simulator"] = "raysim 2.1"
        f["bs_positions"] = np.ones((4, 3), dtype=np.float32)
        for split, n in sizes.items():
            values = split_values(split, n)
            group = f.create_group(split)
            group.attrs["split"] = split
            group["cir"] = values["cir"]
            group["tx_position"] = values["tx_position"]
            group["labels/los"] = values["labels/los"]
            group.create_dataset("scene", data=values["scene"], dtype=h5py.string_dtype())
    return str(path)


def check_split(path, split, n=None):
    n = SIZES[split] if n is None else n
    ds = torch_lmdb.LMDBDataset(path)
    assert len(ds) == n
    assert {f['name'] for f in ds.schema} == {"cir", "tx_position", "labels/los", "scene"}
    values = split_values(split, SIZES[split])
    for i in (0, n // 2, n - 1):
        got = ds[i]
        np.testing.assert_array_equal(got["cir"].numpy(), values["cir"][i])
        np.testing.assert_array_equal(got["tx_position"].numpy(), values["tx_position"][i])
        assert bool(got["labels/los"]) == bool(values["labels/los"][i])
        assert got["scene"] == values["scene"][i]
    user = ds.metadata["user"]
    assert user["source_attrs"] == {"simulator": "raysim 2.1"}
    assert user["group_attrs"] == {"split": split}
    assert user["group"] == split and user["source"]["group"] == split
    assert user["mismatched_arrays"]["bs_positions"]["shape"] == [4, 3]
    return ds


@pytest.mark.parametrize("kind", ["zarr", "hdf5"])
def test_split_store_converts_one_database_per_split(tmp_path, kind):
    src = make_split_zarr(tmp_path / "sim.zarr") if kind == "zarr" else make_split_hdf5(tmp_path / "sim.h5")
    out = tmp_path / "out"
    proc = run_cli("convert", f"--{kind}-path", src, "--output-dir", str(out), "--verify", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / "train.lmdb"), str(out / "val.lmdb")]
    assert "verified 37 samples" in proc.stderr and "verified 11 samples" in proc.stderr
    for split in SIZES:
        check_split(str(out / f"{split}.lmdb"), split)


def test_group_picks_splits_and_unknown_group_lists_the_available_ones(tmp_path, capsys):
    src = make_split_zarr(tmp_path / "sim.zarr")
    out = tmp_path / "out"
    assert cli.main(["convert", "--zarr-path", src, "--output-dir", str(out), "--group", "val", "--no-progress"]) == 0
    assert os.listdir(out) == ["val.lmdb"]
    check_split(str(out / "val.lmdb"), "val")
    capsys.readouterr()
    assert cli.main(["convert", "--zarr-path", src, "--output-dir", str(out), "--group", "test",
                     "--group", "val"]) == 1
    err = capsys.readouterr().err
    assert "no group(s) test" in err and "available: train, val" in err and len(err.strip().splitlines()) == 1


def test_output_with_splits_is_refused_unless_one_group(tmp_path, capsys):
    src = make_split_zarr(tmp_path / "sim.zarr")
    assert cli.main(["convert", "--zarr-path", src, "--output", str(tmp_path / "one.lmdb")]) == 1
    err = capsys.readouterr().err
    assert "--output-dir" in err and "train, val" in err
    assert not os.path.exists(tmp_path / "one.lmdb")
    assert cli.main(["convert", "--zarr-path", src, "--output", str(tmp_path / "one.lmdb"), "--group", "train",
                     "--fields", "cir,labels/los", "--limit", "20", "--no-progress"]) == 0
    ds = torch_lmdb.LMDBDataset(str(tmp_path / "one.lmdb"))
    assert len(ds) == 20 and {f['name'] for f in ds.schema} == {"cir", "labels/los"}
    assert ds.metadata["user"]["group_attrs"] == {"split": "train"}


def test_which_groups_are_splits(tmp_path):
    # equal sizes, split names: splits
    src = make_split_zarr(tmp_path / "eq.zarr", sizes={"train": 9, "test": 9})
    paths = tl_convert.convert_splits("zarr", src, str(tmp_path / "eq"), log=lambda *a, **k: None)
    assert sorted(paths) == ["test", "train"]
    assert len(torch_lmdb.LMDBDataset(paths["test"])) == 9
    # other names, different sizes: splits (they cannot be fields of one dataset)
    src = make_split_zarr(tmp_path / "ab.zarr", sizes={"campaign_a": 9, "campaign_b": 5})
    assert tl_convert.store_splits("zarr", src)[0] == ["campaign_a", "campaign_b"]
    # a root array with a split's sample count: the root holds per-sample arrays, no splits
    root = _zarr.open_group(src, mode="r+")
    _zarr.write_array(root, "rx_id", np.arange(9))
    assert tl_convert.store_splits("zarr", src)[0] == []
    # equal sizes, other names (left/right views of the same samples): one dataset, groups are fields
    src = make_split_zarr(tmp_path / "lr.zarr", sizes={"left": 9, "right": 9})
    assert tl_convert.store_splits("zarr", src)[0] == []
    [out] = tl_convert.convert("zarr", src, str(tmp_path / "lr.lmdb"), log=lambda *a, **k: None)
    assert {"left/cir", "right/labels/los"} <= {f['name'] for f in torch_lmdb.LMDBDataset(out).schema}
    # a nested group picked by name gets a file name without '/'
    root = _zarr.open_group(str(tmp_path / "nested.zarr"), mode="w")
    year = root.create_group("2024")
    for split, n in (("train", 8), ("val", 3)):
        _zarr.write_array(year.create_group(split), "x", np.arange(n, dtype=np.int32))
    paths = tl_convert.convert_splits("zarr", str(tmp_path / "nested.zarr"), str(tmp_path / "n"),
                                      groups=["2024/train"], log=lambda *a, **k: None)
    assert paths == {"2024/train": [str(tmp_path / "n" / "2024__train.lmdb")]}
    assert torch_lmdb.LMDBDataset(paths["2024/train"][0])[7]["x"].item() == 7


def test_skip_mismatched_prints_each_array_it_leaves_out_on_one_line(tmp_path):
    src = make_split_zarr(tmp_path / "sim.zarr")
    root = _zarr.open_group(src, mode="r+")
    _zarr.write_array(root, "big_grid", np.zeros((600, 600), dtype=np.float32))  # too large for the metadata
    proc = run_cli("convert", "--zarr-path", src, "--output-dir", str(tmp_path / "a"), "--no-progress")
    assert proc.returncode == 1 and "big_grid" in proc.stderr and "--skip-mismatched" in proc.stderr
    proc = run_cli("convert", "--zarr-path", src, "--output-dir", str(tmp_path / "b"), "--skip-mismatched",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    for split in SIZES:  # each split leaves out both root arrays, each named with its shape
        assert any(f"group '{split}'" in w and "'big_grid'" in w and "[600, 600]" in w for w in warnings), warnings
        assert any(f"group '{split}'" in w and "'bs_positions'" in w and "[4, 3]" in w for w in warnings), warnings
    assert len(warnings) == 4
    assert "warnings.warn" not in proc.stderr and "Warning:" not in proc.stderr
    assert torch_lmdb.LMDBDataset(str(tmp_path / "b" / "val.lmdb")).metadata["user"]["skipped_arrays"] == \
        ["big_grid", "bs_positions"]


def _interrupt_after(monkeypatch, blocks):
    """Makes the next conversion read `blocks` blocks of 5 samples, then stop as SIGINT would."""
    monkeypatch.setattr(_source, "BLOCK_BYTES", 1)  # one chunk (5 samples) a block
    calls = []
    real = _source._ArraySource.read

    def read(self, start, stop, fields):
        calls.append(start)
        if len(calls) > blocks:
            raise tl_convert.Interrupted("SIGINT")
        return real(self, start, stop, fields)

    monkeypatch.setattr(_source._ArraySource, "read", read)


def test_resume_reports_written_and_present_then_complete(tmp_path, monkeypatch, capsys):
    src = make_split_zarr(tmp_path / "sim.zarr")
    out = tmp_path / "out"
    args = ["convert", "--zarr-path", src, "--output-dir", str(out), "--no-progress"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        assert cli.main(args) == 130
    assert not torch_lmdb.info(str(out / "train.lmdb"))["complete"]
    assert not os.path.exists(out / "val.lmdb")
    capsys.readouterr()
    assert cli.main(args + ["--resume", "--verify"]) == 0
    err = capsys.readouterr().err
    assert "converted 22 samples (15 already present)" in err, err
    assert "converted 11 samples in" in err, err
    check_split(str(out / "train.lmdb"), "train")
    check_split(str(out / "val.lmdb"), "val")
    assert cli.main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "already complete (37 samples)" in err and "already complete (11 samples)" in err
    assert "samples/s" not in err and "converted" not in err


def test_resume_of_one_dataset_reports_written_and_present_then_complete(tmp_path, monkeypatch, capsys):
    src = make_plain_zarr(tmp_path / "plain.zarr")
    args = ["convert", "--zarr-path", src, "--output", str(tmp_path / "plain.lmdb"), "--no-progress"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        assert cli.main(args) == 130
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "converted 27 samples (10 already present)" in err, err
    assert len(torch_lmdb.LMDBDataset(str(tmp_path / "plain.lmdb"))) == 37
    assert cli.main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "already complete (37 samples)" in err and "samples/s" not in err, err


def test_info_always_says_complete_or_incomplete_and_warnings_are_one_line(tmp_path, monkeypatch):
    src = make_plain_zarr(tmp_path / "plain.zarr")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert cli.main(["convert", "--zarr-path", src, "--output", str(tmp_path / "part.lmdb"),
                         "--no-progress"]) == 130
    assert cli.main(["convert", "--zarr-path", src, "--output", str(tmp_path / "full.lmdb"), "--no-progress"]) == 0
    proc = run_cli("info", str(tmp_path / "full.lmdb"))
    assert proc.returncode == 0, proc.stderr
    state = [line for line in proc.stdout.splitlines() if line.strip().startswith("state:")]
    assert len(state) == 1 and "complete" in state[0] and "incomplete" not in proc.stdout.lower(), proc.stdout
    proc = run_cli("info", str(tmp_path / "part.lmdb"))
    assert proc.returncode == 0, proc.stderr
    assert any(line.strip().startswith("state:") and "INCOMPLETE" in line for line in proc.stdout.splitlines())
    lines = proc.stderr.strip().splitlines()  # the reader's warning about the incomplete database
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "incomplete" in lines[0], proc.stderr


def test_unsigned_fields_keep_their_values(tmp_path):
    import torch

    root = _zarr.open_group(str(tmp_path / "u.zarr"), mode="w")
    values = {"u8": np.array([0, 255, 7], np.uint8), "u16": np.array([0, 65535, 7], np.uint16),
              "u32": np.array([0, 2**32 - 1, 7], np.uint32)}
    for name, v in values.items():
        _zarr.write_array(root, name, v)
    [out] = tl_convert.convert("zarr", str(tmp_path / "u.zarr"), str(tmp_path / "u.lmdb"), log=lambda *a, **k: None)
    ds = torch_lmdb.LMDBDataset(out)
    widened = not hasattr(torch, "uint16")  # torch < 2.3: uint16/uint32 widen to int32/int64
    expected = {"u8": torch.uint8, "u16": torch.int32 if widened else torch.uint16,
                "u32": torch.int64 if widened else torch.uint32}
    for i in range(3):
        for name, v in values.items():
            assert ds[i][name].dtype == expected[name] and int(ds[i][name]) == int(v[i]), (name, i)
