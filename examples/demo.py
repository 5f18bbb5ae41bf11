"""`make demo`: the main job end to end, then one summary table.

    /usr/bin/python3 examples/demo.py --work build/demo --bin build/examples

Stages: generate the radio-localization dataset as a Zarr store with splits
(radio.zarr: root attributes, groups train/ and val/); convert it with
`torch-lmdb convert --output-dir converted --verify` (one database per split:
converted/train.lmdb, converted/val.lmdb); train in Python (DataLoader,
num_workers=4) from train.lmdb, validating on val.lmdb, and from the Zarr
store; train natively in C++ from train.lmdb/val.lmdb; Fashion-MNIST natively
from LMDB and from LibTorch's MNIST reader. Sizes come from the config files.
"""
import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RADIO = os.path.join(HERE, "radio_localization")


def run(stage, cmd, results, env):
    """Runs one stage, streaming its output; returns its RESULT payload."""
    print(f"\n=== {stage}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    payload = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            payload = json.loads(line[len("RESULT "):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"demo: stage '{stage}' failed (exit code {proc.returncode})")
    seconds = time.perf_counter() - t0
    results.append((stage, seconds, payload))
    return payload


def published_baselines():
    """Test accuracies of the 2-conv-layer rows without preprocessing of the Fashion-MNIST README shipped by Debian."""
    try:
        with gzip.open("/usr/share/doc/dataset-fashion-mnist/README.md.gz", "rt") as f:
            found = [float(a) for a in re.findall(r"^\|2 Conv[^|]*\| *None *\| *([0-9.]+) *\|", f.read(), re.M)]
        return f"{min(found)}-{max(found)}" if found else "n/a"
    except OSError:
        return "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "demo"), help="where the data goes")
    parser.add_argument("--bin", default=os.path.join(ROOT, "build", "examples"),
                        help="directory holding the built train_native and train_fmnist")
    parser.add_argument("--radio-epochs", type=int, default=4)
    parser.add_argument("--fmnist-epochs", type=int, default=1)
    args = parser.parse_args()
    data = os.path.join(args.work, "radio")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = sys.executable
    progress = ["--progress"] if sys.stdout.isatty() else ["--no-progress"]
    gen = [py, os.path.join(RADIO, "generate.py"), "--config", os.path.join(RADIO, "configs", "generate.yaml"),
           "--set", f"output_dir={data}", *progress]
    train = [py, os.path.join(RADIO, "train.py"), "--config", os.path.join(RADIO, "configs", "train.yaml"),
             "--set", f"epochs={args.radio_epochs}", *progress]
    results = []
    t_all = time.perf_counter()
    g = run("generate (Zarr store with splits train/val, 2 processes)", gen + ["--set", "use_lmdb=false"],
            results, env)
    store = g["store"]
    converted = os.path.join(data, "converted")
    shutil.rmtree(converted, ignore_errors=True)  # a rerun of the demo converts again
    run("torch-lmdb convert --output-dir --verify (Zarr splits -> train.lmdb, val.lmdb)",
        [py, "-m", "torch_lmdb", "convert", "--zarr-path", store, "--output-dir", converted, "--verify", *progress],
        results, env)
    train_db, val_db = os.path.join(converted, "train.lmdb"), os.path.join(converted, "val.lmdb")
    tr_lmdb = run("train.py from train.lmdb, val.lmdb (num_workers=4)", train + [
        "--set", f"dataset.train_lmdb_paths=[{train_db}]", "--set", f"dataset.val_lmdb_paths=[{val_db}]"],
        results, env)
    tr_zarr = run("train.py from Zarr (num_workers=4)", train + [
        "--set", "dataset.use_lmdb=false",
        "--set", f"dataset.train_zarr_path={os.path.join(store, 'train')}",
        "--set", f"dataset.val_zarr_path={os.path.join(store, 'val')}"], results, env)
    tr_native = run("train_native (C++, train.lmdb, val.lmdb, 2 threads)", [
        os.path.join(args.bin, "train_native"), "--train", train_db, "--val", val_db,
        "--epochs", str(args.radio_epochs), "--workers", "2"], results, env)
    fm_dir = os.path.join(args.work, "fashion_mnist")
    run("Fashion-MNIST IDX -> LMDB", [py, os.path.join(HERE, "fashion_mnist", "convert_idx.py"), "--out", fm_dir,
                                      *progress], results, env)
    fm = run("Fashion-MNIST CNN (C++): torch_lmdb vs LibTorch MNIST", [
        os.path.join(args.bin, "train_fmnist"), "--data", fm_dir, "--epochs", str(args.fmnist_epochs)], results, env)
    total = time.perf_counter() - t_all

    print("\n" + "=" * 100)
    print("torch_lmdb demo summary\n")
    print("| stage | time (s) |\n|---|---|")
    for stage, seconds, _ in results:
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **total (after the build)** | **{total:.1f}** |\n")
    print("Radio localization (24 576 training samples; median error on the validation set)\n")
    print("| loader | data loading (samples/s) | vs Zarr | final loss | median error (m) | predicting the mean (m) |")
    print("|---|---|---|---|---|---|")
    zarr_rate = tr_zarr["load_samples_per_s"]
    for name, r in (("Python, torch_lmdb make_loader, 4 workers", tr_lmdb),
                    ("Python, Zarr Dataset, 4 workers", tr_zarr),
                    ("C++, torch_lmdb StackedDataset, 2 threads", tr_native)):
        print(f"| {name} | {r['load_samples_per_s']:,.0f} | {r['load_samples_per_s'] / zarr_rate:.1f}x | "
              f"{r['losses'][-1]:.4f} | {r['median_errors_m'][-1]:.2f} | {r['baseline_error_m']:.2f} |")
    print(f"\nFashion-MNIST CNN, {args.fmnist_epochs} epoch(s), native C++ (published test accuracy of "
          f"2-conv-layer CNNs without preprocessing, trained longer: {published_baselines()})\n")
    print("| reader | one pass over 60 000 images (s) | test accuracy | training (s) |\n|---|---|---|---|")
    for r in fm["runs"]:
        print(f"| {r['loader']} | {r['load_seconds']:.3f} | {r['test_accuracy']:.4f} | {r['train_seconds']:.1f} |")
    for r in (tr_lmdb, tr_zarr, tr_native):
        if not r["median_errors_m"][-1] < 0.5 * r["baseline_error_m"]:
            raise SystemExit(f"demo: {r['loader']} did not learn (median error {r['median_errors_m'][-1]:.2f} m)")


if __name__ == "__main__":
    main()
