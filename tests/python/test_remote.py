"""Datasets staged from HTTP and from a shared file system to a node-local
cache (README "Remote and shared storage"): nginx serves a shard directory,
a proxy injects faults."""
import fcntl
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import torch_lmdb
from torch_lmdb import _C, _manifest
from torch_lmdb.cli import main

from _http import FaultProxy, Nginx

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/sbin/nginx"),
                                reason="needs Debian's nginx-light (make deps installs it)")


def sample(i):
    rng = np.random.default_rng(i)
    return {"index": i, "x": rng.standard_normal(256).astype(np.float32), "label": f"s{i}"}


def write_shard_dir(out, shards=6, per_shard=300):
    records = []
    for k in range(shards):
        records.append(_manifest.write_shard(str(out), k, (sample(i) for i in range(k * per_shard, (k + 1) * per_shard))))
    _manifest.write_manifest(str(out), records)
    return str(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    write_shard_dir(root / "ds")
    server = Nginx(str(root), str(tmp_path_factory.mktemp("nginx")))
    yield server, str(root / "ds")
    server.stop()


def shard_sizes(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return [s["size"] for s in json.load(f)["shards"]]


def check_equal(batch_or_sample, indices):
    xs = batch_or_sample["x"]
    for j, i in enumerate(indices):
        assert int(batch_or_sample["index"][j]) == i
        assert torch.equal(xs[j], torch.from_numpy(sample(i)["x"])), f"sample {i}"


def leftovers(cache_dir):
    return glob.glob(os.path.join(cache_dir, "**", ".tmp-*"), recursive=True)


def own_url(served, name):
    """The served dataset under a path of the calling test's own (a symlink to
    it), so that the access log's lines under that path are the test's alone:
    a proxy thread of an earlier test (a stalled request) can still be
    fetching through `/ds` while the next test runs."""
    server, local = served
    link = os.path.join(os.path.dirname(local), name)
    if not os.path.islink(link):
        os.symlink(os.path.basename(local), link)
    return server.url + "/" + name


def fetched_under(server, name, suffix="/data.mdb"):
    """The uris of the logged requests under /<name>/ that end with `suffix`."""
    return [u for _, _, u in server.requests(suffix) if u.startswith(f"/{name}/")]


# ---- manifest hashes ----------------------------------------------------------

def test_written_manifest_records_each_shards_size_and_hash(tmp_path):
    out = write_shard_dir(tmp_path / "ds", shards=2, per_shard=10)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    for s in m["shards"]:
        data = os.path.join(out, s["path"], "data.mdb")
        assert s["size"] == os.path.getsize(data)
        assert s["data_xxh3_64"] == _C.file_xxh3(data)
    assert len(torch_lmdb.LMDBDataset(out)) == 20  # the reader accepts the new keys


def test_manifest_hash_command_adds_them_and_refuses_a_changed_shard(tmp_path, capsys):
    out = write_shard_dir(tmp_path / "ds", shards=2, per_shard=10)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    for s in m["shards"]:
        del s["size"], s["data_xxh3_64"]
    with open(path, "w") as f:
        json.dump(m, f)
    assert main(["manifest", "--hash", out]) == 0
    assert "recorded for 2 shards" in capsys.readouterr().out
    with open(path) as f:
        hashed = json.load(f)
    assert [s["data_xxh3_64"] for s in hashed["shards"]] == [
        _C.file_xxh3(os.path.join(out, s["path"], "data.mdb")) for s in hashed["shards"]]
    # A shard whose file changed after its hash was recorded is named.
    hashed["shards"][1]["data_xxh3_64"] = "0123456789abcdef"
    with open(path, "w") as f:
        json.dump(hashed, f)
    assert main(["manifest", "--hash", out]) == 1
    err = capsys.readouterr().err
    assert "shard 1" in err and "shard-00001.lmdb" in err and "0123456789abcdef" in err


def test_cache_limit_sizes():
    from torch_lmdb.remote import parse_cache_limit

    assert parse_cache_limit("20GB") == 20 * 10**9
    assert parse_cache_limit("512MiB") == 512 << 20
    assert parse_cache_limit("1.5 G") == 1_500_000_000
    assert parse_cache_limit(4096) == 4096
    assert parse_cache_limit(None) is None
    for bad in ("20 parsecs", "", "-1GB", "GB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_cache_limit(bad)
    with pytest.raises(TypeError):
        parse_cache_limit(True)


# ---- a dataset that fits its cache: staged whole -------------------------------

def test_http_dataset_staged_whole_reads_every_sample_and_fetches_each_shard_once(served, tmp_path):
    server, local = served
    url = own_url(served, "ds-whole")
    cache = str(tmp_path / "cache")
    ds = torch_lmdb.LMDBDataset(url, cache_dir=cache, cache_limit="1GB")
    assert len(ds) == 1800
    check_equal(ds.get_batch(list(range(0, 1800, 7))), list(range(0, 1800, 7)))
    assert ds[1799]["label"] == "s1799"
    stats = ds.io_stats()
    assert stats["shards_fetched"] == 6 and stats["bytes_fetched"] == sum(shard_sizes(local))
    assert stats["fetch_seconds"] > 0 and stats["evictions"] == 0
    fetched = fetched_under(server, "ds-whole")
    assert sorted(fetched) == sorted(f"/ds-whole/shard-{k:05d}.lmdb/data.mdb" for k in range(6)), \
        (fetched, ds._staged[1].stats())
    # A second dataset (another process of the node would do the same) finds every shard cached.
    ds2 = torch_lmdb.LMDBDataset(url, cache_dir=cache)
    assert len(ds2) == 1800 and len(fetched_under(server, "ds-whole")) == 6
    # The staged copies open without a lock file.
    assert not glob.glob(os.path.join(cache, "*", "*", "lock.mdb"))
    assert leftovers(cache) == []


def test_http_dataset_in_dataloader_workers(served, tmp_path):
    server, _ = served
    ds = torch_lmdb.LMDBDataset(server.url + "/ds", cache_dir=str(tmp_path / "c"))
    loader = torch_lmdb.make_loader(ds, batch_size=64, shuffle=True, seed=3, num_workers=2,
                                    multiprocessing_context="spawn")
    seen = []
    for batch in loader:
        check_equal(batch, batch["index"].tolist())
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(1800))


def test_missing_url_and_missing_hashes_are_named(served, tmp_path):
    server, local = served
    with pytest.raises(torch_lmdb.NotFoundError, match="nope/manifest.json"):
        torch_lmdb.LMDBDataset(server.url + "/nope", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="cache_dir"):
        _C.ShardCache(server.url + "/ds", "")


def test_shared_file_system_directory_is_staged_when_cache_dir_is_given(tmp_path):
    src = write_shard_dir(tmp_path / "nfs", shards=3, per_shard=50)
    cache = str(tmp_path / "cache")
    ds = torch_lmdb.LMDBDataset(src, cache_dir=cache)
    check_equal(ds.get_batch(list(range(150))), list(range(150)))
    assert all(p.startswith(os.path.realpath(cache)) for p in _C.Reader(ds.paths).paths)
    with pytest.raises(ValueError, match="lie inside one another"):
        torch_lmdb.LMDBDataset(src, cache_dir=os.path.join(src, "inside"))


# ---- faults ---------------------------------------------------------------------

def test_faults_503_and_cut_bodies_are_retried_and_leave_nothing_behind(served, tmp_path):
    server, _ = served
    proxy = FaultProxy(server.port, p503=0.10, pcut=0.05, seed=5)
    try:
        cache = str(tmp_path / "cache")
        caches = []
        for attempt in range(4):  # several stagings: enough requests for faults of both kinds
            c = _C.ShardCache(proxy.url + "/ds", os.path.join(cache, str(attempt)), manifest_ttl=0)
            c.acquire_all()
            caches.append(c)
        ds = torch_lmdb.LMDBDataset(caches[-1].local_dir)
        check_equal(ds.get_batch(list(range(1800))), list(range(1800)))
        assert proxy.counts["503"] > 0 and proxy.counts["cut"] > 0, proxy.counts
        assert sum(c.stats()["retries"] for c in caches) >= proxy.counts["503"]
        assert leftovers(cache) == []
    finally:
        proxy.stop()


def test_a_large_shard_is_fetched_in_range_parts_even_through_faults(tmp_path):
    src = write_shard_dir(tmp_path / "www" / "big", shards=1, per_shard=6000)  # about 7 MB
    size = shard_sizes(src)[0]
    assert size >= 6 << 20
    server = Nginx(str(tmp_path / "www"), str(tmp_path / "nginx"))
    proxy = FaultProxy(server.port, p503=0.2, pcut=0.1, seed=3)
    try:
        c = _C.ShardCache(proxy.url + "/big", str(tmp_path / "cache"), transfers=3)
        ds = torch_lmdb.LMDBDataset(c.acquire(0))
        check_equal(ds.get_batch(list(range(0, 6000, 11))), list(range(0, 6000, 11)))
        parts = [(st, n) for st, n, _ in server.requests("shard-00000.lmdb/data.mdb")]
        assert len([1 for st, _ in parts if st == 206]) >= 3, parts  # Range parts, not one body
        assert c.stats()["bytes_fetched"] == size and c.stats()["shards_fetched"] == 1
        assert leftovers(str(tmp_path / "cache")) == []
    finally:
        proxy.stop()
        server.stop()


def test_a_stalled_transfer_times_out_and_is_retried(served, tmp_path):
    server, _ = served
    proxy = FaultProxy(server.port, pstall=0.3, stall=4, seed=2)
    try:
        c = _C.ShardCache(proxy.url + "/ds", str(tmp_path / "cache"), stall_seconds=1, manifest_ttl=0)
        t = time.monotonic()
        c.acquire_all()
        assert proxy.counts["stall"] > 0 and c.stats()["retries"] >= 1, (proxy.counts, c.stats())
        ds = torch_lmdb.LMDBDataset(c.local_dir)
        check_equal(ds.get_batch(list(range(0, 1800, 13))), list(range(0, 1800, 13)))
        assert leftovers(str(tmp_path / "cache")) == []
        assert time.monotonic() - t < 60
    finally:
        proxy.stop()


def test_a_shard_whose_hash_fails_is_refetched_then_named(tmp_path):
    src = write_shard_dir(tmp_path / "www" / "ds", shards=2, per_shard=20)
    with open(os.path.join(src, "manifest.json")) as f:
        m = json.load(f)
    m["shards"][1]["data_xxh3_64"] = "00000000deadbeef"
    with open(os.path.join(src, "manifest.json"), "w") as f:
        json.dump(m, f)
    server = Nginx(str(tmp_path / "www"), str(tmp_path / "nginx"))
    try:
        cache = str(tmp_path / "cache")
        c = _C.ShardCache(server.url + "/ds", cache, hash_retries=2)
        assert c.acquire(0).endswith("shard-00000.lmdb")
        with pytest.raises(torch_lmdb.CorruptedError) as e:
            c.acquire(1)
        assert "shard 1" in str(e.value) and server.url + "/ds/shard-00001.lmdb/data.mdb" in str(e.value)
        assert "00000000deadbeef" in str(e.value)
        assert len(server.requests("shard-00001.lmdb/data.mdb")) == 3  # the first try and 2 more
        assert c.stats()["hash_failures"] == 3
        assert leftovers(cache) == []
    finally:
        server.stop()


def test_a_killed_download_leaves_nothing_that_breaks_the_next_start(tmp_path):
    src = write_shard_dir(tmp_path / "www" / "ds", shards=2, per_shard=2000)
    server = Nginx(str(tmp_path / "www"), str(tmp_path / "nginx"), limit_rate="200k")
    cache = str(tmp_path / "cache")
    try:
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(torch_lmdb.__file__))!r})
            from torch_lmdb import _C
            _C.ShardCache({server.url + '/ds'!r}, {cache!r}).acquire(0)
        """)
        child = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 30
        while not leftovers(cache) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(cache), "the download did not start"
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert leftovers(cache)  # what the killed process left
    finally:
        server.stop()
    fast = Nginx(str(tmp_path / "www"), str(tmp_path / "nginx2"))
    try:
        c = _C.ShardCache(fast.url + "/ds", cache, manifest_ttl=0)
        c.acquire_all()
        assert leftovers(cache) == []
        ds = torch_lmdb.LMDBDataset(c.local_dir)
        check_equal(ds.get_batch([0, 1999, 2000, 3999]), [0, 1999, 2000, 3999])
    finally:
        fast.stop()


# ---- a dataset larger than its cache: shard windows ---------------------------

def _reference_shard_window_order(counts, window, seed):
    # The order as first published (torch's CPU generator): a resumed run depends on it.
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    g = torch.Generator()
    g.manual_seed(seed & (2**63 - 1))
    visit = torch.randperm(len(counts), generator=g).tolist()
    pieces = []
    for w in range(0, len(visit), window):
        idx = torch.cat([torch.arange(offsets[k], offsets[k + 1], dtype=torch.int64) for k in visit[w:w + window]])
        pieces.append(idx[torch.randperm(len(idx), generator=g)])
    return torch.cat(pieces), visit


@pytest.mark.parametrize("counts,window,seed", [([5, 7, 3, 9], 2, 0), ([10] * 9, 4, 2**64 - 5), ([1], 1, 12)])
def test_shard_window_order_is_stable_and_shared_with_the_cpp_loader(counts, window, seed):
    from torch_lmdb.remote import shard_window_order
    order, visit = shard_window_order(counts, window, seed)
    ref_order, ref_visit = _reference_shard_window_order(counts, window, seed)
    assert visit == ref_visit and torch.equal(order, ref_order)
    plain, _ = shard_window_order(counts, window, seed, shuffle=False)
    assert plain.tolist() == list(range(sum(counts)))


def test_a_cache_limit_too_small_for_a_window_is_refused_with_the_minimum(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    with pytest.raises(ValueError, match=f"at least {sum(sorted(sizes)[-2:])} bytes"):
        torch_lmdb.LMDBDataset(server.url + "/ds", cache_dir=str(tmp_path / "c"), cache_limit=max(sizes) + 1,
                               shard_window=1)
    # A batch that straddles two windows holds both: windows of 2 need the 4 largest shards.
    with pytest.raises(ValueError, match=f"at least {sum(sorted(sizes)[-4:])} bytes"):
        torch_lmdb.LMDBDataset(server.url + "/ds", cache_dir=str(tmp_path / "c"), cache_limit=sum(sorted(sizes)[-3:]),
                               shard_window=2)
    with pytest.raises(ValueError, match="smaller than the largest shard"):
        _C.ShardCache(server.url + "/ds", str(tmp_path / "c2"), cache_limit=max(sizes) - 1)


def test_shard_window_epoch_reads_every_sample_once_within_the_cache_limit(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    limit = sum(sorted(sizes)[-4:])  # two windows of 2 shards: the dataset has 6
    cache = str(tmp_path / "cache")
    ds = torch_lmdb.LMDBDataset(own_url(served, "ds-window"), cache_dir=cache, cache_limit=limit, shard_window=2)
    assert isinstance(ds, torch_lmdb.remote.ShardWindowDataset) and isinstance(ds, torch_lmdb.LMDBDataset)
    assert len(ds) == 1800
    before = len(fetched_under(server, "ds-window"))  # the open reads the schema from one shard
    peak = [0]
    done = threading.Event()

    def size(p):
        try:
            return os.path.getsize(p)
        except FileNotFoundError:  # evicted or renamed since the listing
            return 0

    def watch():
        # Walked under the cache's space lock (shared), under which staging downloads, renames and
        # evicts: a walk without it can count an evicted shard and the next download together.
        lock = os.open(os.path.join(cache, ".space.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not done.is_set():
                fcntl.flock(lock, fcntl.LOCK_SH)
                peak[0] = max(peak[0], sum(size(p) for p in
                                           glob.glob(os.path.join(cache, "**", "data.mdb"), recursive=True)
                                           + leftovers(cache)))
                fcntl.flock(lock, fcntl.LOCK_UN)
                time.sleep(0.005)
        finally:
            os.close(lock)

    watcher = threading.Thread(target=watch)
    watcher.start()
    seen = []
    try:
        for batch in ds.iter_batches(100, shuffle=True, seed=1):
            check_equal(batch, batch["index"].tolist())
            seen.extend(batch["index"].tolist())
    finally:
        done.set()
        watcher.join()
    assert sorted(seen) == list(range(1800))
    assert peak[0] <= limit, (peak[0], limit)
    # Samples mix within a window of two shards only: each batch spans at most 2 windows' shards.
    fetched = fetched_under(server, "ds-window")[before:]
    assert len(fetched) == len(set(fetched)) >= 5, fetched  # no shard fetched twice in the epoch (one may be cached)
    assert ds.io_stats()["evictions"] >= 2


def test_drop_in_dataloader_with_the_window_sampler(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    ds = torch_lmdb.LMDBDataset(server.url + "/ds", cache_dir=str(tmp_path / "c"),
                                cache_limit=sum(sorted(sizes)[-4:]), shard_window=2)
    sampler = ds.window_sampler(seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=30, sampler=sampler, num_workers=2, collate_fn=ds.collate)
    seen = []
    for batch in loader:
        check_equal(batch, batch["index"].tolist())
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(1800))
    # Consecutive windows: the epoch's first 600 samples come from 2 shards.
    assert len({i // 300 for i in seen[:600]}) == 2


def test_shard_window_resume_continues_exactly(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    ds = torch_lmdb.LMDBDataset(server.url + "/ds", cache_dir=str(tmp_path / "c"),
                                cache_limit=sum(sorted(sizes)[-4:]), shard_window=2)
    it = ds.iter_batches(64, shuffle=True, seed=9)
    first = [next(it)["index"].tolist() for _ in range(10)]
    state = it.state_dict()
    rest = [b["index"].tolist() for b in it]
    again = ds.iter_batches(64, shuffle=True, seed=0)
    again.load_state_dict(state)
    assert [b["index"].tolist() for b in again] == rest
    flat = [i for b in first + rest for i in b]
    assert sorted(flat) == list(range(1800))


def test_shard_window_make_loader_workers_fetch_each_shard_once(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    cache = str(tmp_path / "cache")
    ds = torch_lmdb.LMDBDataset(own_url(served, "ds-workers"), cache_dir=cache, cache_limit=sum(sorted(sizes)[-4:]),
                                shard_window=2)
    before = len(fetched_under(server, "ds-workers"))
    loader = torch_lmdb.make_loader(ds, batch_size=50, shuffle=True, seed=4, num_workers=2)
    seen = []
    for batch in loader:
        check_equal(batch, batch["index"].tolist())
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(1800))
    fetched = fetched_under(server, "ds-workers")[before:]
    assert len(fetched) == len(set(fetched)) >= 5, fetched  # each shard at most once in the epoch, by one worker
    assert leftovers(cache) == []


# ---- S3 (Debian 13: python3-moto's server; Debian 12 has no moto package) ------

def test_s3_dataset_through_moto_server(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="python3-moto (Debian 13) runs the S3 server")
    boto3 = pytest.importorskip("boto3")
    from _http import free_port

    src = write_shard_dir(tmp_path / "ds", shards=2, per_shard=40)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint)):
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="radio")
        for root, _, files in os.walk(src):
            for name in files:
                if name in ("manifest.json", "data.mdb"):
                    path = os.path.join(root, name)
                    s3.upload_file(path, "radio", "train/" + os.path.relpath(path, src))
        ds = torch_lmdb.LMDBDataset("s3://radio/train", cache_dir=str(tmp_path / "cache"))
        check_equal(ds.get_batch(list(range(80))), list(range(80)))
        with pytest.raises(torch_lmdb.NotFoundError, match="s3://radio/nope/manifest.json"):
            torch_lmdb.LMDBDataset("s3://radio/nope", cache_dir=str(tmp_path / "cache"))
    finally:
        server.stop()


RANK_JOB = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import torch_lmdb
url, cache, limit, rank, out, resume = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
# The ranks step together, as DDP's gradient all-reduce makes them.
dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rendezvous"), rank=rank, world_size=2)
ds = torch_lmdb.LMDBDataset(url, cache_dir=cache, cache_limit=limit, shard_window=2)
loader = torch_lmdb.make_loader(ds, batch_size=40, shuffle=True, seed=7, rank=rank, world_size=2, num_workers=2)
if resume != "-":
    with open(resume) as f:
        loader.load_state_dict(json.load(f))
for k, batch in enumerate(loader):
    with open(os.path.join(out, f"batch-{rank}-{k:04d}.json"), "w") as f:
        json.dump(batch["index"].tolist(), f)
    with open(os.path.join(out, f"state-{rank}-{k:04d}.json"), "w") as f:
        json.dump(loader.state_dict(), f)
    dist.barrier()
print("done", flush=True)
"""


