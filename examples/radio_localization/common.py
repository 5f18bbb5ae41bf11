"""Shared pieces of the radio-localization example: configuration, the
simulator and the model (train_native.cpp mirrors the model and its scaling)."""
import argparse
import glob
import os
import sys
from typing import Any, Dict, List

import numpy as np
import yaml

C_M_PER_NS = 0.299792458
TAP_NS = 10.0
MAX_COMPONENTS = 5  # multipath components per link, including the first arrival


def load_config(description: str, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``--config file.yaml`` plus ``--set key=value`` overrides (dotted keys, YAML values)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (dotted for nested keys), e.g. --set epochs=2")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                        help="progress bars (default: on a terminal)")
    args = parser.parse_args()
    with open(args.config) as f:
        config = dict(defaults)
        config.update(yaml.safe_load(f) or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    config["progress"] = args.progress
    return config


def expand(patterns: List[str]) -> List[str]:
    """Config path lists: glob patterns expanded (sorted), plain paths kept."""
    out: List[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p))
        if not matches and not glob.has_magic(p):
            matches = [p]
        if not matches:
            raise FileNotFoundError(f"no file matches '{p}' (run generate.py first)")
        out.extend(matches)
    return out


def bs_positions(num_bs: int, area) -> np.ndarray:
    """Base stations on the border of the area (corners first, then edge midpoints), 6 m high."""
    ax, ay = area[0], area[1]
    spots = [(0, 0), (ax, ay), (ax, 0), (0, ay), (ax / 2, 0), (ax / 2, ay), (0, ay / 2), (ax, ay / 2)]
    spots += [(ax * ((k * 0.37) % 1), ay * ((k * 0.61) % 1)) for k in range(max(0, num_bs - len(spots)))]
    return np.array([(x, y, 6.0) for x, y in spots[:num_bs]], dtype=np.float32)


def simulate_block(seed: int, split: int, block: int, size: int, num_bs: int, num_taps: int, area) -> List[Dict[str, np.ndarray]]:
    """Samples of one block, a pure function of (seed, split, block): the LMDB
    and Zarr outputs hold identical samples whatever the number of workers.

    Model: log-distance path loss with log-normal shadowing (exponent 2 in line
    of sight, 3.3 without), the first arrival delayed by d/c (plus an excess
    delay without line of sight), 0-4 later multipath components with
    exponentially decaying power, a sinc pulse per component sampled every 10 ns.
    """
    rng = np.random.default_rng([seed, split, block])
    bs = bs_positions(num_bs, area)
    pos = rng.uniform([0, 0, 0], area, size=(size, 3)).astype(np.float32)
    d = np.linalg.norm(pos[:, None, :] - bs[None, :, :], axis=2)  # [B, bs]
    los = rng.random((size, num_bs)) < np.exp(-d / 60.0)
    exponent = np.where(los, 2.0, 3.3)
    shadow = rng.normal(0.0, 1.0, (size, num_bs)) * np.where(los, 2.0, 5.0)
    rssi = 20.0 - (40.0 + 10.0 * exponent * np.log10(np.maximum(d, 1.0)) + shadow)  # dBm
    # components: [B, bs, K] delay (ns), power (dB), angle of arrival (rad)
    count = 1 + np.minimum(rng.poisson(1.5, (size, num_bs)), MAX_COMPONENTS - 1)
    delay = np.empty((size, num_bs, MAX_COMPONENTS))
    delay[..., 0] = d / C_M_PER_NS + np.where(los, 0.0, rng.exponential(15.0, (size, num_bs)))
    delay[..., 1:] = delay[..., :1] + np.cumsum(rng.exponential(40.0, (size, num_bs, MAX_COMPONENTS - 1)), axis=2)
    power = rssi[..., None] - np.concatenate(
        [np.zeros((size, num_bs, 1)), 3.0 + rng.exponential(6.0, (size, num_bs, MAX_COMPONENTS - 1))], axis=2)
    aoa = rng.uniform(-np.pi, np.pi, (size, num_bs, MAX_COMPONENTS))
    phase = rng.uniform(0, 2 * np.pi, (size, num_bs, MAX_COMPONENTS))
    present = np.arange(MAX_COMPONENTS)[None, None, :] < count[..., None]
    amp = np.where(present, 10.0 ** ((power + 100.0) / 20.0), 0.0)
    taps = np.arange(num_taps) * TAP_NS
    pulse = np.sinc((taps[None, None, None, :] - delay[..., None]) / TAP_NS)  # [B, bs, K, T]
    h = np.abs(np.einsum("bskt,bsk->bst", pulse, amp * np.exp(1j * phase)))
    noise = np.abs(rng.normal(0, 1, h.shape) + 1j * rng.normal(0, 1, h.shape)) * 0.05
    cir = (20.0 * np.log10(h + noise + 1e-3)).astype(np.float32)  # dB above -100 dBm

    samples = []
    bs_index = np.broadcast_to(np.arange(num_bs)[:, None], (num_bs, MAX_COMPONENTS))
    for i in range(size):
        m = present[i]
        paths = np.stack([bs_index[m], delay[i][m], power[i][m], aoa[i][m]], axis=1).astype(np.float32)
        samples.append({
            "cir": cir[i],
            "rssi": rssi[i].astype(np.float32),
            "paths": paths,
            "position": pos[i],
            "los": los[i],
        })
    return samples


# ---- model (same architecture and scaling in train_native.cpp) ---------------
CIR_OFFSET, CIR_SCALE = 20.0, 20.0
RSSI_OFFSET, RSSI_SCALE = 80.0, 20.0


def make_model(num_bs: int, num_taps: int):
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(num_bs * num_taps + num_bs, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 3))


def features(cir, rssi):
    import torch

    return torch.cat([((cir - CIR_OFFSET) / CIR_SCALE).flatten(1), (rssi + RSSI_OFFSET) / RSSI_SCALE], dim=1)


def workers_ranges(num_blocks: int, workers: int):
    bounds = [num_blocks * k // workers for k in range(workers + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(workers) if bounds[k] < bounds[k + 1]]
