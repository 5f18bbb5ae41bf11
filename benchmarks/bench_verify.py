"""What checksum verification costs: shuffled warm get_batch with verify=True
against verify=False on the same file, and the same for the C++ make_loader
on 2 threads (build/cmake/torch_lmdb_bench_read, when built), rounds
alternated in one run.

    /usr/bin/python3 benchmarks/bench_verify.py            # medium profile (16 KiB samples)
    /usr/bin/python3 benchmarks/bench_verify.py --quick

Prints one table (samples/s per round kind: median, min, max) and the ratios
verify=True / verify=False of the medians; --json writes them.
"""
import argparse
import json
import os
import statistics
import subprocess
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


def cpp_rate(binary: str, path: str, verify: bool, seconds: float) -> float:
    """Samples/s of the C++ make_loader (2 reader threads, shuffled, batch 256), warm."""
    out = subprocess.run([binary, "--path", path, "--mode", "loader", "--threads", "2", "--batch", "256",
                          "--seconds", str(seconds), "--verify", "1" if verify else "0"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["samples_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default="/tmp/torch_lmdb_bench/verify.lmdb")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--bin", default=os.path.join(ROOT, "build", "cmake", "torch_lmdb_bench_read"))
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
    cpp = os.path.exists(args.bin)
    if cpp:
        results.update({"C++ loader, verify=False": [], "C++ loader, verify=True": []})
    for _ in range(rounds):
        results["verify=False"].append(rate(plain, order, 256, seconds))
        results["verify=True"].append(rate(checked, order, 256, seconds))
        if cpp:
            for verify in (False, True):
                results[f"C++ loader, verify={verify}"].append(cpp_rate(args.bin, args.data, verify, seconds))
    print(f"shuffled, batch 256, {n} samples of 16 KiB, warm, {rounds} alternated rounds of {seconds} s")
    print(f"{'reader':<28} {'median/s':>10} {'min/s':>10} {'max/s':>10}")
    for name, values in results.items():
        print(f"{name:<28} {statistics.median(values):>10.0f} {min(values):>10.0f} {max(values):>10.0f}")
    ratios = {}
    for prefix in ("", "C++ loader, ") if cpp else ("",):
        ratios[prefix + "ratio"] = (statistics.median(results[prefix + "verify=True"]) /
                                    statistics.median(results[prefix + "verify=False"]))
        print(f"{prefix or 'get_batch, '}verify=True / verify=False: {ratios[prefix + 'ratio']:.2f}x")
    if not cpp:
        print(f"(no {args.bin}: `make cmake-build` builds the C++ loader's benchmark)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": results, **ratios, "samples": n}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
