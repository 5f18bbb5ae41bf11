"""Conversion throughput: `torch-lmdb convert` of a Zarr store vs reading the
same store with zarr alone, in the same run.

    /usr/bin/python3 benchmarks/convert_zarr.py --gib 1 --dir /tmp/convert_bench

The store holds 16 KiB float32 samples (4096 values) in chunks of 64 samples,
compressed with zarr's default (Blosc/LZ4). Both passes read it chunk-aligned.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import zarr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="store size (uncompressed GiB)")
    parser.add_argument("--dir", default="/tmp/torch_lmdb_convert_bench")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    n = int(args.gib * (1 << 30) // 16384)
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, "medium.zarr")
    if not os.path.exists(src):
        root = zarr.open_group(src, mode="w")
        x = root.empty("x", shape=(n, 4096), dtype=np.float32, chunks=(64, 4096))
        y = root.empty("y", shape=(n,), dtype=np.int64, chunks=(4096,))
        rng = np.random.default_rng(0)
        block = 4096
        for s in range(0, n, block):
            e = min(n, s + block)
            # noisy but compressible data, like simulator output
            x[s:e] = rng.normal(size=(e - s, 4096)).astype(np.float16).astype(np.float32)
            y[s:e] = np.arange(s, e)
    print(f"store: {src}, {n} samples x 16 KiB = {n * 16384 / 1e9:.2f} GB, {du(src) / 1e9:.2f} GB on disk")

    root = zarr.open_group(src, mode="r")
    t0 = time.perf_counter()
    total = 0
    for s in range(0, n, 4096):
        total += root["x"][s:s + 4096].nbytes + root["y"][s:s + 4096].nbytes
    zarr_s = time.perf_counter() - t0
    print(f"zarr alone, chunk-aligned read: {zarr_s:.1f} s, {n / zarr_s:,.0f} samples/s, {total / zarr_s / 1e6:,.0f} MB/s")

    out = os.path.join(args.dir, "medium.lmdb")
    for p in [out] + [os.path.join(args.dir, f"medium-{k:05d}-of-{args.shards:05d}.lmdb") for k in range(args.shards)]:
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch_lmdb", "convert", "--zarr-path", src, "--output", out,
                    "--shards", str(args.shards), "--no-progress"], check=True, env=dict(os.environ, PYTHONPATH=ROOT))
    conv_s = time.perf_counter() - t0
    print(f"torch-lmdb convert (--shards {args.shards}, incl. interpreter start): {conv_s:.1f} s, "
          f"{n / conv_s:,.0f} samples/s, {total / conv_s / 1e6:,.0f} MB/s; "
          f"{conv_s / zarr_s:.2f}x the zarr-alone read time")


if __name__ == "__main__":
    main()
