"""Fashion-MNIST (Debian's dataset-fashion-mnist, IDX files) -> torch_lmdb.

    /usr/bin/python3 examples/fashion_mnist/convert_idx.py --out data/fashion_mnist

Writes ``train.lmdb`` and ``test.lmdb`` (fields ``image`` uint8 [1, 28, 28] and
``label`` int64) and, for LibTorch's own ``torch::data::datasets::MNIST``
reader, the same images as uncompressed IDX files under ``idx/``, so both
loaders read identical samples.
"""
import argparse
import gzip
import os
import shutil
import struct
import sys
import time

import numpy as np

import torch_lmdb

SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=SOURCE, help=f"directory of the .gz IDX files (default {SOURCE})")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = parser.parse_args()
    idx_dir = os.path.join(args.out, "idx")
    os.makedirs(idx_dir, exist_ok=True)
    t0 = time.perf_counter()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
        if len(images) != len(labels):
            raise SystemExit(f"{split}: {len(images)} images but {len(labels)} labels")
        write_idx(os.path.join(idx_dir, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(idx_dir, f"{prefix}-labels-idx1-ubyte"), labels)
        path = os.path.join(args.out, f"{split}.lmdb")
        shutil.rmtree(path, ignore_errors=True)
        with torch_lmdb.LMDBWriter(path, user_metadata={"source": os.path.abspath(args.source), "classes": CLASSES}) as w:
            w.write_many(({"image": images[i][None], "label": np.int64(labels[i])} for i in range(len(images))),
                         progress=args.progress, total=len(images))
        print(path)
    print(f"converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
