"""Conversion of one Zarr store with a 2-worker Dask LocalCluster (2 shards)
vs the single-process conversion of the same store, in the same run.

    /usr/bin/python3 benchmarks/bench_dask.py [--quick] [--dir /tmp/torch_lmdb_bench_dask]

The store holds float32 samples of 1024 values (4 KiB) plus an int64 label, in
chunks of 256 samples (zarr's default Blosc/LZ4). Rows:
- single process: torch_lmdb.convert.convert(shards=1) in this process (the baseline);
- dask, cluster up: convert_to_shards(shards=2) on a LocalCluster of 2 worker
  processes (1 thread each) started, and torch_lmdb imported in them, before the clock;
- dask, incl. cluster start: the same with the LocalCluster start and stop timed.
- 2 processes, pure CPU loop: the parallel speed-up the machine offers right
  now (2.0 on 2 idle cores), the ceiling of the Dask ratio.
Each figure is the best of `repeats` runs. On a 2-core machine the two workers
share the cores with the driver and with anything else running: the ratio is
bounded by 2 and by the cores actually free (the ceiling row and the load
average say how many were).
"""
import argparse
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _make_store(path: str, n: int) -> None:
    import zarr

    if os.path.exists(os.path.join(path, ".done")):
        return
    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(path, mode="w")
    x = root.create_dataset("x", shape=(n, 1024), dtype=np.float32, chunks=(256, 1024))
    y = root.create_dataset("y", shape=(n,), dtype=np.int64, chunks=(4096,))
    rng = np.random.default_rng(0)
    for s in range(0, n, 4096):
        e = min(n, s + 4096)
        x[s:e] = rng.normal(size=(e - s, 1024)).astype(np.float16).astype(np.float32)
        y[s:e] = np.arange(s, e)
    open(os.path.join(path, ".done"), "w").close()


def _warm_up() -> None:
    import torch_lmdb  # noqa: F401
    import zarr  # noqa: F401


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _cpu_headroom(n: int = 5_000_000) -> float:
    """How much faster 2 processes run 2 equal pure-Python CPU loops than one
    process runs them in turn, now: the ceiling this machine offers any
    2-worker run (2.0 on 2 idle cores)."""
    import multiprocessing

    t0 = time.perf_counter()
    _spin(n)
    _spin(n)
    one = time.perf_counter() - t0
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_spin, args=(n,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return one / (time.perf_counter() - t0)


def _quiet(*args, **kwargs):
    pass


def run(quick: bool, log=print, directory: str = "/tmp/torch_lmdb_bench_dask") -> list:
    import distributed

    from torch_lmdb import convert
    from torch_lmdb import dask as tl_dask

    n = 40_000 if quick else 120_000
    repeats = 1 if quick else 2
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(directory, f"store-{n}.zarr")
    _make_store(src, n)
    out1 = os.path.join(directory, "single.lmdb")
    out2 = os.path.join(directory, "dask")

    def single() -> float:
        shutil.rmtree(out1, ignore_errors=True)
        t0 = time.perf_counter()
        convert.convert("zarr", src, out1, shards=1, log=_quiet)
        return time.perf_counter() - t0

    def dask_run(client) -> float:
        t0 = time.perf_counter()
        tl_dask.convert_to_shards("zarr", src, out2, shards=2, client=client, overwrite=True, log=_quiet)
        return time.perf_counter() - t0

    def dask_with_start() -> float:
        t0 = time.perf_counter()
        cluster = tl_dask.local_cluster(n_workers=2)
        client = distributed.Client(cluster)
        try:
            tl_dask.convert_to_shards("zarr", src, out2, shards=2, client=client, overwrite=True, log=_quiet)
        finally:
            client.close()
            cluster.close()
        return time.perf_counter() - t0

    base = min(single() for _ in range(repeats))
    log(f"single process: {base:.2f} s ({n / base:,.0f} samples/s)")
    cluster = tl_dask.local_cluster(n_workers=2)
    client = distributed.Client(cluster)
    client.run(_warm_up)  # the workers import torch_lmdb (and torch) before the clock
    try:
        up = min(dask_run(client) for _ in range(repeats))
    finally:
        client.close()
        cluster.close()
    log(f"dask, 2 workers, cluster up: {up:.2f} s ({n / up:,.0f} samples/s)")
    started = min(dask_with_start() for _ in range(repeats))
    log(f"dask, 2 workers, incl. cluster start: {started:.2f} s ({n / started:,.0f} samples/s)")
    headroom = _cpu_headroom()
    log(f"2 processes vs 1 on a pure CPU loop, now: {headroom:.2f}x")
    import torch_lmdb

    assert len(torch_lmdb.LMDBDataset(out2)) == n  # the shard directory is the whole store
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    common = {"profile": "convert 4 KiB samples", "samples": n, "cores": cores, "load_1min": round(load, 2)}
    return [
        dict(common, system="single process (convert shards=1)", seconds=round(base, 3),
             samples_per_s=round(n / base), ratio=1.0, vs="single process (convert shards=1)"),
        dict(common, system="dask LocalCluster 2 workers, cluster up", seconds=round(up, 3),
             samples_per_s=round(n / up), ratio=round(base / up, 3), vs="single process (convert shards=1)",
             bar=1.6),
        dict(common, profile="machine ceiling", system="2 processes, pure-Python CPU loop", seconds=None,
             samples_per_s=None, ratio=round(headroom, 3), vs="the same loops in 1 process"),
        dict(common, system="dask LocalCluster 2 workers, incl. cluster start", seconds=round(started, 3),
             samples_per_s=round(n / started), ratio=round(base / started, 3),
             vs="single process (convert shards=1)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40k samples, one repeat (default 120k, best of 2)")
    parser.add_argument("--dir", default="/tmp/torch_lmdb_bench_dask")
    args = parser.parse_args()
    rows = run(args.quick, log=lambda *a, **k: print(*a, file=sys.stderr), directory=args.dir)
    print(f"{'system':52} {'seconds':>8} {'samples/s':>10} {'ratio':>6}  vs")
    for r in rows:
        seconds = f"{r['seconds']:8.2f}" if r["seconds"] is not None else f"{'':8}"
        rate = f"{r['samples_per_s']:10,}" if r["samples_per_s"] is not None else f"{'':10}"
        print(f"{r['system']:52} {seconds} {rate} {r['ratio']:6.2f}  {r['vs']}")
    print(f"({rows[0]['cores']} cores, 1-min load average {rows[0]['load_1min']} at the end; bar: ratio >= 1.6 "
          f"with the cluster up)")


if __name__ == "__main__":
    main()
