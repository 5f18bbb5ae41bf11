"""Cold reads (data not in the page cache) against the disk, in one run.

    python benchmarks/bench_cold.py [--quick] [--data DIR]

The disk is measured first on the database file itself with fio (O_DIRECT,
read-only): random 16 KiB reads at queue depth 32 (libaio) and at 2
synchronous threads (psync), and sequential 4 MiB reads. Then every system
reads the medium profile (16 KiB samples) with the file evicted from the page
cache before its run (posix_fadvise DONTNEED), no warm-up, at most one epoch
(no sample is read twice). Each row gives samples/s, MB/s, its ratio to the
disk (random QD32 for shuffled orders, sequential for block shuffle) and the
growth of the page cache over the run. benchmarks/run.py runs this as its cold
section.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MB = 1e6


def fio(path, rw, bs, iodepth, engine, seconds, jobs=1):
    """MB/s of an fio read job on `path` (O_DIRECT, read-only), or None without fio."""
    if shutil.which("fio") is None:
        return None
    cmd = ["fio", "--name=probe", f"--filename={path}", "--readonly", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--ioengine={engine}", "--direct=1", f"--runtime={seconds}", "--time_based",
           f"--numjobs={jobs}", "--group_reporting", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip()}")
    job = json.loads(out.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / MB


def page_cache_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def systems(paths, n):
    """(name, order, store path, factory of an iterator of (samples, bytes))."""
    import run
    import torch
    import torch_lmdb

    db = paths["torch_lmdb"]

    def get_batch(**options):
        def gen():
            ds = torch_lmdb.LMDBDataset(db, **options)
            for idx in run.epochs("shuffled", n, 256):
                yield len(idx), run.batch_bytes(ds.get_batch(idx.tolist()))[0]
        return gen

    def iter_batches(threads, block=None, **options):
        def gen():
            ds = torch_lmdb.LMDBDataset(db, **options)
            for batch in ds.iter_batches(256, shuffle=True, seed=0, threads=threads, batches_ahead=4, block_size=block):
                nbytes, k = run.batch_bytes(batch)
                yield k, nbytes
        return gen

    def loader(workers):
        def gen():
            ds = torch_lmdb.LMDBDataset(db)
            # Workers that end with the epoch: none may keep the file mapped (and cached) for the next row.
            return run.loader_batches(torch_lmdb.make_loader(ds, 256, shuffle=True, num_workers=workers))
        return gen

    def pickle_dl():
        return run.loader_batches(torch.utils.data.DataLoader(run.PickleLMDBDataset(paths["pickle_lmdb"]),
                                                              batch_size=256, shuffle=True))

    return [
        ("torch_lmdb get_batch in process, lookahead never", "shuffled", db, get_batch(page_requests="never")),
        ("torch_lmdb get_batch in process", "shuffled", db, get_batch()),
        ("torch_lmdb iter_batches, 2 C++ threads, lookahead never", "shuffled", db,
         iter_batches(2, page_requests="never")),
        ("torch_lmdb iter_batches, 1 C++ thread", "shuffled", db, iter_batches(1)),
        ("torch_lmdb iter_batches, 2 C++ threads", "shuffled", db, iter_batches(2)),
        ("torch_lmdb iter_batches, 2 C++ threads, keep_cache=False", "shuffled", db,
         iter_batches(2, keep_cache=False)),
        ("torch_lmdb iter_batches, block shuffle (1024-sample blocks), readahead, 2 threads", "block", db,
         iter_batches(2, block=1024, os_readahead=True)),
        ("torch_lmdb iter_batches, block shuffle (1024-sample blocks), 2 threads", "block", db,
         iter_batches(2, block=1024)),
        ("torch_lmdb iter_batches, block shuffle (1024-sample blocks), 2 threads, keep_cache=False", "block", db,
         iter_batches(2, block=1024, keep_cache=False)),
        ("torch_lmdb make_loader, num_workers=2", "shuffled", db, loader(2)),
        ("py-lmdb + pickle DataLoader, num_workers=0", "shuffled", paths["pickle_lmdb"], pickle_dl),
    ]


def run_cold(paths, n, sample_bytes, budget, log):
    """The cold rows (medium profile), disk rows first."""
    import run

    db_file = os.path.join(paths["torch_lmdb"], "data.mdb")
    seconds = max(2, int(budget * 2))
    rows = []
    disk = {}
    for key, label, args in (
            ("random", "disk: random 16 KiB reads, O_DIRECT, queue depth 32 (fio libaio)",
             ("randread", "16k", 32, "libaio")),
            ("random_sync2", "disk: random 16 KiB reads, 2 synchronous threads (fio psync)",
             ("randread", "16k", 1, "psync")),
            ("sequential", "disk: sequential 4 MiB reads, O_DIRECT (fio libaio, queue depth 4)",
             ("read", "4m", 4, "libaio"))):
        mbps = fio(db_file, *args, seconds, jobs=2 if key == "random_sync2" else 1)
        if mbps is None:
            log("  fio is missing (apt-get install fio): cold rows have no disk ratio")
            break
        disk[key] = mbps
        rows.append(dict(profile="medium", order="disk", cache="cold", system=label, mb_per_s=mbps,
                         samples_per_s=mbps * MB / sample_bytes))
        log(f"  disk       {label:75} {mbps:8.0f} MB/s")
    for name, order, store, factory in systems(paths, n):
        if not run.drop_cache([os.path.join(store, "data.mdb")]):
            log("  cold runs skipped: posix_fadvise is not available")
            break
        cached0 = page_cache_mib()
        r = run.measure(run.first_epoch(factory(), n), budget, warmup=False)
        growth = page_cache_mib() - cached0
        ref = disk.get("sequential" if order == "block" else "random")
        row = dict(profile="medium", order="shuffled" if order == "shuffled" else "block-shuffled", cache="cold",
                   system=name, page_cache_growth_mib=growth,
                   vs_disk=r["mb_per_s"] / ref if ref else None, **r)
        rows.append(row)
        ratio = f"{row['vs_disk']:.2f}x disk" if ref else ""
        log(f"  cold {order:8} {name:75} {r['samples_per_s']:>9,.0f} samples/s {r['mb_per_s']:6.0f} MB/s "
            f"{ratio:>10}  page cache +{growth:,.0f} MiB")
    binary = os.path.join(os.path.dirname(HERE), "build", "cmake", "torch_lmdb_bench_read")
    # The native loader: cold records read through io_uring (direct_reads, the default) or faulted
    # into the map; with keep_cache=False, through O_DIRECT.
    for name, flags in (("C++ torch_lmdb::make_loader, 2 threads", []),
                        ("C++ torch_lmdb::make_loader, 2 threads, direct_reads=false", ["--direct-reads", "0"]),
                        ("C++ torch_lmdb::make_loader, 2 threads, keep_cache=false", ["--keep-cache", "0"]),
                        ("C++ torch_lmdb::make_loader, 2 threads, keep_cache=false, direct_reads=false",
                         ["--keep-cache", "0", "--direct-reads", "0"])):
        if not (os.path.exists(binary) and run.drop_cache([db_file])):
            break
        cached0 = page_cache_mib()
        out = subprocess.run([binary, "--path", paths["torch_lmdb"], "--mode", "loader", "--threads", "2",
                              "--batch", "256", "--order", "shuffled", "--seconds", str(budget), "--cold", "1"] + flags,
                             capture_output=True, text=True)
        if out.returncode != 0:
            log(f"  {name}: {out.stderr.strip()}")
            continue
        r = json.loads(out.stdout)
        mbps = r["bytes_per_s"] / MB
        ref = disk.get("random")
        growth = page_cache_mib() - cached0
        rows.append(dict(profile="medium", order="shuffled", cache="cold", system=name,
                         samples_per_s=r["samples_per_s"], mb_per_s=mbps, cpu_us_per_sample=r["cpu_us_per_sample"],
                         page_cache_growth_mib=growth, vs_disk=mbps / ref if ref else None))
        log(f"  cold shuffled {name:75} {r['samples_per_s']:>9,.0f} samples/s {mbps:6.0f} MB/s "
            f"{(mbps / ref if ref else float('nan')):.2f}x disk  {r['cpu_us_per_sample']:.1f} CPU us/sample  "
            f"page cache +{growth:,.0f} MiB")
    pk = next((r for r in rows if r["system"].startswith("py-lmdb")), None)
    for r in rows:
        r["vs_pickle_cold"] = r["samples_per_s"] / pk["samples_per_s"] if pk and r["order"] != "disk" else None
    return rows


def main():
    import numpy as np
    import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="/tmp/torch_lmdb_bench_cold")
    args = parser.parse_args()
    os.makedirs(args.data, exist_ok=True)
    n = run.SIZES["medium"][0 if args.quick else 1]
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    rng = np.random.default_rng(0)
    samples = [run.make_sample("medium", i, rng) for i in range(n)]
    paths = {k: os.path.join(args.data, f"medium.{k}") for k in ("torch_lmdb", "pickle_lmdb")}
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    run._write_torch_lmdb(paths["torch_lmdb"], samples)
    run._write_pickle(paths["pickle_lmdb"], samples, max(1 << 30, 4 * n * 16400))
    sample_bytes = run.payload_bytes(samples[0])
    del samples
    rows = run_cold(paths, n, sample_bytes, 1.0 if args.quick else 2.0, log)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
