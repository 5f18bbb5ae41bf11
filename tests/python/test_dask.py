"""Dask writes shard directories: write_shards from a bag and from delayed
objects, `torch-lmdb convert --shards N --dask`, and a worker killed mid-run,
on a 2-worker LocalCluster (worker processes, loopback only)."""
import json
import os
import signal
import threading
import time

import dask
import dask.bag as db
import distributed
import numpy as np
import pytest
import torch

import torch_lmdb
from torch_lmdb import dask as tl_dask
from torch_lmdb.cli import main

from test_convert import N as ZARR_N, check_zarr_sample, make_zarr  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(i):
    return {"i": i, "x": np.full((2, 3), i, dtype=np.float32), "tag": f"s{i}"}


def check_dir(path, n):
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    assert len(ds) == n
    for i in range(n):
        got = ds[i]
        assert got["i"].item() == i and got["tag"] == f"s{i}"
        assert torch.equal(got["x"], torch.full((2, 3), float(i)))
    assert not [e for e in os.listdir(path) if ".tmp-" in e]  # no leftover of any attempt


@pytest.fixture(scope="module")
def client():
    cluster = tl_dask.local_cluster(n_workers=2)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_local_cluster_listens_on_loopback_only(client):
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
    import psutil  # a dependency of distributed

    def listening(p):
        return [c.laddr for c in getattr(p, "net_connections", p.connections)(kind="inet")
                if c.status == psutil.CONN_LISTEN]

    me = psutil.Process()
    info = client.scheduler_info()
    # this process hosts the scheduler: its port and its HTTP server's (other tests may listen elsewhere)
    ports = {int(info["address"].rsplit(":", 1)[1]), *info.get("services", {}).values()}
    mine = [a for a in listening(me) if a.port in ports]
    assert len(ports) == 2 and {a.port for a in mine} == ports
    workers = [a for p in me.children(recursive=True) for a in listening(p)]  # workers, nannies, their HTTP
    assert workers and all(a.ip == "127.0.0.1" for a in mine + workers), mine + workers


def test_write_shards_from_a_bag(client, tmp_path):
    bag = db.from_sequence(range(50), npartitions=4).map(sample)
    out = str(tmp_path / "out")
    manifest = tl_dask.write_shards(bag, out, client=client, source={"simulator": "test"})
    assert manifest["num_samples"] == 50 and len(manifest["shards"]) == 4
    assert manifest["source"]["simulator"] == "test" and manifest["source"]["partitions"] == 4
    check_dir(out, 50)
    with pytest.raises(ValueError, match="already holds a sharded dataset"):
        tl_dask.write_shards(bag, out, client=client)
    tl_dask.write_shards(db.from_sequence(range(10), npartitions=2).map(sample), out, client=client, overwrite=True)
    check_dir(out, 10)


def _generate(first, count):
    for i in range(first, first + count):
        yield sample(i)


def test_write_shards_from_delayed_generators(client, tmp_path):
    parts = [dask.delayed(_generate)(0, 4), dask.delayed(_generate)(4, 0), dask.delayed(_generate)(4, 7)]
    out = str(tmp_path / "out")
    manifest = tl_dask.write_shards(parts, out, client=client)
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 7]  # the empty partition is left out
    check_dir(out, 11)


def _bad(i):
    return {"i": i, "x": object()} if i == 7 else sample(i)


def test_failing_task_leaves_no_manifest_and_says_why(client, tmp_path):
    out = str(tmp_path / "out")
    bag = db.from_sequence(range(12), npartitions=3).map(_bad)
    with pytest.raises(tl_dask.ShardWriteError, match="no manifest was written") as e:
        tl_dask.write_shards(bag, out, client=client, retries=1)
    assert f"'{out}'" in str(e.value) and "object" in str(e.value)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(torch_lmdb.Error, match="incomplete write"):
        torch_lmdb.LMDBDataset(out)


def _slow_once(i, marker):
    """Sample i; the first attempt of sample 30 records its worker's pid and
    stalls (the test kills that worker), a retry goes through."""
    if i == 30 and not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(60)
    return sample(i)


def test_worker_killed_mid_run_retries_or_fails_cleanly(client, tmp_path):
    out = str(tmp_path / "out")
    marker = str(tmp_path / "pid")
    bag = db.from_sequence(range(40), npartitions=4).map(_slow_once, marker=marker)
    result = {}

    def drive():
        try:
            result["manifest"] = tl_dask.write_shards(bag, out, client=client)
        except Exception as e:  # noqa: BLE001 - checked below
            result["error"] = e

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.time() + 30
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), "the stalling task never started"
    pid = int(open(marker).read())
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    print("worker killed:", "failed cleanly" if "error" in result else "finished through the retry")
    if "error" in result:  # a clear error and no manifest
        assert isinstance(result["error"], tl_dask.ShardWriteError), result["error"]
        assert not os.path.exists(os.path.join(out, "manifest.json"))
    else:  # Dask re-ran the task on the restarted worker: the dataset is exact
        assert result["manifest"]["num_samples"] == 40
        check_dir(out, 40)
    client.wait_for_workers(2, timeout=30)


