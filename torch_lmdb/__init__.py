"""torch_lmdb: LMDB datasets of named tensors for PyTorch and LibTorch.

Write samples (dicts of tensors, numpy arrays, scalars, str, bytes) with
:class:`LMDBWriter`, read them with :class:`LMDBDataset` in any DataLoader.
"""
from torch_lmdb import _C
from torch_lmdb._C import (
    CorruptedError,
    DiskFullError,
    Error,
    InvalidDatabaseError,
    LockError,
    MapFullError,
    NotFoundError,
    ReadersFullError,
)
from torch_lmdb._info import info
from torch_lmdb.dataset import LMDBDataset
from torch_lmdb.loader import LMDBLoader, make_loader
from torch_lmdb.mixture import Mixture
from torch_lmdb.stream import BatchIterator
from torch_lmdb.writer import LMDBWriter

__version__ = _C.__version__
FORMAT_VERSION = _C.FORMAT_VERSION

__all__ = [
    "LMDBDataset",
    "LMDBLoader",
    "BatchIterator",
    "LMDBWriter",
    "Mixture",
    "info",
    "make_loader",
    "Error",
    "MapFullError",
    "ReadersFullError",
    "NotFoundError",
    "CorruptedError",
    "InvalidDatabaseError",
    "LockError",
    "DiskFullError",
    "__version__",
    "FORMAT_VERSION",
]
