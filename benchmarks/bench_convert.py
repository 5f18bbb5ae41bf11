"""Conversion of a radio-localization Zarr store with splits: `torch-lmdb convert
--output-dir` against a chunk-by-chunk read of the same store with zarr alone, in the
same run (time, samples/s, peak RSS of each process).

    /usr/bin/python3 benchmarks/bench_convert.py            # the 2.6 GB-class store
    /usr/bin/python3 benchmarks/bench_convert.py --quick    # a ~80 MB store

The store is the users' layout: root attributes (simulator metadata) and a small root
array, groups ``train/`` and ``val/`` (10:1), each with ``cir`` complex64 [N, 4, 256]
(8 KiB a sample), ``rssi`` float32 [4], ``tx_position`` float64 [3], ``rx_id`` int32,
``los`` bool [4], a ragged ``path_delays`` (numcodecs VLenArray under zarr-python 2, a
ragged values + offsets group under 3) and ``scene`` strings; zarr's default compressor
(Blosc), chunks of 500 samples. Both passes run in their own process (time from the
process start: interpreter and imports included, so the conversion's time includes
importing torch; peak RSS from wait4), read every array of every split chunk-aligned; the
baseline only decodes, the conversion also builds the samples, writes and commits them.
The store is kept in ``--dir`` between runs (rebuilt when its sizes differ).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.environ.get("TORCH_LMDB_BENCH_DIR", "/tmp/torch_lmdb_bench_convert")
CHUNK = 500
SIZES = {"full": {"train": 300_000, "val": 30_000}, "quick": {"train": 9_000, "val": 1_000}}

# The baseline: every array of every split read chunk by chunk with zarr alone.
ZARR_READ = r"""
import importlib.util, sys, zarr, numpy as np
spec = importlib.util.spec_from_file_location("tl_zarr", sys.argv[2] + "/torch_lmdb/_zarr.py")
_zarr = importlib.util.module_from_spec(spec)  # the ragged reader alone: no torch import in the baseline
spec.loader.exec_module(_zarr)
root = zarr.open_group(sys.argv[1], mode="r")
total = 0
for split in ("train", "val"):
    g = root[split]
    arrays = {name: a for name, a in g.arrays()}
    arrays["path_delays"] = (_zarr.RaggedArray(g["path_delays"], "path_delays")
                             if g["path_delays"].attrs.get("ragged") else g["path_delays"])
    n = arrays["cir"].shape[0]
    for start in range(0, n, %d):
        for name, a in arrays.items():
            block = a[start:start + %d]
            total += block.nbytes if block.dtype != object else sum(np.asarray(v).nbytes for v in block)
