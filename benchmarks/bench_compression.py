"""Blosc compression: database size against the Zarr store, and batched reads.

Two sources, each a Blosc-compressed Zarr store (Zarr's default compressor,
LZ4 level 5 with byte shuffle) converted with ``torch-lmdb convert``
(``--compression auto``: the store's own codec, with and without ``--no-columns``, and
also zstd and none):

- ``radio``: the radio-localization demo's samples (examples/radio_localization,
  the generator's simulator: cir float32 [8, 64], rssi, position, los, ragged paths);
- ``small-fields``: a complex64 CIR [4, 64] beside seven fields of a few bytes per sample
  (fields_store), chunks of 500 samples;
- ``f32-16k``: float32 [4096] samples (16 KiB: a few sinusoids plus noise, kept
  to 1e-3, as sensor data), chunks of 256 samples.

Rows: the database's size on disk against the Zarr store's (allocated blocks of
every file; the bar is <= 1.1x), and ``get_batch`` of shuffled batches of 64
from the 16 KiB databases, LZ4 and Zstd against the uncompressed database
(the bar for LZ4 is >= 0.5x), and from the small-fields databases (shuffled and
sequential) with columns against ``--no-columns``, all measured in this run,
interleaved, best of the rounds.

    /usr/bin/python3 benchmarks/bench_compression.py [--quick] [--json out.json]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "radio_localization"))
import torch_lmdb  # noqa: E402
from torch_lmdb import _zarr  # noqa: E402
from torch_lmdb import convert as tl_convert  # noqa: E402


def disk_bytes(path: str) -> int:
    """Allocated bytes of a file or of every file under a directory (du)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def db_bytes(path: str) -> int:
    return disk_bytes(os.path.join(path, "data.mdb"))


def radio_store(path: str, n: int, block: int = 256) -> None:
    """The demo's samples in a Zarr store with zarr's default compressor."""
    import common  # examples/radio_localization/common.py

    num_bs, num_taps, area = 8, 64, [100.0, 100.0, 3.0]  # configs/generate.yaml
    samples = []
    for b, start in enumerate(range(0, n, block)):
        samples += common.simulate_block(0, 0, b, min(block, n - start), num_bs, num_taps, area)
    root = _zarr.open_group(path, mode="w", zarr_format=_zarr.writable_formats()[-1])
    for name in ("cir", "rssi", "position", "los"):
        data = np.stack([s[name] for s in samples])
        _zarr.write_array(root, name, data, chunks=(block,) + data.shape[1:])
    _zarr.write_ragged(root, "paths", [s["paths"] for s in samples], chunks=block,
                       form=_zarr.ragged_forms(_zarr.writable_formats()[-1])[-1])


def fields_store(path: str, n: int, chunk: int = 500) -> None:
    """A simulator's store of many small per-sample fields beside a complex64 CIR (a few
    decaying taps, zero after the last path), as the radio team's stores hold them:
    rssi, position, receiver id, line of sight, path count, ragged path delays
    (values + offsets) and a scene name."""
    rng = np.random.default_rng(2)
    fmt = _zarr.writable_formats()[-1]
    root = _zarr.open_group(path, mode="w", zarr_format=fmt)
    cir = _zarr.create_array(root, "cir", (n, 4, 64), "c8", chunks=(chunk, 4, 64))
    rssi = _zarr.create_array(root, "rssi", (n, 4), "f4", chunks=(chunk, 4))
    tx = _zarr.create_array(root, "tx_position", (n, 3), "f8", chunks=(chunk, 3))
    rx = _zarr.create_array(root, "rx_id", (n,), "i4", chunks=(chunk,))
    los = _zarr.create_array(root, "los", (n, 4), bool, chunks=(chunk, 4))
    count = _zarr.create_array(root, "num_paths", (n,), "i4", chunks=(chunk,))
    delays = []
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        k = rng.integers(1, 12, m)
        taps = np.zeros((m, 4, 64), dtype=np.complex64)
        for i in range(m):
            at = np.sort(rng.integers(0, 24, k[i]))
            gain = (rng.standard_normal((4, k[i])) + 1j * rng.standard_normal((4, k[i]))) * np.exp(-at / 8.0)
            taps[i][:, at] = np.round(gain, 3).astype(np.complex64)
            delays.append(np.round(at * 2.5 + rng.uniform(0, 2.5, k[i]), 2).astype(np.float32))
        cir[s:s + m] = taps
        rssi[s:s + m] = np.round(rng.normal(-70, 10, (m, 4)), 1).astype(np.float32)
        tx[s:s + m] = np.round(rng.uniform(0, 100, (m, 3)), 2)
        rx[s:s + m] = np.arange(s, s + m, dtype=np.int32) % 64
        los[s:s + m] = rng.random((m, 4)) < 0.3
        count[s:s + m] = k
    _zarr.write_ragged(root, "path_delays", delays, chunks=chunk, form=_zarr.ragged_forms(fmt)[-1])
    _zarr.write_strings(root, "scene", [f"scene-{i % 97:03d}" for i in range(n)], chunks=(chunk,))


