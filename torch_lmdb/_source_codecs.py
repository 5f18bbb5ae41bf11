"""The torch_lmdb codec of each converted field: fixed, or the nearest to the
compressor of its source array (Zarr codecs, Blosc, HDF5 filters)."""
from typing import Any, Dict, List, Sequence

from torch_lmdb._source import ConversionError


# The source compressors (Zarr codec ids / Blosc cnames, HDF5 filters) and the
# nearest codec of torch_lmdb: the fast ones map to LZ4, the strong ones to Zstd.
_NEAREST_CODEC = {"lz4": "lz4", "lz4hc": "lz4", "blosclz": "lz4", "snappy": "lz4", "lzf": "lz4",
                  "zstd": "zstd", "zlib": "zstd", "gzip": "zstd", "bz2": "zstd", "lzma": "zstd", "szip": "zstd"}
# HDF5 registered filter ids: Blosc, LZ4, Zstd, bzip2 (h5py names gzip/lzf/szip itself).
_HDF5_FILTERS = {32001: "blosc", 32004: "lz4", 32015: "zstd", 307: "bz2"}
_BLOSC_CODES = ["blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd"]  # Blosc's compressor codes


def _codec_configs(array) -> List[Dict[str, Any]]:
    """The compressor configs of a Zarr array (format 2 or 3, zarr-python 2 or 3)."""
    codecs = []
    for attr in ("compressor", "compressors", "_values"):
        try:
            value = getattr(array, attr, None)
        except Exception:  # noqa: BLE001 -- zarr-python 3: `compressor` of a format 3 array raises
            value = None
        if attr == "_values" and value is not None:  # a ragged group: its values array
            return _codec_configs(value)
        if value is None:
            continue
        for codec in (value if isinstance(value, (list, tuple)) else [value]):
            config = None
            for method in ("get_config", "to_dict"):
                if callable(getattr(codec, method, None)):
                    try:
                        config = dict(getattr(codec, method)())
                    except Exception:  # noqa: BLE001 -- an unusual codec: described by its name below
                        config = None
                    break
            codecs.append(config if config is not None else {"id": type(codec).__name__.lower()})
    return codecs


def source_codec(array) -> str:
    """The torch_lmdb codec ("none", "lz4" or "zstd") nearest to the compressor
    of a source array: Blosc takes its inner compressor (lz4/blosclz/snappy ->
    lz4, zstd/zlib -> zstd), Zstd/LZ4 themselves, zlib/gzip/bz2/lzma/szip ->
    zstd, lzf -> lz4; "none" for an uncompressed array or an unknown compressor."""
    names: List[str] = []
    dataset = getattr(array, "_ds", None)  # _HDF5Array
    if dataset is not None:
        if dataset.compression:
            names.append(str(dataset.compression))
        for fid, options in (getattr(dataset, "_filters", None) or {}).items():
            try:
                name = _HDF5_FILTERS.get(int(fid))
            except (TypeError, ValueError):
                name = str(fid)
            if name == "blosc":  # cd_values[6] is Blosc's compressor code
                code = options[6] if isinstance(options, (list, tuple)) and len(options) > 6 else 0
                name = _BLOSC_CODES[code] if 0 <= int(code) < len(_BLOSC_CODES) else "lz4"
            if name:
                names.append(name)
    else:
        for config in _codec_configs(array):
            codec_id = str(config.get("id") or config.get("name") or "").lower().rsplit(".", 1)[-1]
            inner = config.get("cname") or (config.get("configuration") or {}).get("cname")
            names.append(str(getattr(inner, "value", inner)).lower() if codec_id == "blosc" and inner else codec_id)
    for name in names:
        if name in _NEAREST_CODEC:
            return _NEAREST_CODEC[name]
    return "none"


COMPRESSIONS = ("lz4", "zstd", "none", "source")


def source_compression(source, fields: Sequence[str], compression: str = "lz4") -> Dict[str, str]:
    """The codec of each of ``fields`` of an open source (``compression=`` of LMDBWriter):
    "lz4" (the default: README advises it for data read every epoch), "zstd" and "none"
    apply to every field; "source" (or its alias "auto") follows each array's compressor (see
    source_codec; a pickle-in-LMDB source has none)."""
    if compression in ("source", "auto"):
        arrays = getattr(source, "_arrays", {})
        return {name: source_codec(arrays[name]) if name in arrays else "none" for name in fields}
    if compression not in COMPRESSIONS:
        raise ConversionError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    return {name: compression for name in fields}