print(total)
""" % (CHUNK * 8, CHUNK * 8)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def make_store(path: str, sizes: Dict[str, int], log) -> None:
    """Writes the store (random CIR: Blosc cannot shrink it much, as with real channel data)."""
    sys.path.insert(0, ROOT)
    from torch_lmdb import _zarr

    marker = os.path.join(os.path.dirname(path), "store.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == {"sizes": sizes, "zarr": _zarr.zarr_major()}:
                return
    shutil.rmtree(path, ignore_errors=True)
    log(f"writing {path} ({sum(sizes.values()):,} samples)")
    fmt = _zarr.writable_formats()[-1]
    form = _zarr.ragged_forms(fmt)[0]
    root = _zarr.open_group(path, mode="w", zarr_format=fmt)
    root.attrs["simulator"] = {"name": "raysim", "version": "2.1", "carrier_hz": 3.5e9, "bandwidth_hz": 1e8}
    _zarr.write_array(root, "bs_positions", np.zeros((4, 3), dtype=np.float32))
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        g = root.create_group(split)
        g.attrs["split"] = split
        cir = _zarr.create_array(g, "cir", (n, 4, 256), "c8", chunks=(CHUNK, 4, 256))
        rssi = _zarr.create_array(g, "rssi", (n, 4), "f4", chunks=(CHUNK, 4))
        tx = _zarr.create_array(g, "tx_position", (n, 3), "f8", chunks=(CHUNK, 3))
        rx = _zarr.create_array(g, "rx_id", (n,), "i4", chunks=(CHUNK,))
        los = _zarr.create_array(g, "los", (n, 4), bool, chunks=(CHUNK, 4))
        delays = []
        for s in range(0, n, 10 * CHUNK):
            e = min(n, s + 10 * CHUNK)
            m = e - s
            cir[s:e] = (rng.standard_normal((m, 4, 256), dtype=np.float32)
                        + 1j * rng.standard_normal((m, 4, 256), dtype=np.float32)).astype(np.complex64)
            rssi[s:e] = rng.normal(-70, 10, (m, 4)).astype(np.float32)
            tx[s:e] = rng.uniform(0, 100, (m, 3))
            rx[s:e] = np.arange(s, e, dtype=np.int32) % 64
            los[s:e] = rng.random((m, 4)) < 0.3
            delays += [rng.exponential(50.0, int(k)).astype(np.float32) for k in rng.integers(1, 12, m)]
        _zarr.write_ragged(g, "path_delays", delays, chunks=CHUNK, form=form)
        _zarr.write_strings(g, "scene", [f"scene-{i % 97:03d}" for i in range(n)], chunks=(CHUNK,))
    with open(marker, "w") as f:
        json.dump({"sizes": sizes, "zarr": _zarr.zarr_major()}, f)


def timed(cmd: List[str]) -> Dict[str, float]:
    """Runs cmd; wall seconds and the peak RSS of that process alone (wait4's rusage, KiB on Linux)."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}


def run(quick: bool, log=print) -> List[dict]:
    profile = "quick" if quick else "full"
    sizes = SIZES[profile]
    work = os.path.join(DEFAULT_DIR, profile)
    os.makedirs(work, exist_ok=True)
    store = os.path.join(work, "sim.zarr")
    make_store(store, sizes, log)
    n = sum(sizes.values())
    store_bytes = du(store)
    py = sys.executable
    base = timed([py, "-c", ZARR_READ, store, ROOT])
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    conv = timed([py, "-m", "torch_lmdb", "convert", "--zarr-path", store, "--output-dir", out, "--no-progress"])
    db_bytes = sum(os.path.getsize(os.path.join(out, f"{s}.lmdb", "data.mdb")) for s in sizes)
    raw = int(base["stdout"].strip())
    import re

    own = sum(float(x) for x in re.findall(r"converted [0-9,]+ samples.* in ([0-9.]+) s", conv["stderr"]))
    label = f"radio split store, {n:,} samples, {raw / 1e9:.2f} GB raw, {store_bytes / 1e9:.2f} GB on disk"
    base_rate = n / base["seconds"]
    rows = [
        {"profile": profile, "system": "zarr chunk-by-chunk read (decode only)", "samples_per_s": base_rate,
         "ratio": 1.0, "vs": "zarr chunk-by-chunk read", "seconds": base["seconds"],
         "peak_rss_mib": base["peak_rss_mib"], "bytes": store_bytes, "store": label},
        {"profile": profile, "system": "torch-lmdb convert --output-dir (train.lmdb, val.lmdb)",
         "samples_per_s": n / conv["seconds"], "ratio": (n / conv["seconds"]) / base_rate,
         "vs": "zarr chunk-by-chunk read", "seconds": conv["seconds"], "peak_rss_mib": conv["peak_rss_mib"],
         "bytes": db_bytes, "store": label, "convert_seconds_reported": own},
    ]
    for r in rows:
        log(f"  {profile:5} {r['system']:55} {r['seconds']:7.1f} s {r['samples_per_s']:>10,.0f} samples/s "
            f"{r['ratio']:5.2f}x  peak RSS {r['peak_rss_mib']:,.0f} MiB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~80 MB store instead of the 2.6 GB-class one")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run(args.quick, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    print(f"\n{rows[0]['store']}\n")
    print("| profile | system | time (s) | samples/s | vs zarr read | peak RSS (MiB) | size on disk (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['system']} | {r['seconds']:.1f} | {r['samples_per_s']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['peak_rss_mib']:,.0f} | {r['bytes'] / 1e6:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
