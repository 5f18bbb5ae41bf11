#include "torch_lmdb/stream.h"

#include "torch_lmdb/detail/windows.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/lookup.h"

namespace torch_lmdb {

namespace {

// Fisher-Yates with an unbiased bounded draw: the same permutation for a seed
// on every platform (std::shuffle and uniform_int_distribution are
// implementation-defined).
void shuffle(size_t* first, size_t count, std::mt19937_64& rng) {
  auto below = [&rng](uint64_t bound) {
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
    uint64_t x;
    do {
      x = rng();
    } while (x >= limit);
    return static_cast<size_t>(x % bound);
  };
  for (size_t i = count; i > 1; --i) std::swap(first[i - 1], first[below(i)]);
}

}  // namespace

std::vector<size_t> sample_order(size_t n, SampleOrder order, uint64_t seed, size_t block_size,
                                 size_t window_blocks) {
  TORCH_CHECK_VALUE(block_size > 0 && window_blocks > 0, "block_size and window_blocks must be positive, got ",
                    block_size, " and ", window_blocks);
  std::vector<size_t> out(n);
  std::iota(out.begin(), out.end(), size_t{0});
  if (order == SampleOrder::Sequential || n == 0) return out;
  std::mt19937_64 rng(seed);
  if (order == SampleOrder::Shuffle) {
    shuffle(out.data(), n, rng);
    return out;
  }
  const size_t blocks = (n + block_size - 1) / block_size;
  std::vector<size_t> perm(blocks);
  std::iota(perm.begin(), perm.end(), size_t{0});
  shuffle(perm.data(), blocks, rng);
  out.clear();
  size_t window_start = 0;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t first = perm[b] * block_size, last = std::min(n, first + block_size);
    for (size_t i = first; i < last; ++i) out.push_back(i);
    if ((b + 1) % window_blocks == 0 || b + 1 == blocks) {
      shuffle(out.data() + window_start, out.size() - window_start, rng);
      window_start = out.size();
    }
  }
  return out;
}

uint64_t epoch_seed(uint64_t seed, uint64_t epoch) noexcept { return seed + epoch * 0x9E3779B97F4A7C15ull; }

size_t rank_batches(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last) {
  TORCH_CHECK_VALUE(batch_size > 0, "batch_size must be positive, got ", batch_size);
  TORCH_CHECK_VALUE(world_size > 0, "world_size must be positive, got ", world_size);
  TORCH_CHECK_VALUE(rank < world_size, "rank must be in [0, world_size = ", world_size, "), got ", rank);
  TORCH_CHECK_VALUE(start <= n, "start position ", start, " is past the end of an epoch of ", n, " samples");
  const size_t step = batch_size * world_size;
  const size_t full = (n - start) / step, tail = (n - start) - full * step;
  return full + (tail > 0 && !drop_last ? 1 : 0);
}

RankBatch rank_batch(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last,
                     size_t k) {
  const size_t batches = rank_batches(n, batch_size, rank, world_size, start, drop_last);
  TORCH_CHECK_INDEX(k < batches, "batch ", k, " out of range for a rank's ", batches, " batches");
  const size_t step = batch_size * world_size;
  const size_t full = (n - start) / step, tail = (n - start) - full * step;
  RankBatch b;
  if (k < full) {
    b.first = start + k * step + rank * batch_size;
    b.count = batch_size;
    b.position_after = start + (k + 1) * step;
    return b;
  }
  // The tail: contiguous parts, sizes differing by at most one.
  const size_t base = tail / world_size, extra = tail % world_size;
  b.first = start + full * step + rank * base + std::min(rank, extra);
  b.count = base + (rank < extra ? 1 : 0);
  b.position_after = n;
  // An empty share (tail < world_size) repeats a sample from the order's start.
  if (b.count == 0) b.pad_index = (rank - tail) % n;
  return b;
}

