// torch_lmdb/loader.h -- the native loader: epochs of batches over BatchStream.
//
//   auto loader = torch_lmdb::make_loader("train.lmdb", opts);   // LoaderOptions
//   for (size_t epoch = 0; epoch < 10; ++epoch) {
//     loader->set_epoch(epoch);          // optional: epochs also advance by themselves
//     for (auto& batch : *loader) {      // torch_lmdb::Batch
//       at::Tensor x = batch.tensors["x"];
//       ...
//     }
//   }
//
// Contract
// - Each epoch is one BatchStream (stream.h): the order is drawn from
//   (seed, epoch), reader threads read `batches_ahead` batches ahead, the calling
//   thread only takes them. All the stream's rules hold: the same batches for
//   a seed and epoch on every platform and with any number of threads; ranks
//   split each epoch's global order (every sample once per epoch over all
//   ranks, equal batch counts per rank; the remainder rule is in stream.h).
// - Epochs: begin() starts the current epoch at its start position (0, or
//   the position load_state() restored); reading its last batch and reaching
//   end() advances the epoch by one, so a plain `for` over epochs sees a new
//   order each time. set_epoch(e) (as DistributedSampler's) selects epoch e
//   from its start. A begin() while an epoch is under way abandons it and
//   starts that epoch again from its start position.
// - State: state() is {seed, epoch, position, num_samples}: the global
//   position after the batches the loop has received (batches read ahead by
//   the threads but not yet returned are not counted). load_state() on a
//   loader of the same data (any rank/world size, thread count, batches_ahead)
//   makes the next begin() continue there: the order is re-drawn and the
//   stream starts at the position, nothing is read or replayed, so resuming
//   costs the same at every position. With ranks that advance in step (DDP),
//   any rank's state is the run's state; on another world size the rest of
//   the epoch is re-split so that every sample not yet read is read once.
//   A state taken after an epoch's last batch is the next epoch's start.
// - Threads: one Loader is used by one thread (its iterators too). Batches
//   are independent tensors, valid after the loader is gone. The destructor
//   stops and joins the reader threads. Not fork-safe while an epoch runs
//   (see stream.h); create loaders after forking.
// - Errors: a reader thread's error (corrupted record, ...) is thrown by the
//   iterator increment (or begin()) that would have returned that batch; the
//   epoch is then over (its position stays at the last good batch).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "torch_lmdb/reader.h"
#include "torch_lmdb/stream.h"

namespace torch_lmdb {

namespace detail {
size_t windows_size(const ShardWindows& windows);  // its samples (detail/windows.cpp)
}  // namespace detail

struct LoaderOptions {
  size_t batch_size = 256;
  /// A new random order every epoch (else sequential).
  bool shuffle = true;
  /// With shuffle: > 0 shuffles blocks of this many consecutive samples,
  /// mixed within windows of `window_blocks` blocks (SampleOrder::BlockShuffle).
  size_t block_size = 0;
  size_t window_blocks = 4;
  /// Seed of the orders; epoch e uses epoch_seed(seed, e).
  uint64_t seed = 0;
  /// Skip the last, partial global step of each epoch.
  bool drop_last = false;
  /// Reader threads and finished batches queued ahead (both >= 1).
  size_t threads = 2;
  size_t batches_ahead = 4;
  /// Padding of variable-shape fields (BatchOptions::pad, pad_fields, pad_value).
  BatchOptions batch;
  /// Fields to read (empty = all); used when the loader opens the paths.
  std::vector<std::string> fields;
  /// Other options of the Reader the loader opens (its `fields` is replaced
  /// by `fields` above when that is not empty).
  ReaderOptions reader;
  /// This process's rank among world_size (distributed training).
  size_t rank = 0;
  size_t world_size = 1;
  /// Read only these samples of the reader (StreamOptions::selection).
  std::optional<Selection> selection;
  /// Read a mixture through the reader (StreamOptions::mixture; the reader
  /// opens every source's files in order). num_samples is then its epoch size.
  std::optional<MixtureSource> mixture;
  /// A staged dataset (reader.cache_dir set, one URL or shard directory)
  /// larger than reader.cache_limit is read a window of shards at a time:
  /// the shards visited in a random order, `shard_window` at a time, each
  /// window's samples shuffled together (the same order as Python's
  /// make_loader for a seed). 0: the largest window the cache holds twice
  /// with a shard to spare. A cache below the 2 * shard_window largest
  /// shards (a batch that straddles two windows holds both) is a ValueError
  /// naming that minimum.
  size_t shard_window = 0;
  /// Shards of the next window fetched ahead (-1: min(shard_window, the
  /// shards after the first window), at least 1).
  int64_t predownload = -1;
};

/// Where a loader is in its epochs: what load_state() needs to continue.
struct LoaderState {
  uint64_t seed = 0;
  uint64_t epoch = 0;
  /// Samples of the epoch's global order consumed by all ranks together.
  size_t position = 0;
  /// Samples of the data (checked on load_state).
  size_t num_samples = 0;
};

class Loader {
 public:
  /// Throws ValueError for invalid options (checked here, not at begin()).
  Loader(Reader reader, LoaderOptions options) : reader_(std::move(reader)), options_(std::move(options)) {
    stream_options();  // validates the options
    (void)rank_batches(samples(), options_.batch_size, options_.rank, options_.world_size, 0, options_.drop_last);
  }
  /// A loader of a staged dataset read in shard windows (make_loader makes it).
  Loader(std::shared_ptr<detail::ShardWindows> windows, LoaderOptions options)
      : windows_(std::move(windows)), options_(std::move(options)) {
    stream_options();
    TORCH_CHECK_VALUE(options_.block_size == 0, "block_size does not apply to a dataset read in shard windows (a "
                      "window of shards is its block): call make_loader without it");
    TORCH_CHECK_VALUE(!options_.selection && !options_.mixture, "a selection or a mixture needs the whole dataset "
                      "in the cache: give a cache_limit of at least its size");
    (void)rank_batches(samples(), options_.batch_size, options_.rank, options_.world_size, 0, options_.drop_last);
  }

  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = Batch*;
    using reference = Batch&;

