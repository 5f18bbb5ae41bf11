"""Generates a synthetic radio-localization dataset in several processes.

    /usr/bin/python3 examples/radio_localization/generate.py --config examples/radio_localization/configs/generate.yaml

Writes ``<output_dir>/train-0000k-of-0000K.lmdb`` and ``val-...`` (one torch_lmdb
shard per worker process), or with ``use_lmdb: false`` one Zarr store with splits,
``radio.zarr`` (the users' old path): root attributes (generator, config), the root array
``bs_positions``, and the groups ``train/`` and ``val/`` holding the per-sample arrays,
written with zarr-python 2 (Zarr format 2, ``paths`` a VLenArray array) or 3 (format 3,
``paths`` a ragged group of ``values`` and ``offsets``, which ``torch-lmdb convert`` reads
as one field). ``torch-lmdb convert --zarr-path radio.zarr --output-dir DIR`` writes
``DIR/train.lmdb`` and ``DIR/val.lmdb``. Both forms hold identical samples:

    cir float32 [num_bs, num_taps]   rssi float32 [num_bs]   paths float32 [n, 4] (n varies)
    position float32 [3]             los bool [num_bs]
"""
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bs_positions, load_config, simulate_block, workers_ranges  # noqa: E402

DEFAULTS = dict(use_lmdb=True, lmdb_map_size=None, output_dir="data/radio", num_samples=24576,
                num_val_samples=4096, num_workers=2, seed=0, num_bs=8, num_taps=64,
                area=[100.0, 100.0, 3.0], block=256)
SPLITS = (("train", 0, "num_samples"), ("val", 1, "num_val_samples"))


def block_sizes(n: int, block: int):
    return [min(block, n - s) for s in range(0, n, block)]


def split_block_sizes(cfg, split):
    key = next(k for s, _, k in SPLITS if s == split)
    return block_sizes(int(cfg[key]), cfg["block"])


def _sim(cfg, split_id, b, size):
    return simulate_block(cfg["seed"], split_id, b, size, cfg["num_bs"], cfg["num_taps"], cfg["area"])


def write_lmdb_shard(cfg, split, split_id, path, blocks, counter):
    import torch_lmdb

    user = {"generator": "examples/radio_localization/generate.py", "split": split,
            "config": {k: v for k, v in cfg.items() if k != "progress"},
            "bs_positions": bs_positions(cfg["num_bs"], cfg["area"]).tolist()}
    sizes = split_block_sizes(cfg, split)
    with torch_lmdb.LMDBWriter(path, map_size=cfg.get("lmdb_map_size"), user_metadata=user) as writer:
        for b in range(*blocks):
            for sample in _sim(cfg, split_id, b, sizes[b]):
                writer.write(sample)
            with counter.get_lock():
                counter.value += sizes[b]


ZARR_STORE = "radio.zarr"


def _ragged_tmp(path, split):
    return f"{path}.{split}-paths-tmp"


def write_zarr_blocks(cfg, split, split_id, path, blocks, counter):
    import zarr

    store = zarr.open_group(path, mode="r+")
    vlen = store.attrs["paths_form"] == "vlen"
    root = store[split]
    sizes = split_block_sizes(cfg, split)
    for b in range(*blocks):
        samples = _sim(cfg, split_id, b, sizes[b])
        start = b * cfg["block"]
        stop = start + len(samples)
        for name in ("cir", "rssi", "position", "los"):
            root[name][start:stop] = np.stack([s[name] for s in samples])
        if vlen:
            flat = np.empty(len(samples), dtype=object)
            flat[:] = [s["paths"].ravel() for s in samples]
            root["paths"][start:stop] = flat
        else:  # the offsets form needs every earlier length: the parent assembles it (finish_zarr)
            np.savez(os.path.join(_ragged_tmp(path, split), f"{b:07d}.npz"), *[s["paths"] for s in samples])
        with counter.get_lock():
            counter.value += len(samples)


def create_zarr_store(cfg, path):
    """The store with its root attributes and root array, in the installed zarr-python's
    format (3 with zarr-python 3, else 2)."""
    from torch_lmdb import _zarr

    fmt = _zarr.writable_formats()[-1]
    root = _zarr.open_group(path, mode="w", zarr_format=fmt)
    root.attrs["generator"] = "examples/radio_localization/generate.py"
    root.attrs["config"] = {k: v for k, v in cfg.items() if k != "progress"}
    root.attrs["paths_form"] = _zarr.ragged_forms(fmt)[0]
    _zarr.write_array(root, "bs_positions", bs_positions(cfg["num_bs"], cfg["area"]))


