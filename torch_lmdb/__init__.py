"""torch_lmdb: LMDB datasets of named tensors for PyTorch and LibTorch.

Write samples (dicts of tensors, numpy arrays, scalars, str, bytes) with
:class:`LMDBWriter`, read them with :class:`LMDBDataset` in any DataLoader.
"""
from torch_lmdb import _C

# The error classes (Error, MapFullError, ..., DiskFullError): one per row of the core's table
# (csrc/torch_lmdb/errors.h, TORCH_LMDB_ERROR_CLASSES), made and raised by _C.
globals().update({_name: getattr(_C, _name) for _name in _C.ERROR_CLASSES})

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
    *_C.ERROR_CLASSES,
    "__version__",
    "FORMAT_VERSION",
]