def run_ranks(args_of, timeout=240):
    procs = [subprocess.Popen([sys.executable, "-c", RANK_JOB] + args_of(r)) for r in range(2)]
    return procs


def test_two_ranks_two_workers_share_the_node_cache_and_resume_after_sigkill(served, tmp_path):
    server, local = served
    sizes = shard_sizes(local)
    limit = sum(sorted(sizes)[-4:])
    root = os.path.dirname(os.path.dirname(torch_lmdb.__file__))
    url, cache = own_url(served, "ds-ranks"), str(tmp_path / "cache")
    # A whole epoch: 2 ranks x 2 workers, one cache: each shard fetched once on the node.
    out = tmp_path / "full"
    out.mkdir()
    procs = run_ranks(lambda r: [root, url, cache, str(limit), str(r), str(out), "-"])
    for p in procs:
        assert p.wait(240) == 0
    fetched = fetched_under(server, "ds-ranks")
    assert len(fetched) == len(set(fetched)) == 6, fetched
    seen = [i for f in sorted(glob.glob(str(out / "batch-*.json"))) for i in json.load(open(f))]
    assert sorted(seen) == list(range(1800))
    assert leftovers(cache) == []
    # The same epoch killed (SIGKILL, the whole job) after some batches, then resumed from a saved state.
    out = tmp_path / "killed"
    out.mkdir()
    procs = run_ranks(lambda r: [root, url, str(tmp_path / "cache2"), str(limit), str(r), str(out), "-"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and min(len(glob.glob(str(out / f"state-{r}-*.json"))) for r in (0, 1)) < 8:
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    k = min(len(glob.glob(str(out / f"state-{r}-*.json"))) for r in (0, 1))
    assert 8 <= k < 23, k  # killed mid-epoch (23 batches per rank)
    before_kill = [i for r in (0, 1) for j in range(k) for i in json.load(open(out / f"batch-{r}-{j:04d}.json"))]
    state = str(out / f"state-0-{k - 1:04d}.json")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    procs = run_ranks(lambda r: [root, url, str(tmp_path / "cache2"), str(limit), str(r), str(resumed), state])
    for p in procs:
        assert p.wait(240) == 0
    after = [i for f in sorted(glob.glob(str(resumed / "batch-*.json"))) for i in json.load(open(f))]
    assert sorted(before_kill + after) == list(range(1800))
    assert leftovers(str(tmp_path / "cache2")) == []


def test_cli_info_and_verify_take_a_url(served, tmp_path, capsys):
    server, _ = served
    url = server.url + "/ds"
    assert main(["info", url, "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    i = json.loads(capsys.readouterr().out)
    assert i["path"] == url and i["num_samples"] == 1800 and i["cached_at"].startswith(str(tmp_path / "c"))
    assert main(["verify", url, "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "size and xxh3 checked" in out and "every checksum verified" in out
    assert main(["verify", server.url + "/nope", "--cache-dir", str(tmp_path / "c")]) == 1
    assert "nope/manifest.json" in capsys.readouterr().out
