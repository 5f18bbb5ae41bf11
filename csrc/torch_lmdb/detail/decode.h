// torch_lmdb/detail/decode.h -- internal: the memory batches are decoded into and the
// threads that decode them (Reader::read_batch). Not installed.
//
// Contract
// - BufferPool keeps freed batch buffers for reuse, bounded by bytes: a
//   recycled buffer is already paged in, a fresh one costs a page fault per
//   4 KiB. Tensors hold a shared_ptr to the pool through their deleter, so a
//   buffer released after the Reader is gone is simply freed. The data start
//   is placed half a page away from where the source records sit within
//   their pages: a destination a few bytes ahead of the source modulo 4 KiB
//   (4K aliasing) makes memcpy about 2.5x slower on x86.
// - DecodePool: helper threads that decode batches beside the threads
//   calling read_batch. One pool per process, made on first use with up to
//   kMaxHelpers threads, which then wait for work until the process ends
//   (they hold no Reader state). A forked child makes its own: the parent's
//   threads do not exist in it, and the inherited object (whose mutex
//   another thread may have held at the fork) is never touched again.
//   A Job runs fn(0), fn(1), ... of items the caller publishes while it goes
//   on (a batch's payloads, decoded as soon as their records are parsed):
//   the helpers take published items, and finish() makes the caller take the
//   rest and wait for all. A Job never leaves a helper running after its
//   destructor returns.
// - Thread safety: every member of BufferPool, DecodePool and Job may be
//   called from any thread (a Job by the thread that made it).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/reader.h"

namespace torch_lmdb {
namespace detail {

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr size_t kMinBytes = size_t{64} << 10;
  static constexpr size_t kPage = 4096;
  explicit BufferPool(size_t capacity) : capacity_(capacity) {}
  ~BufferPool();

  /// An uninitialised tensor; `source` points at the first sample's data
  /// (for the placement above). Buffers under kMinBytes are not pooled.
  at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype, const void* source);

 private:
  void* take(size_t capacity);
  void give(void* p, size_t capacity);

  const size_t capacity_;
  std::mutex mutex_;
  size_t cached_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

class DecodePool {
 public:
  static constexpr unsigned kMaxHelpers = 3;

  class Job {
   public:
    /// `helpers` pool threads (at most kMaxHelpers) run fn on published items.
    Job(unsigned helpers, std::function<void(size_t)> fn);
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;
    /// Items 0 .. n - 1 are ready (n only grows).
    void publish(size_t n);
    /// No more items: runs what is left on this thread, waits for the
    /// helpers, rethrows the first failure.
    void finish();
    /// Never leaves a helper writing after the caller moved on (an exception
    /// in the caller: its buffers and transactions are about to go).
    ~Job();

   private:
    friend class DecodePool;  // its queue holds Tasks
    struct Task;
    void close_and_wait();
    std::shared_ptr<Task> task_;
    bool finished_ = false;
  };

 private:
  static DecodePool& get();
  void work();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job::Task>> queue_;
  unsigned threads_ = 0;
};

/// Decodes a payload into its batch slot. `around_cache`: a raw payload of
/// 4 KiB or more is copied with non-temporal stores, which write memory
/// without first reading the destination's lines into the cache (a batch
/// read ahead of its use is not read back soon: caching it only evicts the
/// records still to be read).
void decode_to_slot(const FieldView& v, char* dst, bool around_cache);

/// A payload of a record being copied, and where it goes.
struct CopySpan {
  const char* src;
  size_t size;
  char* dst;
};

/// XXH3_64bits of [body, body + size) (a record's checksummed body), copying
/// each span to its `dst` on the way: with AVX2 or AVX-512 (picked at run
/// time) in one pass that reads every byte of the body from memory once,
/// otherwise hashing, then copying. Spans that are not sorted by `src`,
/// disjoint and inside the body are copied after the hash. Every span is
/// copied whatever the hash; the caller compares it before using them.
uint64_t hash_and_copy(const char* body, size_t size, const CopySpan* spans, size_t n) noexcept;
/// Whether hash_and_copy() takes one pass on this CPU.
bool hash_and_copy_is_one_pass() noexcept;

/// Decoding threads of a batch (see ReaderOptions::decode_threads).
unsigned decode_threads(const ReaderOptions& r, const BatchOptions& b);

}  // namespace detail
}  // namespace torch_lmdb