RankPlan rank_plan(size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last) {
  RankPlan plan;
  const size_t batches = rank_batches(n, batch_size, rank, world_size, start, drop_last);
  plan.first.reserve(batches);
  for (size_t k = 0; k < batches; ++k) {
    const RankBatch b = rank_batch(n, batch_size, rank, world_size, start, drop_last, k);
    plan.first.push_back(b.first);
    plan.count.push_back(b.count);
    plan.position_after.push_back(b.position_after);
    if (b.count == 0) plan.pad_index = b.pad_index;
  }
  return plan;
}

namespace {

void add_sources(Batch& b, const std::vector<int64_t>& sources) {
  at::Tensor t = at::empty({static_cast<int64_t>(sources.size())}, at::kLong);
  std::copy(sources.begin(), sources.end(), t.data_ptr<int64_t>());
  b.tensors.insert("source", std::move(t));
  b.order.push_back("source");
}

// The mixture's checks against the reader (StreamOptions::mixture).
void check_mixture(const MixtureSource& m, const StreamOptions& o, size_t reader_size) {
  TORCH_CHECK_VALUE(!o.selection, "a stream reads a mixture or a selection, not both (make the selection a source)");
  TORCH_CHECK_VALUE(o.order != SampleOrder::BlockShuffle,
                    "block shuffle does not apply to a mixture (each source is read in its own permutation)");
  const size_t k = m.rule.sizes.size();
  TORCH_CHECK_VALUE(m.offsets.size() == k && (m.selections.empty() || m.selections.size() == k), "a mixture of ", k,
                    " sources got ", m.offsets.size(), " offsets and ", m.selections.size(), " selections");
  for (size_t s = 0; s < k; ++s) {
    const bool selected = !m.selections.empty() && m.selections[s];
    size_t end = m.rule.sizes[s];
    if (selected) {
      TORCH_CHECK_VALUE(m.selections[s]->size() == m.rule.sizes[s], "mixture source '", m.rule.names[s],
                        "' has size ", m.rule.sizes[s], " but its selection ", m.selections[s]->size());
      const auto& idx = m.selections[s]->indices();
      end = idx.empty() ? 0 : *std::max_element(idx.begin(), idx.end()) + 1;
    }
    TORCH_CHECK_INDEX(m.offsets[s] + end <= reader_size, "mixture source '", m.rule.names[s], "' reaches sample ",
                      m.offsets[s] + end, " of a reader of ", reader_size, " samples");
  }
}

}  // namespace

struct BatchStream::State {
  std::optional<Reader> reader;                  // or:
  std::shared_ptr<detail::ShardWindows> windows;  // a dataset read in shard windows
  StreamOptions options;
  std::vector<size_t> order;         // empty with a mixture
  std::optional<MixtureOrder> rule;  // the mixture's, for (seed, epoch)
  size_t n = 0;                      // positions of the epoch
  size_t num_batches = 0;
  uint64_t generation = 0;

  std::mutex mutex;
  std::condition_variable produced;  // a batch (or an error) is ready
  std::condition_variable consumed;  // room to read ahead, or stop
  size_t next_to_claim = 0;          // the next batch a reader thread takes
  size_t next_to_deliver = 0;        // the next batch next() returns
  // Cold reads: batches before `requested_to` had their pages requested
  // ahead (Reader::request_pages), a chunk at a time (chunk_batches());
  // `batch_bytes`: the bytes of a batch's pages, as the last chunk found.
  size_t requested_to = 0;
  size_t batch_bytes = 0;
  // The last chunk requested found uncached pages: keep requesting chunks
  // (the batches themselves find their pages cached, which alone would make
  // a reading thread stop requesting pages).
  bool cold = false;
  size_t delivered = 0;              // batches next() returned (not counting an error)
  std::map<size_t, Batch> ready;     // read, not yet delivered
  std::exception_ptr error;          // the first failed batch's error
  size_t error_at = std::numeric_limits<size_t>::max();
  bool stop = false;
  std::vector<std::thread> threads;
  // A block shuffle whose windows are not cached: a thread of their own
  // reads each window's records ahead in a few long reads (Reader::read_window),
  // while the reading threads copy the window before; a batch whose window
  // is being read waits for it. `window_batches` (0: no window read) batches
  // a window; windows are read at most one ahead of the batches claimed.
  struct Ahead {
    size_t first = 0, last = 0;  // its batches
    bool ready = false;
    std::shared_ptr<const detail::WindowRead> data;  // null: nothing read (cached, or failed)
  };
  size_t window_batches = 0;
  std::deque<Ahead> aheads;  // under `mutex`
  bool window_reads_failed = false;  // the read-ahead thread gave up: the batches read without
  std::vector<std::shared_ptr<const detail::WindowRead>> spares;  // delivered windows' buffers, to reuse
  std::condition_variable ahead_ready;