def test_convert_cli_with_dask(client, tmp_path, capsys):
    src = make_zarr(tmp_path / "src.zarr")
    out = str(tmp_path / "conv")
    code = main(["convert", "--zarr-path", src, "--output", out, "--shards", "3", "--dask", client.scheduler.address,
                 "--verify", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.strip() == out and "verified against the source" in printed.err
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    ranges = manifest["source"]["ranges"]
    # chunk-aligned: the largest chunk is 10 rows (names), inner bounds are multiples of it
    assert ranges[0][0] == 0 and ranges[-1][1] == ZARR_N and all(b % 10 == 0 for _, b in ranges[:-1])
    assert manifest["source"]["path"] == os.path.abspath(src) and manifest["source"]["format"] == "zarr"
    assert len(manifest["source"]["attrs_sha256"]) == 64
    ds = torch_lmdb.LMDBDataset(out, verify=True)
    assert len(ds) == ZARR_N
    for i in range(ZARR_N):
        check_zarr_sample(ds[i], i)
    # --compression (default lz4) reaches the shards' writers, as without --dask
    def codecs(shard_dir):
        return {f["codec"] for s in torch_lmdb.info(shard_dir)["shards"]
                for f in torch_lmdb.info(s["path"])["fields"] if f["kind"] == "tensor"}

    assert codecs(out) == {"lz4"} and "lz4" in printed.err
    # info() of the shard directory: each field's codec and its bytes summed over the shards
    whole = {f["name"]: f for f in torch_lmdb.info(out)["fields"]}
    for name, field in whole.items():
        shards = [{f["name"]: f for f in torch_lmdb.info(s["path"])["fields"]}[name]
                  for s in torch_lmdb.info(out)["shards"]]
        assert field["codec"] == shards[0]["codec"] and field["level"] == shards[0]["level"], name
        assert field["stored_bytes"] == sum(f["stored_bytes"] for f in shards), name
        assert field["raw_bytes"] == sum(f["raw_bytes"] for f in shards), name
    none = str(tmp_path / "none")
    assert main(["convert", "--zarr-path", src, "--output", none, "--shards", "2", "--dask", client.scheduler.address,
                 "--compression", "none", "--no-progress"]) == 0
    assert codecs(none) == {"none"}


def test_aligned_ranges():
    assert tl_dask.aligned_ranges(23, 3, 10) == [(0, 10), (10, 20), (20, 23)]
    assert tl_dask.aligned_ranges(100, 3, 1) == [(0, 33), (33, 66), (66, 100)]
    assert tl_dask.aligned_ranges(15, 4, 10) == [(0, 10), (10, 15)]  # fewer chunks than shards


def test_convert_cli_dask_without_address_starts_a_local_cluster(tmp_path, capsys):
    src = make_zarr(tmp_path / "src.zarr")
    code = main(["convert", "--zarr-path", src, "--output-dir", str(tmp_path / "outdir"), "--shards", "2", "--dask",
                 "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    out = str(tmp_path / "outdir" / "src")  # <output-dir>/<source name>
    assert printed.out.strip() == out
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.lmdb", "shard-00001.lmdb"]
    ds = torch_lmdb.LMDBDataset(out)
    assert len(ds) == ZARR_N
    for i in (0, 9, 10, ZARR_N - 1):
        check_zarr_sample(ds[i], i)
    again = main(["convert", "--zarr-path", src, "--output", out, "--shards", "2", "--dask"])
    assert again == 1 and "already holds a sharded dataset" in capsys.readouterr().err


# A process that ran a Dask Client keeps Dask's threads (its event loop, the
# profiler) for good; a DataLoader iterator garbage-collected on one of them
# joins its workers from there, which deadlocked a later DataLoader test of
# the same pytest process. So the tests above run in a pytest of their own.
_IN_CHILD = "TORCH_LMDB_DASK_TESTS_IN_CHILD"
if os.environ.get(_IN_CHILD) != "1":
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        del globals()[_name]

    def test_dask_tests_in_a_process_of_their_own():
        import subprocess
        import sys

        env = dict(os.environ, **{_IN_CHILD: "1"})
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               os.path.abspath(__file__)], cwd=os.path.dirname(os.path.abspath(__file__)),
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
