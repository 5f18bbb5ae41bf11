"""Remote datasets staged to a local cache: the bars of README "Remote and
shared storage", every ratio against a baseline measured in this run.

    /usr/bin/python3 benchmarks/bench_remote.py [--quick] [--json out.json]

A shard directory (full: 1.1 GB in 48 shards; quick: 170 MB in 16) of 16 KiB
samples is served by nginx (Debian's nginx-light, started here on 127.0.0.1
with `limit_rate` per connection, so the link is the bottleneck).

Rows:
- link: a plain parallel download of every shard over 4 keep-alive
  connections (Python's http.client, nothing of torch_lmdb), the number of
  requests the staging keeps in flight; its bytes/s is the link's rate.
- cold window epoch: LMDBDataset(url, cache_dir, cache_limit=300 MB (quick
  80 MB)).iter_batches(256, shuffle=True): bytes of the epoch / its time vs
  the link's rate (bar >= 0.8x); the cache's bytes on disk sampled every
  5 ms (bar: never above cache_limit); nginx's access log (bar: each shard
  served once: the bytes served per shard, Range parts added up, equal its size).
- C++ cold window epoch: the same epoch through the native loader
  (torch_lmdb::make_loader, 2 reader threads; build/cmake/torch_lmdb_bench_read
  --mode loader --cold 1 with --cache-dir and --cache-limit), same bars.
- faults: the same epoch through a proxy answering 10 % of requests with
  503 and cutting 5 % of bodies short: completes, every sample equal to the
  source, no temporary file left.
- warm epoch: a second epoch from a cache holding the whole dataset vs the
  local shard directory (get_batch, shuffled, batch 256, warm page cache),
  interleaved, best of 3 (bar >= 0.95x).
"""
import argparse
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import torch_lmdb  # noqa: E402
from torch_lmdb import _C, _manifest  # noqa: E402
from _http import FaultProxy, Nginx  # noqa: E402

BATCH = 256
SAMPLE = 16384


def write_dataset(out, shards, per_shard):
    block = np.random.default_rng(0).standard_normal(4096 * 64).astype(np.float32)
    records = []
    for k in range(shards):
        samples = ({"x": block[(i % 63) * 4096:(i % 63) * 4096 + 4096], "i": np.int64(i)}
                   for i in range(k * per_shard, (k + 1) * per_shard))
        records.append(_manifest.write_shard(out, k, samples))
    _manifest.write_manifest(out, records)


def drop_page_cache(path):
    for f in glob.glob(os.path.join(path, "**", "*.mdb"), recursive=True):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cache_bytes(cache):
    """The cache's bytes at one moment: walked under its space lock (shared), under which every
    download, rename and eviction happens, so the walk never adds an evicted shard to the next download."""
    fd = os.open(os.path.join(cache, ".space.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return sum(os.path.getsize(p) for p in glob.glob(os.path.join(cache, "**", "data.mdb"), recursive=True)
                   + glob.glob(os.path.join(cache, "**", ".tmp-*"), recursive=True))
    finally:
        os.close(fd)


class CachePeak:
    """The largest size of the cache directory on disk, sampled every 5 ms while in a `with`."""

    def __init__(self, cache):
        self.cache, self.peak, self._done = cache, 0, threading.Event()

    def _watch(self):
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, cache_bytes(self.cache))
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def window_epoch(url, cache, limit, check=False):
    """(seconds, peak cache bytes, samples, mismatches) of one cold shard-window epoch."""
    ds = torch_lmdb.LMDBDataset(url, cache_dir=cache, cache_limit=limit)
    n, bad = 0, 0
    block = np.random.default_rng(0).standard_normal(4096 * 64).astype(np.float32)
    with CachePeak(cache) as watch:
        t = time.perf_counter()
        for batch in ds.iter_batches(BATCH, shuffle=True, seed=1):
            n += len(batch["i"])
            if check:
                for j, i in enumerate(batch["i"].tolist()):
                    if not np.array_equal(batch["x"][j].numpy(), block[(i % 63) * 4096:(i % 63) * 4096 + 4096]):
                        bad += 1
        seconds = time.perf_counter() - t
    return seconds, watch.peak, n, bad, ds