  State(Reader r, StreamOptions o) : reader(std::move(r)), options(std::move(o)) {}
  State(std::shared_ptr<detail::ShardWindows> w, StreamOptions o) : windows(std::move(w)), options(std::move(o)) {}

  // Stops and joins the reader threads (idempotent; not under `mutex`). Called when the
  // epoch ends, so that no thread outlives it (a fork() in the loop's next step, e.g. a
  // DataLoader starting its workers, then sees one thread) and by the destructor.
  void join() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    consumed.notify_all();
    ahead_ready.notify_all();
    for (std::thread& t : threads) t.join();
    threads.clear();
    std::lock_guard<std::mutex> lock(mutex);
    aheads.clear();  // (the windows' buffers go with the epoch)
    spares.clear();
  }

  // Batch k of this rank (stream.h's rank plan, computed when asked).
  RankBatch batch_at(size_t k) const {
    return rank_batch(n, options.batch_size, options.rank, options.world_size, options.start, options.drop_last, k);
  }

  // The sample index at order position p (through the selection, if any).
  size_t sample_at(size_t p) const { return options.selection ? options.selection->at(order[p]) : order[p]; }

  // The reader's sample indices of batch k; with a mixture, `sources` gets each sample's source.
  std::vector<size_t> indices(size_t k, std::vector<int64_t>* sources = nullptr) const {
    const RankBatch b = batch_at(k);
    const size_t first = b.count == 0 ? b.pad_index : b.first, count = std::max<size_t>(b.count, 1);
    std::vector<size_t> out(count);
    if (!rule) {
      for (size_t j = 0; j < count; ++j) out[j] = sample_at(first + j);
      return out;
    }
    std::vector<int64_t> src(count), sample(count);
    rule->locate(first, count, src.data(), sample.data());
    const MixtureSource& m = *options.mixture;
    for (size_t j = 0; j < count; ++j) {
      const size_t s = static_cast<size_t>(src[j]), at = static_cast<size_t>(sample[j]);
      out[j] = m.offsets[s] + (!m.selections.empty() && m.selections[s] ? m.selections[s]->at(at) : at);
    }
    if (sources != nullptr) *sources = std::move(src);
    return out;
  }

  // Batches whose pages are requested together: one shuffle window of a
  // block shuffle when its pages fit in page_request_bytes (requested at once,
  // its samples are a few long runs of the file), else page_request_bytes / 2
  // worth. Under `mutex`.
  size_t chunk_batches() const {
    if (batch_bytes == 0) return 1;  // (until a first request measured a batch)
    const size_t budget = reader->options().page_request_bytes;
    if (options.order == SampleOrder::BlockShuffle) {
      const size_t per_batch = options.batch_size * options.world_size;
      const size_t window = (options.block_size * options.window_blocks + per_batch - 1) / per_batch;
      if (window * batch_bytes <= budget) return std::max<size_t>(1, window);
    }
    return std::max<size_t>(1, budget / 2 / batch_bytes);
  }

  // The batches whose pages to request as batch `k` is claimed, [first,
  // last): the next chunk, once fewer than a chunk's batches beyond k are
  // requested (so at most two chunks lie ahead). Under `mutex`.
  std::pair<size_t, size_t> claim_page_requests(size_t k) {
    const size_t chunk = chunk_batches();
    const size_t first = std::max(requested_to, k + 1);
    if (first >= num_batches || first - (k + 1) >= chunk) return {0, 0};
    // Chunk ends on multiples of the chunk: a block shuffle's windows.
    requested_to = std::min(num_batches, (first / chunk + 1) * chunk);
    return {first, requested_to};
  }

  void request_pages(std::pair<size_t, size_t> range) {
    std::vector<size_t> idx;
    for (size_t b = range.first; b < range.second; ++b) {
      if (batch_at(b).count == 0) continue;
      const std::vector<size_t> batch = indices(b);
      idx.insert(idx.end(), batch.begin(), batch.end());
    }
    const Reader::PagesRequested got = reader->request_pages(idx);
    std::lock_guard<std::mutex> lock(mutex);
    cold = got.missing_pages > 0;
    if (got.bytes > 0) batch_bytes = std::max<size_t>(1, got.bytes / (range.second - range.first));
  }

  // The window read thread (window_batches > 0): window c once the batches
  // claimed reach window c - 1 (at most the window being read, the next and
  // a previous one's last batches hold buffers), its indices in batch order.
  void read_windows_loop() {
    try {
      read_windows();
    } catch (...) {  // (no memory for the window list): the batches read without
      {
        std::lock_guard<std::mutex> lock(mutex);
        window_reads_failed = true;
      }
      ahead_ready.notify_all();
    }
  }

  void read_windows() {
    const size_t W = window_batches;
    for (size_t first = 0; first < num_batches; first += W) {
      std::shared_ptr<const detail::WindowRead> reuse;
      {
        std::unique_lock<std::mutex> lock(mutex);
        if (first > 0) {
          consumed.wait(lock, [&] { return stop || next_to_claim + W >= first; });
          if (stop) return;
          aheads.push_back(Ahead{first, std::min(num_batches, first + W), false, nullptr});
        }
        while (!aheads.empty() && aheads.front().last <= next_to_deliver) {
          if (aheads.front().data) spares.push_back(std::move(aheads.front().data));
          aheads.pop_front();
        }
        for (auto it = spares.begin(); it != spares.end(); ++it)
          if (it->use_count() == 1) {
            std::atomic_thread_fence(std::memory_order_acquire);  // (the last reader's reads before the new ones)
            reuse = std::move(*it);
            spares.erase(it);
            break;
          }
        if (spares.size() > 1) spares.erase(spares.begin());  // (one kept to lend)
      }
      std::shared_ptr<const detail::WindowRead> data;
      try {
        std::vector<size_t> idx;
        for (size_t b = first; b < std::min(num_batches, first + W); ++b) {
          if (batch_at(b).count == 0) continue;
          const std::vector<size_t> batch = indices(b);
          idx.insert(idx.end(), batch.begin(), batch.end());
        }
        data = reader->read_window(idx, std::move(reuse));
      } catch (...) {
        // Only a hint: each batch reads its records itself and raises their errors.
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        for (Ahead& a : aheads)
          if (a.first == first) {
            a.ready = true;
            a.data = std::move(data);
            break;
          }
      }
      ahead_ready.notify_all();
    }
  }

  // The window read of batch k's window, or null; waits while it is being
  // read or not yet begun (a batch never reads its window's records one by
  // one because the window's read came late). Under `mutex`.
  std::shared_ptr<const detail::WindowRead> window_read(std::unique_lock<std::mutex>& lock, size_t k) {
    for (;;) {
      if (stop || window_reads_failed) return nullptr;
      auto it = std::find_if(aheads.begin(), aheads.end(), [k](const Ahead& a) { return a.first <= k && k < a.last; });
      if (it != aheads.end() && it->ready) return it->data;
      ahead_ready.wait(lock);
    }
  }

  void work() {
    for (;;) {
      size_t k = 0;
      std::pair<size_t, size_t> ahead{0, 0};
      std::shared_ptr<const detail::WindowRead> window;
      const bool thread_cold = reader && reader->requesting_pages();
      {
        std::unique_lock<std::mutex> lock(mutex);
        consumed.wait(lock, [&] {
          return stop || next_to_claim >= num_batches || next_to_claim < next_to_deliver + options.batches_ahead;
        });
        if (stop || next_to_claim >= num_batches) return;
        k = next_to_claim++;
        if (window_batches > 0) {
          consumed.notify_all();  // (the window read thread waits for the claims to reach a window)
          window = window_read(lock, k);
          if (stop) return;
        }
        // (a window read: its records are not requested again, nor what lies past page_request_bytes)
        if ((thread_cold || cold) && !window) ahead = claim_page_requests(k);
      }
      try {
        // The batches ahead are looked up (and their pages requested) while this
        // batch's own reads are on their way, not before they start.
        detail::WhileReadingScope lookahead(ahead.second > ahead.first
                                                ? std::function<void()>([this, ahead] { request_pages(ahead); })
                                                : std::function<void()>());
        std::vector<int64_t> sources;
        Batch b = windows ? windows->read(indices(k), options.batch)
                          : reader->read_batch(indices(k, &sources), options.batch, window.get());
        detail::WhileReadingScope::run();  // (a batch that made no lookup: now)
        if (rule) add_sources(b, sources);
        std::lock_guard<std::mutex> lock(mutex);
        ready.emplace(k, std::move(b));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (k < error_at) {
          error = std::current_exception();
          error_at = k;
        }
      }
      produced.notify_all();
    }
  }
};

