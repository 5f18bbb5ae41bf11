// torch_lmdb/stream.h -- an epoch of batches read ahead by C++ threads.
//
// Contract
// - A BatchStream yields the batches of one epoch, in order: the sample
//   order is drawn when the stream is created (sequential, shuffled, or
//   block-shuffled) from `seed` alone, so a seed gives the same batches on
//   every platform and with any number of threads.
// - Reader threads read batches ahead with Reader::read_batch (one read txn,
//   one copy per sample into the batch); at most `prefetch` batches are read
//   but not yet taken by next(), which bounds the memory in flight. The
//   caller's thread does no reading: its work (the training step) overlaps
//   the reads.
// - Errors of a reader thread (a corrupted record, ...) are raised by the
//   next() that would have returned that batch; the stream is then finished.
// - next() is for one consumer thread. The threads end with the epoch: the
//   next() that returns the last batch (or raises, or returns nullopt) joins
//   them; the destructor stops and joins them when the epoch is left early.
//   Neither throws for that. A stream must not be used in a forked
//   child (next() raises c10::Error there; the child never joins the
//   parent's threads).
// - Batches are independent tensors: they stay valid after the stream ends.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "torch_lmdb/reader.h"

namespace torch_lmdb {

enum class SampleOrder {
  Sequential,  ///< 0, 1, ..., n-1
  Shuffle,     ///< a uniformly random permutation
  /// Contiguous blocks of `block_size` samples in random order, samples
  /// shuffled within each window of `window_blocks` consecutive blocks:
  /// reads stay within a few key ranges at a time (cursor- and
  /// readahead-friendly when the data is larger than RAM).
  BlockShuffle,
};

struct StreamOptions {
  size_t batch_size = 256;
  SampleOrder order = SampleOrder::Shuffle;
  uint64_t seed = 0;
  /// Drop the last batch when it is smaller than batch_size.
  bool drop_last = false;
  /// Batches read ahead of the consumer (>= 1).
  size_t prefetch = 2;
  /// Reader threads (>= 1).
  size_t threads = 1;
  /// BlockShuffle: samples per block and blocks per shuffle window.
  size_t block_size = 1024;
  size_t window_blocks = 4;
  /// Padding of variable-shape fields (its `allocate` must be thread-safe).
  BatchOptions batch;
};

/// The sample order of one epoch over `n` samples (what BatchStream reads).
/// Deterministic for a seed: it uses mt19937_64 and its own bounded draws,
/// not the implementation-defined std::shuffle.
std::vector<size_t> sample_order(size_t n, SampleOrder order, uint64_t seed, size_t block_size = 1024,
                                 size_t window_blocks = 4);

class BatchStream {
 public:
  /// Starts the reader threads. Throws ValueError for a zero batch_size,
  /// prefetch, threads, block_size or window_blocks.
  BatchStream(Reader reader, StreamOptions options);
  ~BatchStream();
  BatchStream(const BatchStream&) = delete;
  BatchStream& operator=(const BatchStream&) = delete;

  /// The next batch, or nullopt after the last one. Blocks until it is read.
  std::optional<Batch> next();
  /// Batches in this epoch.
  size_t size() const noexcept;
  /// The sample indices of batch `k` (k < size()).
  std::vector<size_t> batch_indices(size_t k) const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace torch_lmdb
