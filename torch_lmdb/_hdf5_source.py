"""The conversion source of an HDF5 file (no file outside it is read unless allowed)."""
import os
from typing import List, Tuple

import numpy as np

from torch_lmdb._source import ConversionError, _ArraySource, _plain


class HDF5Source(_ArraySource):
    format = "hdf5"

    def _walk(self):
        import h5py

        try:
            self._file = h5py.File(self.path, "r")
        except Exception as e:
            raise ConversionError(f"cannot open HDF5 file '{self.path}': {e}") from None
        arrays, attrs = {}, {}

        def visit(name, obj):
            if obj.attrs:
                attrs[name] = _plain({k: obj.attrs[k] for k in obj.attrs})
            if isinstance(obj, h5py.Dataset):
                self._refuse_external(name, self._outside_files(obj))
                arrays[name] = _HDF5Array(obj)

        if self._file.attrs:
            attrs["/"] = _plain({k: self._file.attrs[k] for k in self._file.attrs})
        self._file.visititems(visit)
        for name, target in self._external_links():  # visititems does not follow them
            self._refuse_external(name, [target])
            obj = self._file[name]
            visit(name, obj)
            if isinstance(obj, h5py.Group):
                obj.visititems(lambda inner, o: visit(f"{name}/{inner}", o))
        return arrays, attrs

    def _external_links(self) -> List[Tuple[str, str]]:
        """(link path, target file) of every external link in the file."""
        import h5py

        links: List[Tuple[str, str]] = []

        def add(name, info):
            if info.type == h5py.h5l.TYPE_EXTERNAL:
                name = name.decode("utf-8", "replace")
                links.append((name, self._file.get(name, getlink=True).filename))

        self._file.id.links.visit(add, info=True)
        return sorted(links)

    def _outside_files(self, dataset) -> List[str]:
        """The files other than the source that hold ``dataset``'s data: external storage
        (``external=``) and the sources of a virtual dataset."""
        files = [name for name, _, _ in dataset.external or []]
        if dataset.is_virtual:
            here = os.path.realpath(self.path)
            for source in dataset.virtual_sources():
                target = os.path.join(os.path.dirname(here), source.file_name)
                if source.file_name != "." and os.path.realpath(target) != here:
                    files.append(source.file_name)
        return files

    def _refuse_external(self, name: str, files: List[str]) -> None:
        if files and not self.allow_external:
            raise ConversionError(f"'{self.path}': '{name}' reads the file(s) {', '.join(map(repr, files))} outside "
                                  f"the source (external storage, external link or virtual dataset); pass "
                                  f"--allow-external (allow_external=True) only for a source you trust")

class _HDF5Array:
    """An h5py dataset with variable-length and string types as numpy objects."""

    def __init__(self, dataset):
        import h5py

        self._ds = dataset
        self.shape = dataset.shape
        self.chunks = dataset.chunks
        self._string = h5py.check_string_dtype(dataset.dtype)
        vlen = h5py.check_vlen_dtype(dataset.dtype)
        self.dtype = np.dtype(object) if (vlen is not None and self._string is None) else dataset.dtype
        if self._string is not None and self._string.length is None:
            self.dtype = np.dtype(object)

    def __getitem__(self, key):
        if self._string is not None and self._string.encoding == "utf-8":
            return self._ds.asstr()[key]
        return self._ds[key]
