"""Collation in Python: ``<name>_lengths`` of padded fields, and stacking
per-sample tensors (``LMDBDataset.collate``) as the C++ batch does."""
from typing import Any, Dict, List, Sequence

import torch


def _equal_lengths(batch: torch.Tensor) -> torch.Tensor:
    """``<name>_lengths`` (int64 [B, ndim]) of a batch whose samples share one shape."""
    return torch.tensor(batch.shape[1:], dtype=torch.int64).repeat(batch.shape[0], 1)


def _with_lengths(batch: Dict[str, Any], padded: Sequence[str]) -> Dict[str, Any]:
    """``batch`` with ``<name>_lengths`` for every padded field (after its field),
    where the batch's shapes were equal and C++ added none."""
    missing = [name for name in padded if name + "_lengths" not in batch and name in batch]
    if not missing:
        return batch
    out = {}
    for name, value in batch.items():
        out[name] = value
        if name in missing:
            out[name + "_lengths"] = _equal_lengths(value)
    return out


def _stack(name: str, values: List[torch.Tensor], pad: bool, pad_value: float):
    """(batch, lengths or None): ``values`` stacked, padded to the largest
    shape when they differ and ``pad``; lengths only for a padded batch."""
    first = values[0]
    for i, v in enumerate(values):
        if v.dim() != first.dim() or (v.shape != first.shape and not pad):
            raise ValueError(f"field '{name}' has shape {list(v.shape)} in sample {i} of the batch but "
                             f"{list(first.shape)} in sample 0; pass pad=True (or pad=[names]) to the "
                             f"LMDBDataset to pad it")
    if all(v.shape == first.shape for v in values):
        return torch.stack(values), None
    shape = [max(sizes) for sizes in zip(*(v.shape for v in values))]
    out = torch.full([len(values), *shape], pad_value, dtype=first.dtype)
    for slot, v in zip(out, values):
        slot[tuple(slice(0, n) for n in v.shape)] = v
    return out, torch.tensor([list(v.shape) for v in values], dtype=torch.int64).reshape(len(values), first.dim())