namespace {

void check_stream_options(const StreamOptions& options) {
  TORCH_CHECK_VALUE(options.batch_size > 0, "batch_size must be positive, got ", options.batch_size);
  TORCH_CHECK_VALUE(options.batches_ahead > 0, "batches_ahead must be at least 1, got ", options.batches_ahead);
  TORCH_CHECK_VALUE(options.threads > 0, "threads must be at least 1, got ", options.threads);
  TORCH_CHECK_VALUE(options.block_size > 0 && options.window_blocks > 0,
                    "block_size and window_blocks must be positive, got ", options.block_size, " and ",
                    options.window_blocks);
}

// The reading threads already decode side by side: each decodes its own
// batches; batches wait in the queue: written around the cache.
StreamOptions reading_options(StreamOptions options) {
  options.batch.decode_threads = 1;
  options.batch.nontemporal_stores = true;
  return options;
}

}  // namespace

void BatchStream::start_threads() {
  State& s = *state_;
  s.num_batches = rank_batches(s.n, s.options.batch_size, s.options.rank, s.options.world_size, s.options.start,
                               s.options.drop_last);
  s.generation = fork_generation();
  const size_t threads = std::min(s.options.threads, std::max<size_t>(s.num_batches, 1));
  if (s.reader && s.options.order == SampleOrder::BlockShuffle && !s.rule && s.num_batches > 0) {
    const ReaderOptions& ro = s.reader->options();
    if (ro.direct_reads && ro.page_requests != PageRequests::Never && ro.page_request_bytes > 0) {
      const size_t per_batch = s.options.batch_size * s.options.world_size;
      s.window_batches = std::max<size_t>(1, (s.options.block_size * s.options.window_blocks + per_batch - 1) / per_batch);
      // The first window is read before any batch of it.
      s.aheads.push_back(State::Ahead{0, std::min(s.num_batches, s.window_batches), false, nullptr});
      s.threads.emplace_back([&s] { s.read_windows_loop(); });
    }
  }
  for (size_t t = 0; t < threads; ++t) s.threads.emplace_back([&s] { s.work(); });
}

