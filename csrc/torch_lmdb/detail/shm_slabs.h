// torch_lmdb/detail/shm_slabs.h -- recycled shared-memory buffers ("slabs") that
// carry batches from DataLoader worker processes to the process that receives
// them, without a copy and without a new shared-memory object per batch.
//
// Why: a fresh shared-memory tensor costs a page fault and a zeroed page per
// 4 KiB (~3.7 ms per 4 MiB here, more than reading the batch) and an fd sent
// over a socket. A worker instead keeps a few memfd slabs, writes each batch
// tensor into a free one and sends a small SlabTicket; the receiver maps each
// slab once and wraps it in a tensor; when that tensor dies the slab is free
// for the worker again.
//
// Ownership (the whole point): a slab is reused only when no process holds a
// tensor of its current contents. Its header (first page, shared by every
// process that maps it) holds one 64-bit word:
//   generation (bits 16..63) | pending sends (bits 8..15) | claimed (bit 1) | producer holds (bit 0)
// and every transition is a compare-and-swap that names the generation it
// expects, so a stale release (an older tensor of a slab that has since been
// reused) changes nothing.
//   - SlabPool::allocate takes a free slab (all low bits 0), increments the
//     generation and sets "producer holds". The returned tensor's storage is
//     the slab; its deleter clears "producer holds" for that generation.
//   - SlabPool::send (the producer pickles a tensor of the slab) adds a
//     pending send and returns the ticket: (pid, slab, generation, view).
//   - SlabReceiver::receive turns a pending send into "claimed" and returns a
//     tensor whose storage is the slab. Its deleter clears "claimed" for that
//     generation, and only in the process that received it.
//   - The slab is free again when the producer's tensors, every pending send
//     and the receiver's tensors are gone.
//
// Fork rules: deleters compare getpid() with the process that made the
// tensor; in a forked child (which inherits tensors, and drops them at
// will) they release nothing, so a child can never free a slab its parent
// still holds. A pool belongs to the process that created it: in a forked
// child allocate() throws and send() returns nullopt (the caller then falls
// back to an ordinary copy); make a new pool there. SlabReceiver::instance()
// is replaced by a fresh, empty registry in a forked child (its lock may have
// been held by another thread at the fork); tensors the child inherited keep
// their mappings.
//
// Thread safety: every method of SlabPool and SlabReceiver may be called from
// any thread. Deleters take no lock (atomics only), so they are safe at exit
// and in forked children.
//
// Errors: c10::Error (RuntimeError in Python) for system failures
// (memfd_create, mmap, fstat) and for tickets that cannot be honoured (a slab
// never attached, a generation already released or reused, a slab claimed
// by another process, a view outside the slab); c10::ValueError for a
// malformed ticket. A failed receive claims nothing.
#pragma once

#include <ATen/ATen.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace torch_lmdb {

/// What crosses from the producer to the receiver for one tensor of a slab.
struct SlabTicket {
  int64_t pid = 0;          ///< the producing process
  size_t slab = 0;          ///< the slab's id in the producer's pool
  uint64_t generation = 0;  ///< the slab contents' generation
  /// The slab's memfd on the slab's first send, else -1. Owned by the pool
  /// (valid while the pool lives): dup() it to pass it on.
  int fd = -1;
  size_t nbytes = 0;  ///< bytes of the tensor's storage (from the slab's data start)
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t storage_offset = 0;  ///< in elements
  at::ScalarType dtype = at::kByte;
};

/// The producer side: the slabs of one process.
class SlabPool {
 public:
  /// At most `max_slabs` slabs (each sized for the first tensor put in it,
  /// rounded up to 1 MiB, and reused for tensors of at least half its size).
  explicit SlabPool(size_t max_slabs);
  /// Unmaps the pool's view of its slabs; tensors still alive keep theirs.
  ~SlabPool();
  SlabPool(const SlabPool&) = delete;
  SlabPool& operator=(const SlabPool&) = delete;

  /// A contiguous tensor of `shape` and `dtype` whose storage is a free slab
  /// (now held by this process), or an undefined tensor when every slab is
  /// busy and the pool is full (or a new slab cannot be made): the caller
  /// allocates elsewhere. A zero-byte tensor is an ordinary empty tensor.
  /// Throws in a process other than the pool's.
  at::Tensor allocate(at::IntArrayRef shape, at::ScalarType dtype);

  /// The ticket for `tensor` if its storage is a slab of this pool and this
  /// is the pool's process (a pending send is recorded: the slab stays busy
  /// until the ticket is received and released); nullopt otherwise, and for
  /// tensors a ticket cannot describe (conjugate/negative views, 255 sends
  /// pending).
  std::optional<SlabTicket> send(const at::Tensor& tensor);

  /// Whether `tensor`'s storage is a slab of this pool.
  bool owns(const at::Tensor& tensor) const;

  /// Slabs made so far.
  size_t size() const;
  /// Slabs not free (held, pending or claimed somewhere).
  size_t busy() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

/// The receiving side: every slab mapped by this process, by (pid, slab).
class SlabReceiver {
 public:
  SlabReceiver();
  ~SlabReceiver();
  SlabReceiver(const SlabReceiver&) = delete;
  SlabReceiver& operator=(const SlabReceiver&) = delete;

  /// The process-wide receiver (never destroyed: deleters may run at exit).
  static SlabReceiver& instance();

  /// Maps the slab `slab` of process `pid` from `fd` (a ticket's fd, dup'd
  /// by whoever carried it). Takes ownership of `fd`: it is closed, also on
  /// error. Forgets slabs of producers that have exited (tensors keep their
  /// mappings).
  void attach(int64_t pid, size_t slab, int fd);

  /// A tensor viewing the ticket's slab; see the header comment for the
  /// claim. Several tickets of one generation received while a tensor of it
  /// is alive share one storage.
  at::Tensor receive(const SlabTicket& ticket);

  /// Slabs mapped (a diagnostic).
  size_t size() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace torch_lmdb