    Iterator() = default;
    Batch& operator*() { return *current_; }
    Batch* operator->() { return &*current_; }
    Iterator& operator++() {
      advance();
      return *this;
    }
    bool operator==(const Iterator& other) const { return !current_ == !other.current_; }
    bool operator!=(const Iterator& other) const { return !(*this == other); }

   private:
    friend class Loader;
    explicit Iterator(Loader* loader) : loader_(loader) { advance(); }
    void advance() {
      current_.reset();
      current_ = loader_->next();
    }
    Loader* loader_ = nullptr;
    std::optional<Batch> current_;
  };

  /// Starts the current epoch (see the contract) and returns its first batch.
  Iterator begin() {
    start_epoch();
    return Iterator(this);
  }
  Iterator end() { return Iterator(); }

  /// Selects epoch `epoch` from its start (abandons an epoch under way).
  void set_epoch(uint64_t epoch) {
    stream_.reset();
    epoch_ = epoch;
    start_ = 0;
  }
  uint64_t epoch() const noexcept { return epoch_; }

  /// Batches of this rank in the current epoch from its start position.
  size_t size() const {
    if (stream_) return stream_->size();
    return rank_batches(samples(), options_.batch_size, options_.rank, options_.world_size, start_,
                        options_.drop_last);
  }

  LoaderState state() const {
    LoaderState s;
    s.seed = options_.seed;
    s.num_samples = samples();
    if (stream_ && stream_->delivered() == stream_->size()) {  // the epoch's last batch was taken
      s.epoch = epoch_ + 1;
    } else {
      s.epoch = epoch_;
      s.position = stream_ ? stream_->position() : start_;
    }
    return s;
  }

  /// Continues from `state` at the next begin(). Throws ValueError when the
  /// data's sample count differs or the position is past it.
  void load_state(const LoaderState& state) {
    TORCH_CHECK_VALUE(state.num_samples == samples(), "the loader state was saved for ", state.num_samples,
                      " samples, this loader reads ", samples());
    TORCH_CHECK_VALUE(state.position <= state.num_samples, "the loader state's position ", state.position,
                      " is past its ", state.num_samples, " samples");
    stream_.reset();
    options_.seed = state.seed;
    epoch_ = state.epoch;
    start_ = state.position;
  }

  const LoaderOptions& options() const noexcept { return options_; }
  /// The loader's Reader; c10::Error for a loader in shard windows (it
  /// opens each shard's Reader as its window comes).
  const Reader& reader() const {
    TORCH_CHECK(reader_.has_value(), "this loader reads its dataset in shard windows: it has no single Reader");
    return *reader_;
  }
  /// Whether the loader reads a staged dataset a window of shards at a time.
  bool shard_windows() const noexcept { return windows_ != nullptr; }