BatchStream::BatchStream(Reader reader, StreamOptions options) {
  check_stream_options(options);
  state_ = std::make_shared<State>(std::move(reader), reading_options(std::move(options)));
  State& s = *state_;
  const Reader& r = *s.reader;
  if (s.options.mixture) {
    check_mixture(*s.options.mixture, s.options, r.size());
    MixtureOptions rule = s.options.mixture->rule;
    rule.shuffle = s.options.order == SampleOrder::Shuffle;
    s.rule.emplace(std::move(rule), s.options.seed, s.options.epoch);
  }
  const size_t n = s.rule ? s.rule->size() : s.options.selection ? s.options.selection->size() : r.size();
  if (s.options.selection)
    for (size_t p = 0; p < n; ++p)
      TORCH_CHECK_INDEX(s.options.selection->at(p) < r.size(), "selection position ", p, ": index ",
                        s.options.selection->at(p), " out of range for dataset of size ", r.size());
  s.n = n;
  (void)rank_batches(n, s.options.batch_size, s.options.rank, s.options.world_size, s.options.start,
                     s.options.drop_last);  // checks the rank, world size and start before the order is drawn
  if (!s.rule)
    s.order = sample_order(n, s.options.order, epoch_seed(s.options.seed, s.options.epoch), s.options.block_size,
                           s.options.window_blocks);
  start_threads();
}

