"""The conversion source of a py-lmdb database of pickled dicts (only with allow_pickle)."""
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from torch_lmdb._source import ConversionError, _to_sample_value


class PickleLMDBSource:
    """A py-lmdb database whose values are pickled dicts (the design torch_lmdb
    replaces). Unpickling executes code from the file: only for trusted data."""

    format = "pickle-lmdb"
    group = None

    def __init__(self, path: str, skip_mismatched: bool, allow_pickle: bool = False):
        import lmdb

        self.path = path
        if not allow_pickle:
            raise ConversionError(f"converting '{path}' unpickles its values, which runs code stored in the file; "
                                  f"pass --allow-pickle (allow_pickle=True) only for a database you trust")
        if not os.path.exists(path):
            raise ConversionError(f"no LMDB database at '{path}'")
        try:
            self._env = lmdb.open(path, readonly=True, lock=False, subdir=os.path.isdir(path), readahead=False)
        except lmdb.Error as e:
            raise ConversionError(f"cannot open LMDB database '{path}': {e}") from None
        keys, skipped = [], []
        with self._env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if key.startswith(b"__") and key.endswith(b"__"):
                    skipped.append(key.decode("utf-8", "replace"))
                else:
                    keys.append(bytes(key))
        if keys and all(k.isdigit() for k in keys):
            keys.sort(key=int)  # "0", "1", ..., "10": numeric order, not byte order
            self.key_order = "numeric"
        else:
            self.key_order = "bytewise"
        self._keys = keys
        self.skipped = skipped
        self.num_samples = len(keys)
        self.block = 1024
        if not keys:
            raise ConversionError(f"'{path}' holds no samples")
        with self._env.begin() as txn:
            first = self._load(txn, 0)
        self.fields = {name: self._describe(v) for name, v in first.items()}

    @staticmethod
    def _describe(value: Any) -> Dict[str, Any]:
        if isinstance(value, np.ndarray):
            return {"dtype": str(value.dtype), "shape": list(value.shape)}
        return {"dtype": type(value).__name__, "shape": []}

    def _load(self, txn, i: int) -> Dict[str, Any]:
        import pickle

        try:
            value = pickle.loads(txn.get(self._keys[i]))
        except Exception as e:
            raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) does not unpickle: {e}") from None
        if not isinstance(value, dict):
            raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) holds a "
                                  f"{type(value).__name__}, expected a dict of field values")
        return value

    def read(self, start: int, stop: int, fields: Sequence[str]) -> Dict[str, List[Any]]:
        out: Dict[str, List[Any]] = {name: [] for name in fields}
        with self._env.begin() as txn:  # one read transaction per block
            for i in range(start, stop):
                sample = self._load(txn, i)
                for name in fields:
                    if name not in sample:
                        raise ConversionError(f"'{self.path}': key {self._keys[i]!r} (index {i}) has no field {name!r}")
                    out[name].append(_to_sample_value(name, sample[name]))
        return out

    @property
    def provenance(self) -> Dict[str, Any]:
        return {"attrs": {}, "skipped_keys": self.skipped, "key_order": self.key_order}