def cpp_window_epoch(binary, url, cache, limit):
    """(peak cache bytes, the binary's JSON) of one cold shard-window epoch of the native loader."""
    import subprocess

    with CachePeak(cache) as watch:
        proc = subprocess.run([binary, "--path", url, "--mode", "loader", "--threads", "2", "--batch", str(BATCH),
                               "--order", "shuffled", "--cold", "1", "--seconds", "1e9", "--cache-dir", cache,
                               "--cache-limit", str(limit)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary}: {proc.stderr.strip()}")
    return watch.peak, json.loads(proc.stdout)


CONNECTIONS = 4  # the staging's `transfers`: requests in flight at most


def plain_download(port, paths):
    """Bytes/s of downloading `paths` over CONNECTIONS keep-alive connections (http.client)."""
    import http.client
    import queue

    todo = queue.Queue()
    for p in paths:
        todo.put(p)
    got = [0] * CONNECTIONS

    def worker(j):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                break
            conn.request("GET", p)
            r = conn.getresponse()
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                got[j] += len(chunk)
        conn.close()

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(CONNECTIONS)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(got) / (time.perf_counter() - t)


def fetched_bytes(server, before):
    """Bytes served per shard since request `before` (Range parts added up)."""
    out = {}
    for status, size, uri in server.requests("/data.mdb")[before:]:
        out[uri] = out.get(uri, 0) + size
    return out


def shard_fetches(server, before, sizes):
    """(bytes served, each shard served once or not at all, the shards served) since request `before`."""
    served = fetched_bytes(server, before)
    once = all(served.get(u, 0) in (0, size) for u, size in sizes.items())
    return sum(served.values()), once, [u for u in sizes if served.get(u)]


def read_rate(ds, n, repeats=3):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=g).tolist()
    for k in range(0, n, BATCH):  # warm
        ds.get_batch(order[k:k + BATCH])
    t = time.perf_counter()
    for k in range(0, n, BATCH):
        ds.get_batch(order[k:k + BATCH])
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--rate", default="25m", help="nginx limit_rate per connection (default 25m)")
    args = ap.parse_args()
    shards, per_shard = (16, 640) if args.quick else (48, 1365)
    limit = (80 if args.quick else 300) * 10**6
    work = tempfile.mkdtemp(prefix="bench_remote-")
    rows = {}
    try:
        www = os.path.join(work, "www")
        src = os.path.join(www, "ds")
        t = time.perf_counter()
        write_dataset(src, shards, per_shard)
        manifest = json.load(open(os.path.join(src, "manifest.json")))
        total = sum(s["size"] for s in manifest["shards"])
        print(f"dataset: {shards} shards, {shards * per_shard} samples, {total / 1e6:.0f} MB "
              f"(written in {time.perf_counter() - t:.1f} s); nginx limit_rate {args.rate} per connection")
        server = Nginx(www, os.path.join(work, "nginx"), limit_rate=args.rate)
        url = server.url + "/ds"
        try:
            link = plain_download(server.port, [f"/ds/{s['path']}/data.mdb" for s in manifest["shards"]])
            print(f"link (plain parallel download of every shard, {CONNECTIONS} connections): {link / 1e6:.1f} MB/s")
            before = len(server.requests("/data.mdb"))
            seconds, peak, n, _, ds = window_epoch(url, os.path.join(work, "cache"), limit)
            sizes = {f"/ds/{s['path']}/data.mdb": s["size"] for s in manifest["shards"]}
            served, once, fetched = shard_fetches(server, before, sizes)
            rate = total / seconds
            print(f"cold shard-window epoch (cache_limit {limit / 1e6:.0f} MB, shard_window {ds.shard_window}): "
                  f"{n} samples in {seconds:.2f} s, {rate / 1e6:.1f} MB/s = {rate / link:.2f}x the link (bar 0.8x); "
                  f"peak cache {peak / 1e6:.1f} MB (limit {limit / 1e6:.0f}); each shard fetched once: {once} "
                  f"({len(fetched)} of {shards} shards fetched in the epoch, {served / 1e6:.1f} MB served)")
            rows["link_MBps"] = link / 1e6
            rows["window_epoch"] = dict(seconds=seconds, MBps=rate / 1e6, ratio=rate / link, peak=peak, limit=limit,
                                        shards_fetched=len(fetched), each_once=once, shards=shards,
                                        served_bytes=served, shard_window=ds.shard_window)
            del ds
            binary = os.path.join(ROOT, "build", "cmake", "torch_lmdb_bench_read")
            if os.path.exists(binary):
                before = len(server.requests("/data.mdb"))
                peak, r = cpp_window_epoch(binary, url, os.path.join(work, "cpp-cache"), limit)
                served, once, fetched = shard_fetches(server, before, sizes)
                n = shards * per_shard  # one epoch (--cold 1)
                seconds = n / r["samples_per_s"]
                rate = total / seconds
                print(f"C++ cold shard-window epoch (make_loader, 2 threads): {n} samples in {seconds:.2f} s, "
                      f"{rate / 1e6:.1f} MB/s = {rate / link:.2f}x the link (bar 0.8x); peak cache {peak / 1e6:.1f} MB "
                      f"(limit {limit / 1e6:.0f}); each shard fetched once: {once} ({len(fetched)} of {shards} "
                      f"shards fetched, {served / 1e6:.1f} MB served); "
                      f"{r['cpu_us_per_sample']:.1f} CPU us a sample")
                rows["cpp_window_epoch"] = dict(seconds=seconds, MBps=rate / 1e6, ratio=rate / link, peak=peak,
                                                limit=limit, shards_fetched=len(fetched), each_once=once)
            else:
                print(f"C++ cold shard-window epoch: skipped ({binary} is missing: make build)")
            # faults
            proxy = FaultProxy(server.port, p503=0.10, pcut=0.05, seed=1)
            try:
                fcache = os.path.join(work, "faults")
                seconds, peak, n, bad, ds = window_epoch(proxy.url + "/ds", fcache, limit, check=True)
                left = glob.glob(os.path.join(fcache, "**", ".tmp-*"), recursive=True)
                st = ds.io_stats()
                print(f"faults (10 % 503, 5 % cut bodies; {proxy.counts['503']} 503s and {proxy.counts['cut']} cuts "
                      f"of {proxy.counts['requests']} requests): {n} samples, {bad} differ from the source, "
                      f"{len(left)} temporaries left, {st['retries']} retries, {seconds:.2f} s")
                rows["faults"] = dict(samples=n, mismatches=bad, temporaries=len(left), counts=proxy.counts,
                                      retries=st["retries"], seconds=seconds)
                del ds
            finally:
                proxy.stop()
            # warm: whole cache vs the local directory
            staged = torch_lmdb.LMDBDataset(url, cache_dir=os.path.join(work, "whole"))
            local = torch_lmdb.LMDBDataset(src)
            n = len(local)
            best_s, best_l = 0.0, 0.0
            for _ in range(3):
                best_l = max(best_l, read_rate(local, n))
                best_s = max(best_s, read_rate(staged, n))
            print(f"warm epoch from a cache holding the dataset: {best_s:,.0f} samples/s vs the local directory "
                  f"{best_l:,.0f} = {best_s / best_l:.2f}x (bar 0.95x)")
            rows["warm"] = dict(staged=best_s, local=best_l, ratio=best_s / best_l)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
