"""The conversion source of a Zarr store (reading through torch_lmdb._zarr's checks)."""
import os
from typing import Any, Dict, Optional, Tuple

from torch_lmdb._source import ConversionError, _ArraySource, _plain


class ZarrSource(_ArraySource):
    """Zarr stores of format 2 and 3, through zarr-python 2.x or 3.x (see torch_lmdb._zarr).

    Every metadata file is checked as zarr reads it (see _zarr.open_store): corrupt JSON,
    a FIFO or an oversized file names the file, and an array with the Pickle codec is
    refused before any chunk is read unless ``allow_pickle``. A group with the attribute ``"ragged": true`` (``values`` +
    ``offsets``) is one ragged field.
    """

    format = "zarr"

    def _walk(self):
        import warnings

        import zarr

        from torch_lmdb import _zarr

        # zarr 3 warns on every open that vlen-utf8 / vlen-bytes are "not part of the v3 spec" yet.
        warnings.filterwarnings("ignore", message=r".*not part in the Zarr format 3 specification", category=UserWarning)
        try:
            return self._visit_store(zarr, _zarr)
        except _zarr.StoreError as e:
            raise ConversionError(str(e)) from None

    def _visit_store(self, zarr, _zarr):
        try:
            root = _zarr.open_store(self.path, self.allow_pickle)
        except _zarr.StoreError:
            raise
        except Exception as e:  # zarr raises several types for a missing/invalid store
            raise ConversionError(f"cannot open Zarr store '{self.path}': {type(e).__name__}: {e}") from None
        arrays, attrs = {}, {}
        self.within = None if isinstance(root, zarr.Array) else self._enclosing_store(_zarr)
        if isinstance(root, zarr.Array):
            name = os.path.splitext(os.path.basename(self.path.rstrip("/")))[0]
            arrays[name] = _zarr.readable(_zarr.checked(self.path, name, root, self.allow_pickle))
            return arrays, attrs

        def visit(group, prefix):
            group_attrs = dict(group.attrs.asdict())
            if group_attrs:
                attrs[prefix or "/"] = _plain(group_attrs)
            for name, array in sorted(group.arrays(), key=lambda kv: kv[0]):
                path = f"{prefix}{name}"
                arrays[path] = _zarr.readable(_zarr.checked(self.path, path, array, self.allow_pickle))
                if array.attrs.asdict():
                    attrs[path] = _plain(dict(array.attrs.asdict()))
            for name, sub in sorted(group.groups(), key=lambda kv: kv[0]):
                sub_attrs = dict(sub.attrs.asdict())
                if sub_attrs.get("ragged") is True:
                    path = f"{prefix}{name}"
                    for part in ("values", "offsets"):
                        if part in sub:
                            _zarr.checked(self.path, f"{path}/{part}", sub[part], self.allow_pickle)
                    try:
                        arrays[path] = _zarr.RaggedArray(sub, path)
                    except _zarr.StoreError as e:
                        raise ConversionError(f"'{self.path}': {e}") from None
                    attrs[path] = _plain(sub_attrs)
                else:
                    visit(sub, f"{prefix}{name}/")

        visit(root, "")
        return arrays, attrs


    def _enclosing_store(self, _zarr) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``within`` for a local group path whose parent directories are Zarr groups."""
        here = os.path.abspath(self.path)
        root, parent = None, os.path.dirname(here)
        while parent != os.path.dirname(parent) and any(os.path.isfile(os.path.join(parent, name))
                                                        for name in (".zgroup", "zarr.json")):
            root, parent = parent, os.path.dirname(parent)
        if root is None:
            return None
        attrs = _zarr.open_store(root, self.allow_pickle).attrs.asdict()
        return os.path.relpath(here, root).replace(os.sep, "/"), _plain(dict(attrs))
