// torch_lmdb/detail/windows.h -- internal: a staged dataset larger than its
// cache, read a window of shards at a time (the native loader's shard
// windows; Python's ShardWindowDataset uses the same rules through _C). Not
// installed.
//
// Contract
// - choose_shard_window() and shard_window_order() are the rules of both
//   languages: the window a cache_limit allows, the minimum it needs, and an
//   epoch's order (the shards visited in a random order drawn with torch's
//   CPU generator, `window` at a time, each window's samples shuffled
//   together), so a seed gives the same order in C++ and Python.
// - ShardWindows reads batches of any sample indices: each shard a batch
//   touches is staged (fetched unless cached) and held by this process while
//   batches of its window are read; a window's shards are released once no
//   batch of it is being read and a batch of a later window has begun. The
//   first `predownload` shards of the next window are fetched ahead.
// - A batch spanning shards is read per shard and put back in the batch's
//   order (padded fields padded to the batch's largest shape).
// - Thread safety: read() may be called from several threads at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "torch_lmdb/detail/stage.h"
#include "torch_lmdb/reader.h"

namespace torch_lmdb {
namespace detail {

struct WindowChoice {
  size_t window = 1;
  size_t predownload = 1;
};

/// The window and the shards fetched ahead for a cache of `limit` bytes over
/// shards of `sizes` bytes. window 0: the largest window the cache holds
/// twice with a shard to spare; predownload < 0: min(window, shards left
/// after one window), at least 1. The cache must hold the 2 * window largest
/// shards (a batch that straddles two windows holds both): c10::ValueError
/// naming that minimum and `source` otherwise.
WindowChoice choose_shard_window(const std::vector<uint64_t>& sizes, uint64_t limit, size_t window,
                                 int64_t predownload, const std::string& source);

/// An epoch's order over shards of `counts` samples: the sample indices, and
/// the shards in the order they are visited (`visit`). Without `shuffle`,
/// every sample in order.
std::vector<int64_t> shard_window_order(const std::vector<uint64_t>& counts, size_t window, uint64_t seed,
                                        bool shuffle, std::vector<int64_t>* visit = nullptr);

class ShardWindows {
 public:
  /// `sub`: the options of each shard's Reader (staged copies: no lock file).
  ShardWindows(std::shared_ptr<ShardCache> cache, ReaderOptions sub, WindowChoice choice);
  ~ShardWindows();

  size_t size() const { return offsets_.back(); }
  const std::vector<uint64_t>& counts() const { return counts_; }
  size_t window() const { return choice_.window; }
  size_t predownload() const { return choice_.predownload; }
  ShardCache& cache() { return *cache_; }

  /// Opens shard 0 once (its schema against the reader options: an unknown
  /// field is a ValueError here), keeping it staged as a shard fetched ahead.
  void check_first();
  /// Starts an epoch: its order (shard_window_order), kept for the windows
  /// of the batches read next.
  std::vector<int64_t> start_epoch(uint64_t seed, bool shuffle);
  /// The batch of these sample indices.
  Batch read(const std::vector<size_t>& indices, const BatchOptions& options);
  /// Releases every shard this object holds.
  void release_all();

 private:
  struct Held {
    std::shared_ptr<Reader> reader;
    size_t window = 0;
  };
  std::pair<size_t, size_t> locate(size_t index) const;
  std::shared_ptr<Reader> hold(size_t shard, size_t window);
  void done(const std::vector<size_t>& windows);

  std::shared_ptr<ShardCache> cache_;
  ReaderOptions sub_;
  WindowChoice choice_;
  std::vector<uint64_t> counts_;
  std::vector<size_t> offsets_{0};

  std::mutex mutex_;
  std::vector<size_t> window_of_;      // the current epoch's window of each shard
  std::vector<int64_t> visit_;         // the current epoch's shard order
  std::map<size_t, Held> held_;        // shard -> its reader, while held
  std::map<size_t, size_t> in_flight_; // window -> batches being read
  size_t latest_ = 0;                  // the latest window a batch has begun
  size_t ahead_for_ = SIZE_MAX;        // the window whose next shards were fetched ahead
  std::chrono::steady_clock::time_point ahead_at_{};
};

}  // namespace detail
}  // namespace torch_lmdb
