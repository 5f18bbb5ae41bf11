"""Split stores: which top-level groups of a Zarr store or HDF5 file are splits
(``train/``, ``val/``, ... with the same arrays) and the database name of each."""
import re
from collections import Counter
from typing import Any, Dict, List, Optional


def _sample_count(arrays: Dict[str, Any]) -> Optional[int]:
    """The first dimension most arrays share (ties: the larger); None if no array has one."""
    lengths = Counter(a.shape[0] for a in arrays.values() if len(a.shape) >= 1)
    if not lengths:
        return None
    return max(lengths.items(), key=lambda kv: (kv[1], kv[0]))[0]


# Group names that make a store a split store even when its groups have equal sample counts.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval",
                         "evaluation", "holdout"})


def find_splits(arrays: Dict[str, Any]) -> List[str]:
    """The split groups of a store, given its arrays by path (``group/.../name``); [] for a
    store that is one dataset.

    Splits are the top-level groups that hold the same set of array paths (relative to
    the group), at least two of them, provided no array outside them has a first
    dimension equal to a split's sample count (the root then holds per-sample arrays:
    one dataset whose groups are fields), and the splits either differ in sample count or
    are all named like splits (``train``, ``val``, ``test``, ...; see ``SPLIT_NAMES``).
    Groups holding another set of arrays (e.g. ``meta/``) are not splits.
    """
    groups: Dict[str, Dict[str, Any]] = {}
    for name, array in arrays.items():
        if "/" in name:
            top, rel = name.split("/", 1)
            groups.setdefault(top, {})[rel] = array
    by_names: Dict[frozenset, List[str]] = {}
    for top, members in groups.items():
        by_names.setdefault(frozenset(members), []).append(top)
    if not by_names:
        return []
    names, tops = max(by_names.items(), key=lambda kv: (len(kv[1]), len(kv[0])))
    if len(tops) < 2:
        return []
    counts = {top: _sample_count(groups[top]) for top in tops}
    if any(c is None for c in counts.values()):
        return []
    outside = [a for name, a in arrays.items() if name.split("/", 1)[0] not in counts or "/" not in name]
    if any(len(a.shape) >= 1 and a.shape[0] in counts.values() for a in outside):
        return []
    if len(set(counts.values())) == 1 and not all(t.lower() in SPLIT_NAMES for t in tops):
        return []
    return sorted(tops)


def _group_paths(arrays: Dict[str, Any]) -> List[str]:
    """Every group path that holds arrays (at any depth)."""
    out = set()
    for name in arrays:
        parts = name.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            out.add("/".join(parts[:k]))
    return sorted(out)


def split_file_name(group: str) -> str:
    """The database name of a split: ``train`` -> ``train.lmdb``; the ``/`` of a nested
    group becomes ``__`` (``2024/train`` -> ``2024__train.lmdb``) and characters other than
    letters, digits, ``.``, ``-``, ``_`` become ``_``."""
    name = "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in group.strip("/").split("/"))
    if name.strip(".") == "":
        name = "_" + name
    return name + ".lmdb"
