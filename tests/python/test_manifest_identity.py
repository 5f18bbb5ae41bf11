"""A shard directory's manifest is checked against each shard's own identity
(dataset id, index, count), its totals and the directory (C++ reader, the one
implementation; Python's read_manifest and the CLI call it)."""
import json
import os
import shutil

import pytest

import torch_lmdb
from torch_lmdb import _C, _manifest
from torch_lmdb.cli import main
from test_shards import load_manifest, save_manifest, write_dir


def refused(path, match):
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match=match):
        torch_lmdb.LMDBDataset(path)
    with pytest.raises(_manifest.ManifestError, match=match):
        _manifest.read_manifest(path)
    assert main(["verify", path]) != 0


def test_each_shard_states_its_place_in_the_dataset(tmp_path):
    path = write_dir(tmp_path / "out")
    manifest = load_manifest(path)
    assert manifest["format_version"] == 2 and len(manifest["dataset_id"]) == 32
    for k, shard in enumerate(manifest["shards"]):
        meta = json.loads(_C.Reader([os.path.join(path, shard["path"])]).metadata_json(0))
        assert meta["shard"] == {"dataset_id": manifest["dataset_id"], "index": k, "count": 3}
        assert meta["complete"] is True
    assert len(torch_lmdb.LMDBDataset(path)) == 21
    assert _manifest.read_manifest(path)["dataset_id"] == manifest["dataset_id"]


def test_a_shard_listed_twice_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    m["shards"][2] = dict(m["shards"][0])
    m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
    save_manifest(path, m)
    refused(path, "listed twice")


def test_a_shard_listed_twice_under_another_name_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    os.symlink(os.path.join(path, m["shards"][0]["path"]), os.path.join(path, "alias.lmdb"))
    m["shards"][2] = dict(m["shards"][0], path="alias.lmdb")
    m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
    save_manifest(path, m)
    refused(path, "listed twice")


def test_a_dropped_shard_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    del m["shards"][1]
    m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
    save_manifest(path, m)
    refused(path, "does not match the manifest")


def test_reordered_shards_are_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    m["shards"].reverse()
    save_manifest(path, m)
    refused(path, "does not match the manifest")


def test_a_shard_of_another_dataset_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    other = write_dir(tmp_path / "other")
    m = load_manifest(path)
    name = m["shards"][1]["path"]
    shutil.rmtree(os.path.join(path, name))
    shutil.copytree(os.path.join(other, name), os.path.join(path, name))
    m["shards"][1]["meta_xxh3_64"] = load_manifest(other)["shards"][1]["meta_xxh3_64"]  # recomputed
    save_manifest(path, m)
    refused(path, "does not match the manifest")


def test_a_wrong_total_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    m["num_samples"] += 1
    save_manifest(path, m)
    refused(path, "'num_samples' is 22 but its shards list 21 samples")


def test_a_shard_symlinked_outside_the_directory_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    outside = write_dir(tmp_path / "elsewhere")
    m = load_manifest(path)
    name = m["shards"][0]["path"]
    shutil.rmtree(os.path.join(path, name))
    os.symlink(os.path.join(outside, name), os.path.join(path, name))
    save_manifest(path, m)
    refused(path, "outside the directory")


def test_a_data_file_symlinked_outside_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    outside = write_dir(tmp_path / "elsewhere")
    m = load_manifest(path)
    name = m["shards"][0]["path"]
    os.remove(os.path.join(path, name, "data.mdb"))
    os.symlink(os.path.join(outside, name, "data.mdb"), os.path.join(path, name, "data.mdb"))
    refused(path, "outside the directory")


def test_an_unknown_manifest_version_is_refused(tmp_path):
    path = write_dir(tmp_path / "out")
    for version in (0, 3, "2"):
        m = load_manifest(path)
        m["format_version"] = version
        save_manifest(path, m)
        refused(path, "format version|format_version")


def test_a_version_1_directory_stays_readable(tmp_path):
    # Written before shards carried their identity: no dataset_id to check.
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    m["format_version"] = 1
    del m["dataset_id"]
    save_manifest(path, m)
    assert len(torch_lmdb.LMDBDataset(path)) == 21
    m["format_version"] = 2
    save_manifest(path, m)
    refused(path, "dataset_id")


def test_a_shards_checksum_is_the_documented_canonical_form(tmp_path):
    # docs/FORMAT.md: xxh3-64 of json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).
    import ctypes
    import ctypes.util

    xxhash = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
    xxhash.XXH3_64bits.restype = ctypes.c_uint64
    xxhash.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    path = write_dir(tmp_path / "out")
    for shard in load_manifest(path)["shards"]:
        meta = json.loads(_C.Reader([os.path.join(path, shard["path"])]).metadata_json(0))
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert shard["meta_xxh3_64"] == f"{xxhash.XXH3_64bits(text, len(text)):016x}"