def create_zarr_split(cfg, path, split, n):
    """The group of one split; ``paths`` as a VLenArray array where zarr-python 2 writes
    one, else as a ragged group (values + offsets, assembled by finish_zarr)."""
    from torch_lmdb import _zarr

    nb, nt, chunk = cfg["num_bs"], cfg["num_taps"], cfg["block"]
    store = _zarr.open_group(path, mode="r+", zarr_format=_zarr.writable_formats()[-1])
    root = store.create_group(split)
    root.attrs["split"] = split
    root.attrs["num_samples"] = n
    _zarr.create_array(root, "cir", (n, nb, nt), "f4", chunks=(chunk, nb, nt))
    _zarr.create_array(root, "rssi", (n, nb), "f4", chunks=(chunk, nb))
    _zarr.create_array(root, "position", (n, 3), "f4", chunks=(chunk, 3))
    _zarr.create_array(root, "los", (n, nb), bool, chunks=(chunk, nb))
    if store.attrs["paths_form"] == "vlen":
        import numcodecs  # zarr-python 2 only

        paths = root.empty("paths", shape=(n,), chunks=(chunk,), dtype=object, object_codec=numcodecs.VLenArray("<f4"))
        paths.attrs["element_shape"] = [-1, 4]  # rows of [bs index, delay ns, power dBm, angle rad]
    else:
        os.makedirs(_ragged_tmp(path, split))


def finish_zarr(cfg, path, split):
    from torch_lmdb import _zarr

    store = _zarr.open_group(path, mode="r+", zarr_format=_zarr.writable_formats()[-1])
    if store.attrs["paths_form"] == "vlen":
        return
    tmp = _ragged_tmp(path, split)
    samples = []
    for name in sorted(os.listdir(tmp)):
        with np.load(os.path.join(tmp, name)) as block:
            samples += [block[f"arr_{i}"] for i in range(len(block.files))]
    _zarr.write_ragged(store[split], "paths", samples, chunks=cfg["block"], form="offsets",
                       attrs={"columns": ["bs index", "delay ns", "power dBm", "angle rad"]})
    shutil.rmtree(tmp)


def generate(cfg):
    os.makedirs(cfg["output_dir"], exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    outputs = {}
    store = os.path.join(cfg["output_dir"], ZARR_STORE)
    if not cfg["use_lmdb"]:
        shutil.rmtree(store, ignore_errors=True)
        create_zarr_store(cfg, store)
    for split, split_id, key in SPLITS:
        n = int(cfg[key])
        num_blocks = len(block_sizes(n, cfg["block"]))
        ranges = workers_ranges(num_blocks, max(1, int(cfg["num_workers"])))
        counter = ctx.Value("q", 0)
        if cfg["use_lmdb"]:
            paths = [os.path.join(cfg["output_dir"], f"{split}-{k:05d}-of-{len(ranges):05d}.lmdb")
                     for k in range(len(ranges))]
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
            jobs = [(write_lmdb_shard, (cfg, split, split_id, p, r, counter)) for p, r in zip(paths, ranges)]
        else:
            shutil.rmtree(_ragged_tmp(store, split), ignore_errors=True)
            create_zarr_split(cfg, store, split, n)
            paths = [os.path.join(store, split)]
            jobs = [(write_zarr_blocks, (cfg, split, split_id, store, r, counter)) for r in ranges]
        procs = [ctx.Process(target=f, args=a) for f, a in jobs]
        for p in procs:
            p.start()
        bar = None
        if cfg["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="sample", desc=f"generating {split} ({'lmdb' if cfg['use_lmdb'] else 'zarr'})")
        shown = 0
        while any(p.is_alive() for p in procs):
            time.sleep(0.1)
            if bar is not None:
                bar.update(counter.value - shown)
                shown = counter.value
        if bar is not None:
            bar.update(counter.value - shown)
            bar.close()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise SystemExit(f"generate.py: {len(failed)} worker process(es) failed (exit codes {failed})")
        if not cfg["use_lmdb"]:
            finish_zarr(cfg, store, split)
        outputs[split] = paths
    return outputs


def main():
    cfg = load_config(__doc__.splitlines()[0], DEFAULTS)
    t0 = time.perf_counter()
    outputs = generate(cfg)
    seconds = time.perf_counter() - t0
    n = int(cfg["num_samples"]) + int(cfg["num_val_samples"])
    for split, paths in outputs.items():
        for p in paths:
            print(p)
    print(f"generated {n} samples in {seconds:.1f} s ({n / seconds:,.0f} samples/s, "
          f"{cfg['num_workers']} processes, {'lmdb' if cfg['use_lmdb'] else 'zarr'})", file=sys.stderr)
    result = {"stage": "generate", "format": "lmdb" if cfg["use_lmdb"] else "zarr", "samples": n,
              "seconds": seconds, "outputs": outputs}
    if not cfg["use_lmdb"]:
        result["store"] = os.path.join(cfg["output_dir"], ZARR_STORE)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
