"""Shard directories: manifest.json + shard databases, opened as one dataset
from Python and C++; info/verify; incomplete and damaged directories."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import torch_lmdb
from torch_lmdb import _C, _manifest
from torch_lmdb.cli import main
from conftest import corrupt_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.environ.get("TORCH_LMDB_ROUNDTRIP", os.path.join(ROOT, "build", "cmake", "torch_lmdb_roundtrip"))
COUNTS = [7, 5, 9]  # samples per shard
N = sum(COUNTS)


def recipe(i):
    """The sample recipe of tests/cpp/roundtrip_tool.cpp (its `check` mode reads it)."""
    return {"i": i, "x": (np.arange(12, dtype=np.float32) * i).reshape(3, 4), "name": f"sample-{i}",
            "raw": bytes(i % 7)}


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """torch-lmdb in this process (verify still checks in a forked child)."""

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return _Done(code, out.out, out.err)

    return run


def write_dir(path, counts=COUNTS, manifest=True):
    """A shard directory of the recipe, samples 0..sum(counts)-1 in order."""
    path = str(path)
    records, first = [], 0
    for k, n in enumerate(counts):
        records.append(_manifest.write_shard(path, k, (recipe(i) for i in range(first, first + n))))
        first += n
    if manifest:
        _manifest.write_manifest(path, records, source={"test": "recipe"})
    return path


def load_manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def save_manifest(path, manifest):
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_manifest_lists_shards_relative_with_counts_checksums_and_schema(tmp_path):
    path = write_dir(tmp_path / "out")
    m = load_manifest(path)
    assert m["format"] == "torch_lmdb.manifest" and m["format_version"] == 2
    assert m["num_samples"] == N
    assert [s["path"] for s in m["shards"]] == ["shard-00000.lmdb", "shard-00001.lmdb", "shard-00002.lmdb"]
    assert [s["num_samples"] for s in m["shards"]] == COUNTS
    for s in m["shards"]:
        reader = _C.Reader([os.path.join(path, s["path"])])
        assert s["meta_xxh3_64"] == _C.metadata_checksum(reader.metadata_json(0))
        assert len(s["meta_xxh3_64"]) == 16
    # raw (bytes of i % 7) varies in length between samples: -1 in the shared schema
    fields = {f["name"]: f for f in m["schema"]}
    assert fields["x"]["shape"] == [3, 4] and fields["x"]["dtype"] == "float32"
    assert fields["raw"]["shape"] == [-1]
    assert m["codecs"] == {"i": "none", "x": "none", "name": "none", "raw": "none"}
    assert m["source"] == {"test": "recipe"}
    assert not [n for n in os.listdir(path) if ".tmp-" in n]  # the temporary names are gone


def test_lmdbdataset_opens_a_manifest_dir_as_one_dataset(tmp_path):
    path = write_dir(tmp_path / "out")
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert len(ds) == N
    for i in range(N):  # across the shard boundaries 7 and 12
        got = ds[i]
        assert got["i"].item() == i and got["name"] == f"sample-{i}" and got["raw"] == bytes(i % 7)
        assert torch.equal(got["x"], torch.from_numpy(recipe(i)["x"]))
    batch = ds.get_batch([6, 7, 12, 20])
    assert batch["i"].tolist() == [6, 7, 12, 20]
    assert len(ds.metadata_of(2)["schema"]) == 4  # one metadata per shard
    with pytest.raises(IndexError):
        ds.metadata_of(3)


def test_cpp_reader_opens_a_manifest_dir(tmp_path):
    assert os.path.exists(TOOL), f"build the C++ tool first (make build): {TOOL}"
    path = write_dir(tmp_path / "out")
    ok = subprocess.run([TOOL, "check", path, str(N)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run([TOOL, "check", path, str(N + 1)], capture_output=True, text=True)
    assert wrong.returncode == 1 and f"size {N} != {N + 1}" in wrong.stderr
    os.remove(os.path.join(path, "manifest.json"))
    incomplete = subprocess.run([TOOL, "check", path, str(N)], capture_output=True, text=True)
    assert incomplete.returncode == 1
    assert "no manifest.json: an incomplete write" in incomplete.stderr and path in incomplete.stderr


def test_directory_of_shards_without_manifest_is_an_incomplete_write(tmp_path, cli):
    path = write_dir(tmp_path / "out", manifest=False)
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match="no manifest.json: an incomplete write") as e:
        torch_lmdb.LMDBDataset(path)
    assert f"'{path}'" in str(e.value)
    info = cli("info", path)
    assert info.returncode == 1 and "incomplete write" in info.stderr
    verify = cli("verify", path)
    assert verify.returncode == 1 and f"{path}: damaged or incomplete" in verify.stdout
    assert "incomplete write" in verify.stdout


def test_empty_directory_is_not_taken_for_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(torch_lmdb.Error) as e:
        torch_lmdb.LMDBDataset(str(tmp_path / "empty"))
    assert "incomplete" not in str(e.value) and "empty" in str(e.value)


def _damage(kind, path):
    m = load_manifest(path)
    if kind == "count":
        m["shards"][1]["num_samples"] += 1
        m["num_samples"] += 1  # (a total left as it was is refused too: test_manifest_identity)
    elif kind == "checksum":
        m["shards"][1]["meta_xxh3_64"] = "0" * 16
    elif kind == "schema":
        m["schema"][1]["dtype"] = "float64"
    elif kind == "missing":
        shutil.rmtree(os.path.join(path, "shard-00001.lmdb"))
        return "shard-00001.lmdb", "is missing"
    elif kind == "escape":
        m["shards"][1]["path"] = "../elsewhere.lmdb"
    elif kind == "not_json":
        with open(os.path.join(path, "manifest.json"), "w") as f:
            f.write('{"format": "torch_lmdb.manifest", "shards": [')
        return "manifest.json", "not JSON"
    elif kind == "version":
        m["format_version"] = 99
    save_manifest(path, m)
    return {"count": ("shard-00001.lmdb", "5 samples, the manifest says 6"),
            "checksum": ("shard-00001.lmdb", "metadata checksum"),
            "schema": ("shard-00000.lmdb", "fields or dtypes differ"),  # every shard differs: the first is named
            "escape": ("manifest.json", "not a relative path inside the directory"),
            "version": ("manifest.json", "format version 99")}[kind]


@pytest.mark.parametrize("kind", ["count", "checksum", "schema", "missing", "escape", "not_json", "version"])
def test_damaged_manifest_or_mismatched_shard_is_named(tmp_path, kind, cli):
    path = write_dir(tmp_path / "out")
    where, what = _damage(kind, path)
    with pytest.raises(torch_lmdb.Error) as e:
        torch_lmdb.LMDBDataset(path)
    assert where in str(e.value) and what in str(e.value)
    verify = cli("verify", path)
    assert verify.returncode == 1 and where in verify.stdout and what in verify.stdout


def test_shard_replaced_by_another_database_fails_its_checksum(tmp_path):
    path = write_dir(tmp_path / "out")
    shard = os.path.join(path, "shard-00000.lmdb")
    shutil.rmtree(shard)
    with torch_lmdb.LMDBWriter(shard) as w:  # same count and schema, other data
        for i in range(COUNTS[0]):
            w.write(recipe(i + 100))
    with pytest.raises(torch_lmdb.InvalidDatabaseError, match="metadata checksum .* the manifest says") as e:
        torch_lmdb.LMDBDataset(path)
    assert "shard-00000.lmdb" in str(e.value)


def test_info_of_a_shard_directory_gives_each_fields_codec_over_the_shards(tmp_path, cli):
    out = str(tmp_path / "mixed")
    sample = lambda i: {"x": np.full(256, i, dtype=np.float32), "k": np.int64(i)}
    records = [_manifest.write_shard(out, k, [sample(i) for i in range(20)], compression=codec)
               for k, codec in enumerate(["lz4", "lz4", "none"])]
    _manifest.write_manifest(out, records, source={})
    fields = {f["name"]: f for f in torch_lmdb.info(out)["fields"]}
    shards = [{f["name"]: f for f in torch_lmdb.info(s["path"])["fields"]} for s in torch_lmdb.info(out)["shards"]]
    assert fields["x"]["codec"] == "mixed" and fields["x"]["codecs"] == ["lz4:5", "lz4:5", "none"]
    assert fields["x"]["stored_bytes"] == sum(s["x"]["stored_bytes"] for s in shards) < 3 * 20 * 1024
    assert fields["x"]["raw_bytes"] == 3 * 20 * 1024
    text = cli("info", out).stdout
    assert "per shard: lz4:5, lz4:5, none" in text and "of 60.0 KiB raw" in text


def test_info_and_verify_take_a_manifest_dir(tmp_path, cli):
    path = write_dir(tmp_path / "out")
    info = torch_lmdb.info(path)
    assert info["num_samples"] == N and [s["num_samples"] for s in info["shards"]] == COUNTS
    assert info["manifest"]["source"] == {"test": "recipe"} and info["complete"]
    text = cli("info", path)
    assert text.returncode == 0, text.stderr
    assert "shard directory, 3 shards" in text.stdout and f"samples:        {N}" in text.stdout
    js = cli("info", "--json", path)
    assert json.loads(js.stdout)["num_samples"] == N
    ok = cli("verify", path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "manifest ok, 3 shards" in ok.stdout
    assert ok.stdout.count("ok, ") == 4 and "shard-00002.lmdb: ok, 9 samples" in ok.stdout
    corrupt_record(os.path.join(path, "shard-00002.lmdb"), 4)
    bad = cli("verify", path)
    assert bad.returncode == 1 and "shard-00002.lmdb: 1 problem(s), first: index 4" in bad.stdout


def test_rewritten_shard_replaces_a_partial_one(tmp_path):
    """A retried task: the earlier attempt's shard (here: 2 samples) is replaced, not appended to."""
    path = str(tmp_path / "out")
    _manifest.write_shard(path, 0, (recipe(i) for i in range(2)))
    os.makedirs(os.path.join(path, ".shard-00000.lmdb.tmp-dead"))  # a dead attempt's leftover
    record = _manifest.write_shard(path, 0, (recipe(i) for i in range(5)))
    assert record["num_samples"] == 5
    _manifest.write_manifest(path, [record])
    assert sorted(os.listdir(path)) == ["manifest.json", "shard-00000.lmdb"]
    assert len(torch_lmdb.LMDBDataset(path)) == 5


def test_shards_of_different_fields_get_no_manifest(tmp_path):
    path = str(tmp_path / "out")
    a = _manifest.write_shard(path, 0, [recipe(0)])
    b = _manifest.write_shard(path, 1, [{"i": 1}])
    with pytest.raises(_manifest.ManifestError, match="shard-00001.lmdb' has other fields"):
        _manifest.write_manifest(path, [a, b])
    assert not os.path.exists(os.path.join(path, "manifest.json"))