 private:
  // Positions of an epoch: the mixture's, the selection's or the reader's samples.
  size_t samples() const {
    if (options_.mixture) return MixtureOrder(options_.mixture->rule, 0, 0).size();
    if (!reader_) return detail::windows_size(*windows_);
    return options_.selection ? options_.selection->size() : reader_->size();
  }

  StreamOptions stream_options() const {
    const LoaderOptions& o = options_;
    TORCH_CHECK_VALUE(o.batch_size > 0, "LoaderOptions::batch_size must be positive, got ", o.batch_size);
    TORCH_CHECK_VALUE(o.threads > 0, "LoaderOptions::threads must be at least 1, got ", o.threads);
    TORCH_CHECK_VALUE(o.batches_ahead > 0, "LoaderOptions::batches_ahead must be at least 1, got ", o.batches_ahead);
    TORCH_CHECK_VALUE(o.window_blocks > 0, "LoaderOptions::window_blocks must be at least 1, got ",
                      o.window_blocks);
    TORCH_CHECK_VALUE(o.world_size > 0 && o.rank < o.world_size, "LoaderOptions::rank must be in [0, world_size = ",
                      o.world_size, "), got rank ", o.rank);
    StreamOptions s;
    s.batch_size = o.batch_size;
    s.order = !o.shuffle ? SampleOrder::Sequential : o.block_size > 0 ? SampleOrder::BlockShuffle
                                                                     : SampleOrder::Shuffle;
    s.seed = o.seed;
    s.drop_last = o.drop_last;
    s.batches_ahead = o.batches_ahead;
    s.threads = o.threads;
    s.block_size = o.block_size > 0 ? o.block_size : 1024;
    s.window_blocks = o.window_blocks;
    s.batch = o.batch;
    s.epoch = epoch_;
    s.rank = o.rank;
    s.world_size = o.world_size;
    s.start = start_;
    s.selection = o.selection;
    s.mixture = o.mixture;
    return s;
  }

  void start_epoch() {
    stream_.reset();  // joins an abandoned epoch's threads first
    stream_ = reader_ ? std::make_unique<BatchStream>(*reader_, stream_options())
                      : std::make_unique<BatchStream>(windows_, stream_options());
  }

  std::optional<Batch> next() {
    if (!stream_) return std::nullopt;
    std::optional<Batch> b;
    try {
      b = stream_->next();
    } catch (...) {
      start_ = stream_->position();  // the epoch ends; a begin() retries from the last good batch
      stream_.reset();
      throw;
    }
    if (!b) {  // the epoch is over: the next begin() starts the next one
      stream_.reset();
      ++epoch_;
      start_ = 0;
    }
    return b;
  }

  std::optional<Reader> reader_;                  // or:
  std::shared_ptr<detail::ShardWindows> windows_;  // a staged dataset read in shard windows
  LoaderOptions options_;
  uint64_t epoch_ = 0;
  size_t start_ = 0;
  std::unique_ptr<BatchStream> stream_;
};

/// A loader over an open Reader (its fields and options as they are).
/// (Templates with exact types: a braced list such as {"a.lmdb", "b.lmdb"}
/// or {path} then only matches the list-of-paths overload.)
template <class R, std::enable_if_t<std::is_same_v<std::decay_t<R>, Reader>, int> = 0>
std::unique_ptr<Loader> make_loader(R&& reader, LoaderOptions options = {}) {
  return std::make_unique<Loader>(std::forward<R>(reader), std::move(options));
}

/// A loader over these databases (concatenated in order), opened with
/// options.reader and options.fields; a staged dataset larger than
/// reader.cache_limit is read in shard windows (LoaderOptions::shard_window).
std::unique_ptr<Loader> make_loader(const std::vector<std::string>& paths, LoaderOptions options = {});

/// A loader over one database ("a.lmdb", a std::string, ...).
template <class S, std::enable_if_t<std::is_convertible_v<const S&, std::string> &&
                                        !std::is_same_v<std::decay_t<S>, Reader>, int> = 0>
std::unique_ptr<Loader> make_loader(const S& path, LoaderOptions options = {}) {
  return make_loader(std::vector<std::string>{std::string(path)}, std::move(options));
}

}  // namespace torch_lmdb
