"""What checksum verification costs: shuffled warm get_batch with verify=True
against verify=False on the same file, rounds alternated in one run.

    /usr/bin/python3 benchmarks/bench_verify.py            # medium profile (16 KiB samples)
    /usr/bin/python3 benchmarks/bench_verify.py --quick

Prints one table (samples/s per round kind: median, min, max) and the ratio
verify=True / verify=False of the medians; --json writes them.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch_lmdb  # noqa: E402


def build(path: str, n: int, width: int) -> None:
    if os.path.exists(os.path.join(path, "data.mdb")) and len(torch_lmdb.LMDBDataset(path)) == n:
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((256, width), dtype=np.float32)
    with torch_lmdb.LMDBWriter(path) as w:
        w.write_many({"x": block[i % 256], "y": i} for i in range(n))


def rate(ds, order, batch: int, seconds: float) -> float:
    """Samples/s of get_batch over `order`, batch by batch, for about `seconds`."""
    done, k, start = 0, 0, time.perf_counter()
    while True:
        idx = order[k:k + batch]
        if len(idx) < batch:
            k, idx = 0, order[:batch]
        ds.get_batch(idx)
        k += batch
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="/tmp/torch_lmdb_bench/verify.lmdb")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = 8000 if args.quick else 20000
    rounds = args.rounds or (4 if args.quick else 8)
    seconds = 1.0 if args.quick else 2.0
    build(args.data, n, 4096)  # 16 KiB of float32 per sample
    plain = torch_lmdb.LMDBDataset(args.data, verify=False)
    checked = torch_lmdb.LMDBDataset(args.data, verify=True)
    order = np.random.default_rng(1).permutation(n).tolist()
    for ds in (plain, checked):  # warm: every page cached and mapped, the value index filled
        rate(ds, order, 256, 0.5)
    results = {"verify=False": [], "verify=True": []}
    for _ in range(rounds):
        results["verify=False"].append(rate(plain, order, 256, seconds))
        results["verify=True"].append(rate(checked, order, 256, seconds))
    print(f"get_batch, shuffled, batch 256, {n} samples of 16 KiB, warm, {rounds} alternated rounds of {seconds} s")
    print(f"{'reader':<14} {'median/s':>10} {'min/s':>10} {'max/s':>10}")
    for name, values in results.items():
        print(f"{name:<14} {statistics.median(values):>10.0f} {min(values):>10.0f} {max(values):>10.0f}")
    ratio = statistics.median(results["verify=True"]) / statistics.median(results["verify=False"])
    print(f"verify=True / verify=False: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": results, "ratio": ratio, "samples": n}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
