"""The transport of DataLoader worker batches: tensors in recycled shared-memory slabs.

``LMDBDataset.get_batch`` inside a worker reads into this worker's slabs
(:func:`_worker_get_batch`); pickling such a tensor to the main process sends a
ticket instead of its bytes (:func:`_reduce_tensor`, :func:`_rebuild_slab_tensor`).
"""
import math
import os
from typing import Any, List

import torch

from torch_lmdb import _C


def _alloc_shared(shape: List[int], dtype_name: str) -> torch.Tensor:
    """Allocates a batch tensor in shared memory (used inside DataLoader workers,
    so the batch crosses to the main process without another copy)."""
    dtype = getattr(torch, dtype_name)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype).storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


# Batch tensors travel through recycled slabs (csrc/torch_lmdb/detail/shm_slabs.h),
# small ones too: a fresh shared-memory tensor costs page faults and an fd
# passed over a socket per batch. Inside a worker, ds[list] returns ordinary
# torch.Tensors whose storage is a slab, so collate_fns, wrapper datasets and
# transforms work on them as on any tensor; when such a tensor (or a view of
# it) is pickled to the main process, the reducer below sends a ticket
# (pid, slab, generation, view) instead of its bytes. Every other tensor goes
# through torch's own reducer. A slab is reused only once neither the worker
# nor the process that received it holds a tensor of it (the generation in its
# header makes stale releases harmless; releases happen only in the process
# that made or received the tensor, never in a forked child). When all of a
# worker's slabs are busy, fresh shared memory takes over.
_SLABS_PER_WORKER = 32
_slab_pool = None  # this worker process's pool: (pid, SlabPool)
_torch_reduce_tensor = None  # torch's ForkingPickler reducer of torch.Tensor


def _worker_slabs():
    global _slab_pool
    if _slab_pool is None or _slab_pool[0] != os.getpid():
        _slab_pool = (os.getpid(), _C.SlabPool(_SLABS_PER_WORKER))
        _install_reducer()
    return _slab_pool[1]


def _install_reducer() -> None:
    """Registers _reduce_tensor with ForkingPickler (what DataLoader queues
    pickle with) in this worker, after torch.multiprocessing registered its own."""
    global _torch_reduce_tensor
    import torch.multiprocessing  # noqa: F401  (registers torch's reducers first)
    from multiprocessing.reduction import ForkingPickler

    current = ForkingPickler._extra_reducers.get(torch.Tensor)
    if current is not _reduce_tensor:
        _torch_reduce_tensor = current
        ForkingPickler.register(torch.Tensor, _reduce_tensor)


def _reduce_tensor(tensor: torch.Tensor):
    pool = _slab_pool
    if pool is not None and pool[0] == os.getpid() and not tensor.requires_grad:
        ticket = pool[1].send(tensor)
        if ticket is not None:
            from multiprocessing.reduction import DupFd

            pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name = ticket
            fd = DupFd(fd) if fd >= 0 else None  # once per slab
            return (_rebuild_slab_tensor, (pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name))
    if _torch_reduce_tensor is None:
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(tensor)
    return _torch_reduce_tensor(tensor)


def _rebuild_slab_tensor(pid, slab, generation, fd, nbytes, sizes, strides, offset, dtype_name):
    """Runs in the receiving (main) process when a worker's batch is unpickled."""
    if fd is not None:
        _C.slab_attach(pid, slab, fd.detach())
    return _C.slab_receive(pid, slab, generation, nbytes, sizes, strides, offset, dtype_name)


def _is_slab_tensor(tensor: Any) -> bool:
    """Whether ``tensor``'s storage is one of this worker's slabs (a diagnostic)."""
    pool = _slab_pool
    return isinstance(tensor, torch.Tensor) and pool is not None and pool[0] == os.getpid() and pool[1].owns(tensor)


def _worker_get_batch(reader, idx, pad_all, pad_fields, pad_value):
    """get_batch inside a DataLoader worker: tensors go into recycled slabs
    (allocated in C++), else into fresh shared memory; nothing is copied again."""
    return reader.get_batch(idx, pad_all, pad_fields, pad_value, _alloc_shared, _worker_slabs())
