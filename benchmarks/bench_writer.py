"""The compressing writer against the uncompressed one: `LMDBWriter.write_many`
of the medium profile (16 KiB float32 samples, standard normal) with no codec,
LZ4 and Zstd, each codec with compression on the calling thread
(`compress_threads=1`), on one thread per core, and as the default chooses
(`compress_threads=None`), rounds alternated in one run.

    /usr/bin/python3 benchmarks/bench_writer.py            # 60,000 samples, 5 rounds
    /usr/bin/python3 benchmarks/bench_writer.py --quick    # 20,000 samples, 3 rounds
    /usr/bin/python3 benchmarks/bench_writer.py --dir /dev/shm/wb   # tmpfs: the CPU's side alone

Prints one table: raw MB/s (the samples' bytes over the time from opening the
writer to close(), fsync included) as median, min, max of the rounds, the
database's size, and the ratio of each median to the uncompressed writer's.
--json writes them.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch_lmdb  # noqa: E402

CORES = max(2, os.cpu_count() or 1)
SYSTEMS = [  # (name, compression, compress_threads)
    ("no codec", None, None),
    ("lz4, compress_threads=1", "lz4", 1),
    (f"lz4, compress_threads={CORES}", "lz4", CORES),
    ("lz4, compress_threads=None (default)", "lz4", None),
    ("zstd, compress_threads=1", "zstd", 1),
    ("zstd, compress_threads=None (default)", "zstd", None),
]
BAR = ("lz4, compress_threads=None (default)", 0.8)  # LZ4 writes >= 0.8x the uncompressed writer's MB/s


def write(path: str, samples, compression, threads) -> float:
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    with torch_lmdb.LMDBWriter(path, compression=compression, compress_threads=threads) as w:
        w.write_many(samples)
    return time.perf_counter() - t0


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=os.environ.get("TORCH_LMDB_BENCH_DIR", "/var/tmp/torch_lmdb_bench_writer"))
    ap.add_argument("--json")
    args = ap.parse_args()
    n, rounds = (20_000, 3) if args.quick else (60_000, 5)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal(4096).astype(np.float32), "y": np.int64(i)} for i in range(n)]
    raw = n * (4096 * 4 + 8)
    os.makedirs(args.dir, exist_ok=True)
    times = {name: [] for name, _, _ in SYSTEMS}
    sizes = {}
    for r in range(rounds):
        order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
        for name, codec, threads in order:
            path = os.path.join(args.dir, "db")
            times[name].append(write(path, samples, codec, threads))
            sizes[name] = du(path)
            shutil.rmtree(path, ignore_errors=True)
    rates = {name: [raw / t / 1e6 for t in ts] for name, ts in times.items()}
    med = {name: statistics.median(v) for name, v in rates.items()}
    base = med["no codec"]
    print(f"writer, medium profile: {n:,} samples ({raw / 1e6:,.0f} MB raw), {rounds} rounds alternated, "
          f"in {args.dir}; {os.cpu_count()} cores")
    print("| writer | raw MB/s (median) | min | max | database MiB | / no codec |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, _, _ in SYSTEMS:
        v = rates[name]
        row = {"system": name, "median_mb_s": med[name], "min_mb_s": min(v), "max_mb_s": max(v),
               "db_mib": sizes[name] / 2**20, "ratio": med[name] / base, "rounds_mb_s": v}
        rows.append(row)
        print(f"| {name} | {med[name]:,.0f} | {min(v):,.0f} | {max(v):,.0f} | {row['db_mib']:,.1f} | "
              f"{row['ratio']:.2f}x |")
    name, bar = BAR
    print(f"bar: {name} >= {bar}x no codec: {med[name] / base:.2f}x ({'met' if med[name] / base >= bar else 'not met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": n, "rounds": rounds, "dir": args.dir, "cores": os.cpu_count(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
