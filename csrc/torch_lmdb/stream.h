// torch_lmdb/stream.h -- an epoch of batches read ahead by C++ threads.
//
// Contract
// - A BatchStream yields the batches of one epoch, in order: the epoch's
//   global sample order is drawn when the stream is created (sequential,
//   shuffled, or block-shuffled) from (`seed`, `epoch`) alone
//   (epoch_seed()), so they give the same batches on every platform and with
//   any number of threads.
// - Ranks (distributed training): the global order is consumed in global
//   steps of batch_size * world_size samples; rank r takes the r-th
//   batch_size slice of each step. The remainder after the full steps (fewer
//   than batch_size * world_size samples) is split into world_size
//   contiguous parts whose sizes differ by at most one, one last batch per
//   rank; when that remainder holds fewer samples than there are ranks, a
//   rank left without one gets a batch of one sample repeated from the start
//   of the order (the only case where a sample is seen twice in an epoch).
//   With drop_last the remainder is skipped. So every rank has the same
//   number of batches, and over all ranks each sample of the epoch is read
//   exactly once (except the repetition above, and the drop_last tail).
// - Position and resumption: `start` is a global position (samples of the
//   global order already consumed by all ranks together); the stream reads
//   the steps from there (the remaining samples re-split across the ranks of
//   this world size). position() is the global position after the batches
//   next() returned so far, the same on every rank of a run whose ranks
//   advance in step (as DDP training does): a stream created with
//   start = position() and the same seed and epoch, on any world size, reads
//   exactly the samples not yet read. Creating a stream at any start costs
//   the same (the order is drawn, nothing is read or replayed).
// - Reader threads read batches ahead with Reader::read_batch (one read txn,
//   one copy per sample into the batch); at most `batches_ahead` batches are read
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
#include "torch_lmdb/mixture.h"
#include "torch_lmdb/selection.h"

namespace torch_lmdb {

namespace detail {
class ShardWindows;  // a staged dataset read in shard windows (internal)
}  // namespace detail

enum class SampleOrder {
  Sequential,  ///< 0, 1, ..., n-1
  Shuffle,     ///< a uniformly random permutation
  /// Contiguous blocks of `block_size` samples in random order, samples
  /// shuffled within each window of `window_blocks` consecutive blocks:
  /// reads stay within a few key ranges at a time (cursor- and
  /// OS-readahead-friendly when the data is larger than RAM).
  BlockShuffle,
};

struct StreamOptions {
  size_t batch_size = 256;
  SampleOrder order = SampleOrder::Shuffle;
  uint64_t seed = 0;
  /// Drop the last batch when it is smaller than batch_size.
  bool drop_last = false;
  /// Finished batches queued ahead of the consumer (>= 1; bounds the
  /// memory in flight).
  size_t batches_ahead = 2;
  /// Reader threads (>= 1).
  size_t threads = 1;
  /// BlockShuffle: samples per block and blocks per shuffle window.
  size_t block_size = 1024;
  size_t window_blocks = 4;
  /// Padding of variable-shape fields (its `allocate` must be thread-safe).
  BatchOptions batch;
  /// The epoch: the order is drawn from epoch_seed(seed, epoch).
  uint64_t epoch = 0;
  /// This reader's rank among world_size ranks (rank < world_size).
  size_t rank = 0;
  size_t world_size = 1;
  /// Global position to start from (0 <= start <= number of samples).
  size_t start = 0;
  /// Read only these samples (selection.h): the order, the ranks and the
  /// positions are over the selection's positions, each mapped to its
  /// sample index when read. Unset: every sample of the reader.
  std::optional<Selection> selection;
  /// Read a mixture's global stream (mixture.h) instead: the epoch has the
  /// mixture's epoch_size positions, position i reads what MixtureOrder(rule,
  /// seed, epoch) locates for i (each source shuffled unless `order` is
  /// Sequential; BlockShuffle is a ValueError), and every batch gets an int64
  /// tensor "source" (the source index of each sample). Ranks, positions and
  /// resumption work as for any epoch. `selection` must then be unset.
  std::optional<MixtureSource> mixture;
};

/// The seed of an epoch's order: seed + epoch * 0x9E3779B97F4A7C15 (mod 2^64),
/// so epoch 0 uses `seed` itself. Python's make_loader uses the same rule.
uint64_t epoch_seed(uint64_t seed, uint64_t epoch) noexcept;

/// Where rank `rank`'s batches lie in an epoch's global order (see the
/// contract above): batch k is the slice [first[k], first[k] + count[k]) of
/// the order, or, when `count[k]` is 0, the one padding position pad[k];
/// position_after[k] is the global position once every rank has read k + 1
/// batches. Throws ValueError for a rank >= world_size, a zero world_size or
/// batch_size, or start > n.
struct RankPlan {
  std::vector<size_t> first, count, position_after;
  size_t pad_index = 0;  // the order position repeated by an empty tail share
  size_t size() const noexcept { return first.size(); }
};
RankPlan rank_plan(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last);

/// One batch of rank_plan() alone, in O(1) (what a loader over an epoch of
/// 1e8 positions needs instead of the whole plan): rank_batches() is
/// rank_plan(...).size(); rank_batch(..., k) is batch k: {first[k], count[k],
/// position_after[k], pad_index (meaningful when count is 0)}. Same checks as
/// rank_plan, and IndexError for k >= rank_batches().
struct RankBatch {
  size_t first = 0, count = 0, position_after = 0, pad_index = 0;
};
size_t rank_batches(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last);
RankBatch rank_batch(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last,
                     size_t k);

/// The sample order of one epoch over `n` samples (what BatchStream reads).
/// Deterministic for a seed: it uses mt19937_64 and its own bounded draws,
/// not the implementation-defined std::shuffle.
std::vector<size_t> sample_order(size_t n, SampleOrder order, uint64_t seed, size_t block_size = 1024,
                                 size_t window_blocks = 4);

class BatchStream {
 public:
  /// Starts the reader threads. Throws ValueError for a zero batch_size,
  /// batches_ahead, threads, block_size, window_blocks or world_size, a rank >=
  /// world_size, or a start past the number of samples; IndexError for a
  /// mixture source or selection reaching past the reader's samples.
  /// Creating a stream costs O(1) in the epoch's size with a mixture (the
  /// rank's batches are computed as they are read), O(n) otherwise (the
  /// order is drawn).
  BatchStream(Reader reader, StreamOptions options);
  /// A staged dataset read in shard windows (make_loader makes these): the
  /// order is the windows' (Sequential or Shuffle; BlockShuffle, a selection
  /// and a mixture are ValueErrors); everything else as above.
  BatchStream(std::shared_ptr<detail::ShardWindows> windows, StreamOptions options);
  ~BatchStream();
  BatchStream(const BatchStream&) = delete;
  BatchStream& operator=(const BatchStream&) = delete;

  /// The next batch, or nullopt after the last one. Blocks until it is read.
  std::optional<Batch> next();
  /// Batches of this rank in this epoch (from `start`).
  size_t size() const noexcept;
  /// The sample indices of batch `k` (k < size()), selection mapped.
  std::vector<size_t> batch_indices(size_t k) const;
  /// The global position after the batches next() has returned (`start`
  /// before the first; the number of samples after the last, or with
  /// drop_last the end of the last full step). Thread-safe.
  size_t position() const;
  /// Batches next() has returned.
  size_t delivered() const;
  /// Samples of the epoch (the selection's size, else the reader's size when
  /// the stream was created).
  size_t num_samples() const noexcept;

  struct State;

 private:
  void start_threads();
  std::shared_ptr<State> state_;
};

}  // namespace torch_lmdb