BatchStream::BatchStream(std::shared_ptr<detail::ShardWindows> windows, StreamOptions options) {
  check_stream_options(options);
  TORCH_CHECK_VALUE(windows != nullptr, "BatchStream: no shard windows");
  TORCH_CHECK_VALUE(options.order != SampleOrder::BlockShuffle,
                    "block shuffle does not apply to a dataset read in shard windows (a window of shards is its "
                    "block): shuffle without block_size");
  TORCH_CHECK_VALUE(!options.selection && !options.mixture,
                    "a selection or a mixture needs the whole dataset in the cache: give a cache_limit of at least "
                    "its size");
  state_ = std::make_shared<State>(std::move(windows), reading_options(std::move(options)));
  State& s = *state_;
  s.n = s.windows->size();
  (void)rank_batches(s.n, s.options.batch_size, s.options.rank, s.options.world_size, s.options.start,
                     s.options.drop_last);
  const std::vector<int64_t> order = s.windows->start_epoch(epoch_seed(s.options.seed, s.options.epoch),
                                                            s.options.order != SampleOrder::Sequential);
  s.order.assign(order.begin(), order.end());
  start_threads();
}

BatchStream::~BatchStream() {
  if (!state_) return;
  State& s = *state_;
  if (fork_generation() != s.generation) {
    // A forked child: the threads are the parent's; never join them here.
    new std::vector<std::thread>(std::move(s.threads));  // leaked on purpose
    return;
  }
  s.join();
}

std::optional<Batch> BatchStream::next() {
  State& s = *state_;
  TORCH_CHECK(fork_generation() == s.generation,
              "a BatchStream cannot be used in a process forked after it was created; create one in this process");
  std::unique_lock<std::mutex> lock(s.mutex);
  if (s.next_to_deliver >= s.num_batches) {
    lock.unlock();
    s.join();
    return std::nullopt;
  }
  const size_t k = s.next_to_deliver;
  s.produced.wait(lock, [&] { return s.ready.count(k) > 0 || s.error_at == k; });
  if (s.error_at == k) {
    s.next_to_deliver = s.num_batches;  // finished
    lock.unlock();
    s.join();
    std::rethrow_exception(s.error);
  }
  auto it = s.ready.find(k);
  Batch b = std::move(it->second);
  s.ready.erase(it);
  ++s.next_to_deliver;
  ++s.delivered;
  const bool last = s.next_to_deliver == s.num_batches;
  lock.unlock();
  if (last) {
    s.join();  // every batch was claimed and read: the threads are leaving
  } else {
    s.consumed.notify_all();
  }
  return b;
}

size_t BatchStream::size() const noexcept { return state_->num_batches; }

size_t BatchStream::delivered() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->delivered;
}

size_t BatchStream::position() const {
  const State& s = *state_;
  const size_t k = delivered();
  return k == 0 ? s.options.start : s.batch_at(k - 1).position_after;
}

size_t BatchStream::num_samples() const noexcept { return state_->n; }

std::vector<size_t> BatchStream::batch_indices(size_t k) const {
  TORCH_CHECK_INDEX(k < state_->num_batches, "batch ", k, " out of range for a stream of ", state_->num_batches,
                    " batches");
  return state_->indices(k);
}

}  // namespace torch_lmdb
