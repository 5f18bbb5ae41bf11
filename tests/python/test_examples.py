"""Small versions of the examples (what `make demo` runs at full size)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import torch_lmdb
from torch_lmdb import _zarr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RADIO = os.path.join(ROOT, "examples", "radio_localization")
ENV = dict(os.environ, PYTHONPATH=ROOT)


def binary(name):
    directory = os.environ.get("TORCH_LMDB_EXAMPLES_BIN")
    assert directory, "TORCH_LMDB_EXAMPLES_BIN is unset: run the tests with `make test` (it builds the examples)"
    path = os.path.join(directory, name)
    assert os.path.exists(path), f"{path} is missing: `make examples` builds it"
    return path


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(results) == 1, proc.stdout
    return results[0]


@pytest.fixture(scope="module")
def radio(tmp_path_factory):
    """A tiny radio-localization dataset, as torch_lmdb shards and as a Zarr store with splits."""
    out = str(tmp_path_factory.mktemp("radio"))
    gen = [sys.executable, os.path.join(RADIO, "generate.py"), "--config", os.path.join(RADIO, "configs", "generate.yaml"),
           "--set", f"output_dir={out}", "--set", "num_samples=1500", "--set", "num_val_samples=300",
           "--set", "block=128", "--no-progress"]
    lmdb_paths = run(gen)["outputs"]
    run(gen + ["--set", "use_lmdb=false", "--set", "num_workers=3"])  # another worker count: same samples
    return out, lmdb_paths


def test_lmdb_and_zarr_paths_hold_identical_samples(radio):
    out, paths = radio
    for split in ("train", "val"):
        ds = torch_lmdb.LMDBDataset(paths[split])
        root = zarr.open_group(os.path.join(out, "radio.zarr"), mode="r")[split]
        assert len(ds) == root["position"].shape[0] == (1500 if split == "train" else 300)
        columns = {name: root[name][:] for name in ("cir", "rssi", "position", "los")}
        node = root["paths"]  # zarr-python 2: a VLenArray array; 3: a ragged group (values + offsets)
        columns["paths"] = (_zarr.RaggedArray(node, "paths") if node.attrs.get("ragged") else node)[:]
        lengths = set()
        for i in range(len(ds)):
            got = ds[i]
            for name in ("cir", "rssi", "position", "los"):
                np.testing.assert_array_equal(got[name].numpy(), columns[name][i], err_msg=f"{split} {i} {name}")
            np.testing.assert_array_equal(got["paths"].numpy(), columns["paths"][i].reshape(-1, 4))
            lengths.add(got["paths"].shape[0])
        assert len(lengths) > 3  # the number of multipath components varies
        assert got["cir"].shape == (8, 64) and got["los"].dtype == torch.bool


@pytest.fixture(scope="module")
def converted(radio, tmp_path_factory):
    """The Zarr store converted as `make demo` does: one database per split."""
    out, _ = radio
    dest = str(tmp_path_factory.mktemp("converted"))
    proc = subprocess.run([sys.executable, "-m", "torch_lmdb", "convert", "--zarr-path", os.path.join(out, "radio.zarr"),
                           "--output-dir", dest, "--verify", "--no-progress"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [os.path.join(dest, "train.lmdb"), os.path.join(dest, "val.lmdb")]
    return {"train": [os.path.join(dest, "train.lmdb")], "val": [os.path.join(dest, "val.lmdb")]}


def test_converted_zarr_splits_equal_the_generated_lmdb(radio, converted):
    out, paths = radio
    for split in ("train", "val"):
        a, b = torch_lmdb.LMDBDataset(paths[split]), torch_lmdb.LMDBDataset(converted[split])
        assert len(a) == len(b) == (1500 if split == "train" else 300)
        for i in range(0, len(a), 7):
            x, y = a[i], b[i]
            for name in ("cir", "rssi", "position", "los", "paths"):
                assert x[name].equal(y[name]), (split, i, name)
        user = b.metadata["user"]
        assert user["mismatched_arrays"]["bs_positions"]["shape"] == [8, 3]
        assert user["source_attrs"]["config"]["num_bs"] == 8
        assert user["group_attrs"] == {"split": split, "num_samples": len(a)}


def test_train_py_loss_falls_and_beats_the_mean(radio, converted):
    r = run([sys.executable, os.path.join(RADIO, "train.py"), "--config", os.path.join(RADIO, "configs", "train.yaml"),
             "--set", f"dataset.train_lmdb_paths=[{','.join(converted['train'])}]",
             "--set", f"dataset.val_lmdb_paths=[{','.join(converted['val'])}]",
             "--set", "epochs=4", "--set", "num_workers=2", "--set", "batch_size=64", "--no-progress"])
    assert r["losses"][-1] < r["losses"][0]
    assert r["median_errors_m"][-1] < 0.7 * r["baseline_error_m"]
    assert r["load_samples_per_s"] > 0


def test_train_py_reads_the_generated_shards_and_zarr_too(radio):
    out, paths = radio
    r = run([sys.executable, os.path.join(RADIO, "train.py"), "--config", os.path.join(RADIO, "configs", "train.yaml"),
             "--set", f"dataset.train_lmdb_paths=[{','.join(paths['train'])}]",
             "--set", f"dataset.val_lmdb_paths=[{','.join(paths['val'])}]",
             "--set", "epochs=1", "--set", "num_workers=0", "--set", "batch_size=64", "--no-progress"])
    assert r["loader"].startswith("torch_lmdb") and r["load_samples_per_s"] > 0
    r = run([sys.executable, os.path.join(RADIO, "train.py"), "--config", os.path.join(RADIO, "configs", "train.yaml"),
             "--set", "dataset.use_lmdb=false", "--set", f"dataset.train_zarr_path={out}/radio.zarr/train",
             "--set", f"dataset.val_zarr_path={out}/radio.zarr/val", "--set", "epochs=2", "--set", "num_workers=2",
             "--set", "batch_size=64", "--no-progress"])
    assert r["loader"].startswith("zarr") and r["losses"][-1] < r["losses"][0]


def test_train_py_trains_on_a_mixture_with_a_stored_selection(radio, tmp_path):
    _, paths = radio
    first = paths["train"][0]
    excluded = tmp_path / "scene.txt"
    excluded.write_text("\n".join(str(i) for i in range(0, 100)) + "\n")
    subprocess.run([sys.executable, "-m", "torch_lmdb", "select", first, "--name", "no-scene", "--exclude-file",
                    str(excluded)], check=True, env=ENV, capture_output=True)
    mixture = (f"{{weights: {{sim_a: 0.6, sim_b: 0.4}}, stratified: true, block_size: 64, sources: "
               f"{{sim_a: {{path: {first}, selection: no-scene}}, sim_b: {{paths: [{','.join(paths['train'][1:])}]}}}}}}")
    r = run([sys.executable, os.path.join(RADIO, "train.py"), "--config", os.path.join(RADIO, "configs", "train.yaml"),
             "--set", f"dataset.train_mixture={mixture}",
             "--set", f"dataset.val_lmdb_paths=[{','.join(paths['val'])}]",
             "--set", "epochs=3", "--set", "num_workers=2", "--set", "batch_size=64", "--no-progress"])
    assert r["loader"].startswith("torch_lmdb") and r["losses"][-1] < r["losses"][0]
    assert r["train_samples"] == len(torch_lmdb.LMDBDataset(paths["train"])) - 100


def test_train_native_loss_falls(converted):
    r = run([binary("train_native"), "--train", ",".join(converted["train"]), "--val", ",".join(converted["val"]),
             "--epochs", "4", "--batch-size", "64", "--workers", "2"])
    assert r["losses"][-1] < r["losses"][0]
    assert r["median_errors_m"][-1] < 0.7 * r["baseline_error_m"]


def test_fashion_mnist_both_readers_identical_and_learning(tmp_path):
    out = str(tmp_path / "fm")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "fashion_mnist", "convert_idx.py"),
                           "--out", out, "--no-progress"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(torch_lmdb.LMDBDataset(os.path.join(out, "train.lmdb"))) == 60000
    proc = subprocess.run([binary("train_fmnist"), "--data", out, "--epochs", "2", "--limit-train", "3000",
                           "--limit-test", "1000"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical samples: 60000 training and 10000 test images compared" in proc.stdout
    runs = json.loads(proc.stdout.split("RESULT ")[1])["runs"]
    for r in runs:
        assert r["losses"][-1] < r["losses"][0] and r["test_accuracy"] > 0.6
    assert abs(runs[0]["test_accuracy"] - runs[1]["test_accuracy"]) < 0.03