def f32_store(path: str, n: int, width: int = 4096, chunk: int = 256) -> None:
    rng = np.random.default_rng(0)
    root = _zarr.open_group(path, mode="w", zarr_format=_zarr.writable_formats()[-1])
    array = _zarr.create_array(root, "x", (n, width), "f4", chunks=(chunk, width))
    t = np.linspace(0, 1, width, dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        freq = rng.uniform(1, 40, (m, 3, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (m, 3, 1)).astype(np.float32)
        x = np.sin(2 * np.pi * freq * t + phase).sum(axis=1) + rng.normal(0, 0.01, (m, width))
        array[start:start + m] = (np.round(x * 1000) / 1000).astype(np.float32)
    _zarr.write_array(root, "label", np.arange(n, dtype=np.int64), chunks=(chunk,))


def convert(src: str, out: str, compression: str) -> str:
    """``convert --compression <codec> [--no-columns]``."""
    codec, _, flag = compression.partition(" ")
    tl_convert.convert("zarr", src, out, compression=codec, columns=flag != "--no-columns", log=lambda *a, **k: None)
    return out


def read_rate(path: str, batches, pad: bool = False) -> float:
    ds = torch_lmdb.LMDBDataset(path, pad=pad)
    ds.get_batch(batches[0])  # open, warm the page cache path
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        ds.get_batch(b)
        n += len(b)
    return n / (time.perf_counter() - t0)


def run(quick: bool, log=print) -> list:
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_compression-")
    try:
        # ---- sizes: radio demo data and the 16 KiB float32 store ----------------
        n_radio = 4096 if quick else 24576
        n_fields = 10000 if quick else 50000
        n_f32 = 3000 if quick else 12000
        radio = os.path.join(tmp, "radio.zarr")
        radio_store(radio, n_radio)
        fields = os.path.join(tmp, "fields.zarr")
        fields_store(fields, n_fields)
        f32 = os.path.join(tmp, "f32.zarr")
        f32_store(f32, n_f32)
        dbs = {}
        for profile, src, n in (("radio", radio, n_radio), ("small-fields", fields, n_fields), ("f32-16k", f32, n_f32)):
            zarr_size = disk_bytes(src)
            for compression in ("auto", "auto --no-columns", "zstd", "none"):
                if profile == "f32-16k" and compression == "auto --no-columns":
                    continue  # no field under 128 bytes a sample but the label, too few per value to compress
                out = convert(src, os.path.join(tmp, f"{profile}-{compression.replace(' ', '')}.lmdb"), compression)
                dbs[(profile, compression)] = out
                size = db_bytes(out)
                codecs = sorted({f["codec"] for f in torch_lmdb.info(out)["fields"] if f["kind"] == "tensor"})
                rows.append({"profile": f"{profile} size ({n} samples)", "system": f"--compression {compression} "
                             f"({'/'.join(codecs)})", "samples_per_s": None, "bytes": size, "ratio": size / zarr_size,
                             "vs": f"Zarr store on disk ({zarr_size / 2**20:.1f} MiB, Blosc lz4)", "bar": "<= 1.1"
                             if compression == "auto" else None})
                log(f"{profile}: {compression}: {size / 2**20:.1f} MiB = {size / zarr_size:.2f}x the Zarr store")
        # ---- batched shuffled reads of the 16 KiB samples ------------------------
        rng = np.random.default_rng(1)
        batch = 64
        order = rng.permutation(n_f32)
        batches = [order[i:i + batch].tolist() for i in range(0, n_f32 - batch + 1, batch)]
        systems = {"none": dbs[("f32-16k", "none")], "lz4": dbs[("f32-16k", "auto")], "zstd": dbs[("f32-16k", "zstd")]}
        best = {k: 0.0 for k in systems}
        for _ in range(3 if quick else 5):
            for name, path in systems.items():
                best[name] = max(best[name], read_rate(path, batches))
        for name in ("lz4", "zstd"):
            rows.append({"profile": "f32-16k get_batch, shuffled, batch 64", "system": f"torch_lmdb {name}",
                         "samples_per_s": best[name], "ratio": best[name] / best["none"],
                         "vs": "torch_lmdb uncompressed", "bar": ">= 0.5" if name == "lz4" else None})
        rows.append({"profile": "f32-16k get_batch, shuffled, batch 64", "system": "torch_lmdb uncompressed",
                     "samples_per_s": best["none"], "ratio": 1.0, "vs": "torch_lmdb uncompressed", "bar": None})
        log("get_batch samples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in best.items()))
        # ---- the small fields' columns: what reading them costs ----------------
        for label, order in (("shuffled", rng.permutation(n_fields)), ("sequential", np.arange(n_fields))):
            batches = [order[i:i + batch].tolist() for i in range(0, n_fields - batch + 1, batch)]
            systems = {"columns": dbs[("small-fields", "auto")], "no columns": dbs[("small-fields", "auto --no-columns")]}
            best = {k: 0.0 for k in systems}
            for _ in range(3 if quick else 5):
                for name, path in systems.items():
                    best[name] = max(best[name], read_rate(path, batches, pad=True))
            rows.append({"profile": f"small-fields get_batch, {label}, batch 64", "system": "lz4, columns",
                         "samples_per_s": best["columns"], "ratio": best["columns"] / best["no columns"],
                         "vs": "lz4, --no-columns", "bar": None})
            log(f"small-fields {label} get_batch samples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in best.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run(args.quick, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    print(f"{'profile':40} {'system':34} {'samples/s':>12} {'MiB':>8} {'ratio':>7}  vs")
    for r in rows:
        rate = f"{r['samples_per_s']:,.0f}" if r.get("samples_per_s") else "-"
        mib = f"{r['bytes'] / 2**20:.1f}" if r.get("bytes") else "-"
        print(f"{r['profile']:40} {r['system']:34} {rate:>12} {mib:>8} {r['ratio']:>6.2f}x  {r['vs']}"
              + (f"  (bar {r['bar']})" if r.get("bar") else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
