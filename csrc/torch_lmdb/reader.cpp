#include "torch_lmdb/reader.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>
#endif
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <dirent.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "torch_lmdb/errors.h"
#include "torch_lmdb/fault_guard.h"
#include "torch_lmdb/meta.h"

namespace torch_lmdb {

namespace {

// Freed batch buffers, kept for reuse (bounded by bytes): a recycled buffer
// is already paged in, a fresh one costs a page fault per 4 KiB. Tensors hold
// a shared_ptr to the pool through their deleter, so a buffer released after
// the Reader is gone is simply freed. Thread-safe.
//
// The data start is placed half a page away from where the source records
// sit within their pages: a destination a few bytes ahead of the source
// modulo 4 KiB (4K aliasing) makes memcpy about 2.5x slower on x86.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr size_t kMinBytes = size_t{64} << 10;
  static constexpr size_t kPage = 4096;
  explicit BufferPool(size_t capacity) : capacity_(capacity) {}
  ~BufferPool() {
    for (auto& [bytes, list] : free_)
      for (void* p : list) std::free(p);
  }

  /// `source` points at the first sample's data (for the placement above).
  at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype, const void* source) {
    size_t bytes = c10::elementSize(dtype);
    for (int64_t d : shape) bytes *= static_cast<size_t>(d);
    const auto options = at::TensorOptions().dtype(dtype);
    if (bytes < kMinBytes || capacity_ == 0) return at::empty(shape, options);
    const size_t capacity = (bytes + kPage) / kPage * kPage + kPage;  // room for any offset < 4 KiB
    void* p = take(capacity);
    if (p == nullptr) p = std::aligned_alloc(kPage, capacity);
    TORCH_CHECK(p != nullptr, "out of memory allocating a batch of ", bytes, " bytes");
    const size_t offset = (reinterpret_cast<uintptr_t>(source) + kPage / 2) % kPage / 64 * 64;
    auto self = shared_from_this();
    return at::from_blob(
        static_cast<char*>(p) + offset, shape,
        [self, capacity, offset](void* q) { self->give(static_cast<char*>(q) - offset, capacity); }, options);
  }

 private:
  void* take(size_t capacity) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.find(capacity);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= capacity;
    return p;
  }
  void give(void* p, size_t capacity) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (cached_ + capacity <= capacity_) {
        free_[capacity].push_back(p);
        cached_ += capacity;
        return;
      }
    }
    std::free(p);
  }

  const size_t capacity_;
  std::mutex mutex_;
  size_t cached_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

// Helper threads that decode batches beside the threads calling read_batch.
// One pool per process, made on first use with up to kMaxHelpers threads,
// which then wait for work until the process ends (they hold no Reader
// state). A forked child makes its own: the parent's threads do not exist in
// it, and the inherited object (whose mutex another thread may have held at
// the fork) is never touched again.
//
// A Job runs fn(0), fn(1), ... of items the caller publishes while it goes on
// (a batch's payloads, decoded as soon as their records are parsed): the
// helpers take published items, and finish() makes the caller take the rest
// and wait for all.
class DecodePool {
 public:
  static constexpr unsigned kMaxHelpers = 3;

  static DecodePool& get() {
    static std::mutex made;
    static DecodePool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> guard(made);
    if (pool == nullptr || owner != ::getpid()) {
      pool = new DecodePool();  // never freed: its threads live until the process ends
      owner = ::getpid();
    }
    return *pool;
  }

 private:
  struct Task {
    explicit Task(std::function<void(size_t)> f) : fn(std::move(f)) {}
    const std::function<void(size_t)> fn;
    std::atomic<size_t> next{0};       // the next item to claim
    std::atomic<size_t> published{0};  // items 0 .. published - 1 may be claimed
    std::mutex mutex;
    std::condition_variable more;      // published grew, or closed
    std::condition_variable finished;  // done reached published once closed
    bool closed = false;               // no more items (under mutex)
    size_t done = 0;                   // items finished or skipped (under mutex)
    std::exception_ptr error;          // the first failure (under mutex)
    std::atomic<bool> failed{false};

    // Claims and runs published items; a helper (`wait`) also waits for
    // more until the job is closed, the caller returns when none is left.
    void help(bool wait) {
      std::exception_ptr mine;
      size_t ran = 0;
      for (;;) {
        size_t i = next.load(std::memory_order_relaxed);
        if (i < published.load(std::memory_order_acquire)) {
          if (!next.compare_exchange_weak(i, i + 1, std::memory_order_relaxed)) continue;
          if (!failed.load(std::memory_order_relaxed)) {
            try {
              fn(i);
            } catch (...) {
              if (!mine) mine = std::current_exception();
              failed.store(true, std::memory_order_relaxed);
            }
          }
          ++ran;
          continue;
        }
        std::unique_lock<std::mutex> lock(mutex);
        if (ran > 0 || mine) {
          if (mine && !error) error = mine;
          mine = nullptr;
          done += ran;
          ran = 0;
          if (closed && done == published.load(std::memory_order_relaxed)) finished.notify_all();
        }
        if (!wait) return;
        more.wait(lock, [&] { return closed || next.load(std::memory_order_relaxed) <
                                                     published.load(std::memory_order_relaxed); });
        if (closed && next.load(std::memory_order_relaxed) >= published.load(std::memory_order_relaxed)) return;
      }
    }
  };

  void work() {
    for (;;) {
      std::shared_ptr<Task> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return !queue_.empty(); });
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task->help(/*wait=*/true);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Task>> queue_;
  unsigned threads_ = 0;

 public:
  class Job {
   public:
    /// `helpers` pool threads (at most kMaxHelpers) run fn on published items.
    Job(unsigned helpers, std::function<void(size_t)> fn) : task_(std::make_shared<Task>(std::move(fn))) {
      DecodePool& pool = DecodePool::get();
      helpers = std::min(helpers, kMaxHelpers);
      {
        std::lock_guard<std::mutex> guard(pool.mutex_);
        while (pool.threads_ < helpers) {
          std::thread([&pool] { pool.work(); }).detach();
          ++pool.threads_;
        }
        for (unsigned h = 0; h < helpers; ++h) pool.queue_.push_back(task_);
      }
      pool.wake_.notify_all();
    }
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;
    /// Items 0 .. n - 1 are ready (n only grows).
    void publish(size_t n) {
      {
        std::lock_guard<std::mutex> guard(task_->mutex);
        task_->published.store(n, std::memory_order_release);
      }
      task_->more.notify_all();
    }
    /// No more items: runs what is left on this thread, waits for the
    /// helpers, rethrows the first failure.
    void finish() {
      close_and_wait();
      if (task_->error) std::rethrow_exception(task_->error);
    }
    /// Never leaves a helper writing after the caller moved on (an exception
    /// in the caller: its buffers and transactions are about to go).
    ~Job() {
      if (!finished_) close_and_wait();
    }

   private:
    void close_and_wait() {
      finished_ = true;
      {
        std::lock_guard<std::mutex> guard(task_->mutex);
        task_->closed = true;
      }
      task_->more.notify_all();
      task_->help(/*wait=*/false);
      std::unique_lock<std::mutex> lock(task_->mutex);
      task_->finished.wait(lock, [&] { return task_->done == task_->published.load(std::memory_order_relaxed); });
    }
    std::shared_ptr<Task> task_;
    bool finished_ = false;
  };
};

// Decodes a payload into its batch slot. `around_cache`: a raw payload of
// 4 KiB or more is copied with non-temporal stores, which write memory
// without first reading the destination's lines into the cache (a batch
// read ahead of its use is not read back soon: caching it only evicts the
// records still to be read).
#if defined(__SSE2__)
// 64 bytes a step with 16-byte non-temporal stores (`dst` 16-byte aligned).
void copy_around_cache_sse2(char* dst, const char* src, size_t n) {
  for (; n >= 64; n -= 64, src += 64, dst += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
  if (n) std::memcpy(dst, src, n);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORCH_LMDB_AVX2_COPY 1
// 128 bytes a step with 32-byte loads and non-temporal stores (`dst` 32-byte
// aligned), on CPUs with AVX2: twice as few instructions in flight per line
// as the SSE2 loop (16 KiB samples, 2 threads: +10 % in paired runs).
__attribute__((target("avx2"))) void copy_around_cache_avx2(char* dst, const char* src, size_t n) {
  for (; n >= 128; n -= 128, src += 128, dst += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 96), d);
  }
  if (n) std::memcpy(dst, src, n);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif
#endif

inline void decode_to_slot(const FieldView& v, char* dst, bool around_cache) {
#if defined(__SSE2__)
  if (around_cache && v.codec == Codec::None && v.nbytes >= 4096) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
#if defined(TORCH_LMDB_AVX2_COPY)
    if ((at & 31) == 0 && cpu_has_avx2()) return copy_around_cache_avx2(dst, v.data, v.nbytes);
#endif
    if ((at & 15) == 0) return copy_around_cache_sse2(dst, v.data, v.nbytes);
  }
#endif
  decode_payload(v, dst);
}

// Decoding threads of a batch (see ReaderOptions::decode_threads).
unsigned decode_threads(const ReaderOptions& r, const BatchOptions& b) {
  unsigned n = b.decode_threads != 0 ? b.decode_threads : r.decode_threads;
  static const unsigned cores = std::max(1u, std::thread::hardware_concurrency());  // (reads /sys)
  if (n == 0) n = std::min(cores, DecodePool::kMaxHelpers + 1);
  return std::min(n, DecodePool::kMaxHelpers + 1);
}

}  // namespace

struct Reader::State {
  static inline std::atomic<uint64_t> next_id{1};
  const uint64_t id = next_id++;  // names this reader's schema in per-thread caches
  std::vector<std::string> paths;
  ReaderOptions options;
  std::vector<size_t> offsets;           // offsets[i] = first global index of file i; back() = size
  std::vector<FieldSchema> stored;       // every stored field
  std::vector<FieldSchema> schema;       // the selected ones
  std::vector<char> keep;                // per stored field: selected?
  std::vector<std::string> meta_json;
  std::vector<uint32_t> per_value;       // per file: records per LMDB value (metadata samples_per_value)
  bool complete = true;

  // Environments of the current process (reopened after fork).
  std::atomic<uint64_t> generation{0};
  std::mutex reopen_mutex;
  std::vector<std::shared_ptr<Env>> envs;
  std::shared_ptr<BufferPool> buffers;
  // Reader::io_stats().
  mutable std::atomic<uint64_t> io_batches{0}, io_lookahead{0}, io_pages{0}, io_prefetched{0}, io_prefetches{0};

  EnvOptions env_options() const {
    EnvOptions o;
    o.readonly = true;
    o.lock = options.lock;
    o.readahead = options.readahead;
    o.max_readers = options.max_readers;
    o.warn = options.warn;
    return o;
  }

  const std::vector<std::shared_ptr<Env>>& current_envs() {
    const uint64_t gen = fork_generation();
    if (generation.load(std::memory_order_acquire) == gen) return envs;
    std::lock_guard<std::mutex> guard(reopen_mutex);
    if (generation.load(std::memory_order_acquire) != gen) {
      // A forked child: open our own handles; the parent's are dropped
      // without being closed (Env's destructor checks the owner pid).
      std::vector<std::shared_ptr<Env>> fresh;
      for (const auto& p : paths) fresh.push_back(Env::open(p, env_options()));
      envs.swap(fresh);
      generation.store(gen, std::memory_order_release);
    }
    return envs;
  }

  std::pair<size_t, uint64_t> locate(size_t index) const {
    TORCH_CHECK_INDEX(index < offsets.back(), "index ", index,
                      " out of range for dataset of size ", offsets.back(), " at '",
                      paths.size() == 1 ? paths[0] : paths[0] + "' (+" + std::to_string(paths.size() - 1) + " files", "'");
    const auto it = std::upper_bound(offsets.begin(), offsets.end(), index);
    const size_t file = static_cast<size_t>(it - offsets.begin()) - 1;
    return {file, index - offsets[file]};
  }
};

namespace {

void check_layout(const std::vector<FieldView>& views, const std::vector<FieldSchema>& stored,
                  const std::string& path, uint64_t local) {
  bool ok = views.size() == stored.size();
  for (size_t f = 0; ok && f < views.size(); ++f)
    ok = views[f].name_equals(stored[f].name) && views[f].kind == stored[f].kind &&
         views[f].dtype == stored[f].dtype;
  if (!ok) {
    std::string got;
    for (const auto& v : views) got += (got.empty() ? "" : ", ") + v.printable_name() + ":" + dtype_name(v.dtype);
    throw CorruptedError("record at '" + path + "' index " + std::to_string(local) +
                             " does not match the schema in the metadata (fields: " + got + ")",
                         0, path);
  }
}

[[noreturn]] void missing_sample(const Env& env, uint64_t local) {
  throw CorruptedError("sample index " + std::to_string(local) + " is missing from '" + env.path() +
                           "' although its metadata counts it; run `torch-lmdb verify`",
                       MDB_NOTFOUND, env.path());
}

// The record of sample `local` in `v`, the value of its key (local /
// per_value): `v` itself, or its slot of a packed value.
MDB_val record_in(const Env& env, const MDB_val& v, uint64_t local, uint32_t per_value) {
  if (per_value <= 1) return v;
  const char* record = nullptr;
  size_t size = 0;
  if (!packed_record(v.mv_data, v.mv_size, local % per_value, per_value, &record, &size))
    throw CorruptedError("the value holding sample index " + std::to_string(local) + " of '" + env.path() +
                             "' (samples " + std::to_string(local / per_value * per_value) + " to " +
                             std::to_string(local / per_value * per_value + per_value - 1) +
                             ") is damaged or does not hold it; run `torch-lmdb verify`",
                         0, env.path());
  return MDB_val{size, const_cast<char*>(record)};
}

// An LMDB call reading sample `local` returned `rc`: throws what it means.
[[noreturn]] void read_failed(const Env& env, int rc, const char* what, uint64_t local) {
  env.check_intact();  // the file changed under the map: say so
  if (rc == MDB_NOTFOUND) missing_sample(env, local);
  // MDB_BAD_TXN: an earlier lookup in this transaction met damage
  // (lookahead skips its failures; LMDB then refuses the transaction).
  detail::check_mdb(rc == MDB_BAD_TXN ? MDB_CORRUPTED : rc, what, env.path(), "index " + std::to_string(local));
  throw CorruptedError(std::string(what) + " failed at '" + env.path() + "'", rc, env.path());  // (unreached)
}

// Throws CorruptedError when a fault was contained on one of `envs`' maps
// (fault_guard.h): what was read may hold its zeros.
void check_intact(const std::vector<std::shared_ptr<Env>>& envs) {
  for (const auto& env : envs) env->check_intact();
}

// The LMDB value holding sample `local` of `env` (key local / per_value),
// looked up inside `txn`, bounds-checked.
MDB_val lookup_value(const Env& env, MDB_txn* txn, uint64_t local, uint32_t per_value) {
  unsigned char kbuf[8];
  encode_key(local / per_value, kbuf);
  MDB_val k{8, kbuf}, v{0, nullptr};
  const int rc = detail::guarded_get(txn, env.samples_dbi(), &k, &v);
  if (rc != MDB_SUCCESS) read_failed(env, rc, "mdb_get", local);
  env.check_sample_value(v, local);
  return v;
}

// The record of sample `local` of `env`, looked up inside `txn`.
MDB_val lookup(const Env& env, MDB_txn* txn, uint64_t local, uint32_t per_value) {
  return record_in(env, lookup_value(env, txn, local, per_value), local, per_value);
}

// Parses the value `v` of sample `local` of `env` and checks its layout
// against the reader's schema.
void parse(const Env& env, const MDB_val& v, uint64_t local, const Reader::State& s,
           std::vector<FieldView>& views) {
  RecordContext ctx{&env.path(), local};
  // Records of a dataset usually share one layout: a record matching the
  // template needs neither parsing nor a schema check, once the template's
  // layout has passed the check for this reader.
  thread_local RecordTemplate layout;
  thread_local uint64_t layout_checked_for = 0;  // Reader::State::id, 0 = none
  // (A compact record is parsed against the schema: never a template hit.)
  const bool hit = parse_record_cached(v.mv_data, v.mv_size, s.options.verify, ctx, views, layout, &s.stored);
  if (hit && layout_checked_for == s.id) return;
  // A compact record's views name the schema's own fields (their names
  // point into it): nothing to check, and the template is not this record's.
  if (!views.empty() && !s.stored.empty() && views[0].name == s.stored[0].name.data()) return;
  layout_checked_for = 0;
  check_layout(views, s.stored, env.path(), local);
  if (layout.size != 0) layout_checked_for = s.id;  // the template now holds this record's layout
}

// ---- cold reads (ReaderOptions::lookahead_bytes, keep_cache) ----------------

uintptr_t page_bytes() {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

long major_faults() {
  struct rusage u {};
  return ::getrusage(RUSAGE_THREAD, &u) == 0 ? u.ru_majflt : -1;
}

// Whether this thread's reads miss the page cache, from batch to batch.
struct ColdState {
  bool cold = false;
  int warm_batches = 0;  // batches in a row whose pages were all cached
  long majflt = -1;      // the thread's major faults after its last batch
};
thread_local ColdState cold_state;

// One batch's decision and bookkeeping. Without lookups ahead, a major fault
// since the thread's last batch makes the next batches look ahead; with
// them, 4 batches in a row whose pages were all cached end it (the faults
// themselves do not tell: pages requested ahead fault as minor).
class ColdBatch {
 public:
  explicit ColdBatch(const ReaderOptions& o)
      : enabled_(o.lookahead == LookaheadMode::Auto && o.lookahead_bytes > 0), budget_(o.lookahead_bytes) {
    if (o.lookahead == LookaheadMode::Always) ahead_ = o.lookahead_bytes;
    if (!enabled_) return;
    if (cold_state.majflt < 0) cold_state.majflt = major_faults();
    if (cold_state.cold) ahead_ = o.lookahead_bytes;
  }
  /// Bytes of the batch to request ahead (0: plain reads).
  size_t ahead() const { return ahead_; }
  /// Auto, not looking ahead: the bytes to request ahead should the batch's
  /// first sample turn out not to be cached (see Lookahead).
  size_t probe() const { return enabled_ && ahead_ == 0 ? budget_ : 0; }
  /// The probe found the first sample uncached: this batch looked ahead.
  void engaged() {
    ahead_ = budget_;
    cold_state.cold = true;
    cold_state.warm_batches = 0;
  }
  /// After the copies; `missing`: pages that were requested (not cached).
  void done(size_t missing, const Reader::State& s) {
    s.io_batches.fetch_add(1, std::memory_order_relaxed);
    if (ahead_ > 0) {
      s.io_lookahead.fetch_add(1, std::memory_order_relaxed);
      s.io_pages.fetch_add(missing, std::memory_order_relaxed);
    }
    if (!enabled_) return;
    const long now = major_faults();
    if (ahead_ == 0) {
      if (now > cold_state.majflt) {
        cold_state.cold = true;
        cold_state.warm_batches = 0;
      }
    } else if (missing == 0) {
      if (++cold_state.warm_batches >= 4) cold_state.cold = false;
    } else {
      cold_state.warm_batches = 0;
    }
    cold_state.majflt = now;
  }

 private:
  bool enabled_;
  size_t budget_;
  size_t ahead_ = 0;
};

// The page range of the map holding a value; for a value on overflow pages
// (it starts right after the 16-byte page header) the whole run of pages.
std::pair<uintptr_t, uintptr_t> value_pages(const MDB_val& v) {
  const uintptr_t page = page_bytes();
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.mv_data);
  return {p & ~(page - 1), (p + v.mv_size + page - 1) & ~(page - 1)};
}

// Requests the pages of `values` (at most `budget` bytes of them, in batch
// order) that are not in the page cache: the ranges are merged in address
// order (across gaps of up to `gap` bytes), mincore() tells which hold a
// missing page, and one madvise (MADV_WILLNEED: asynchronous reads) goes out
// per such range. Returns the number of missing pages.
size_t request_pages(const std::vector<MDB_val>& values, size_t budget, uintptr_t gap = 0) {
  thread_local std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  thread_local std::vector<unsigned char> resident;
  ranges.clear();
  size_t bytes = 0;
  for (const MDB_val& v : values) {
    if (bytes >= budget) break;
    const auto r = value_pages(v);
    if (r.second <= r.first) continue;
    ranges.push_back(r);
    bytes += r.second - r.first;
  }
  std::sort(ranges.begin(), ranges.end());
  size_t merged = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (merged > 0 && ranges[i].first <= ranges[merged - 1].second + gap) {
      ranges[merged - 1].second = std::max(ranges[merged - 1].second, ranges[i].second);
    } else {
      ranges[merged++] = ranges[i];
    }
  }
  const uintptr_t page = page_bytes();
  size_t missing = 0;
  for (size_t i = 0; i < merged; ++i) {
    const auto [begin, end] = ranges[i];
    resident.resize((end - begin) / page);
    size_t absent = resident.size();
    if (::mincore(reinterpret_cast<void*>(begin), end - begin, resident.data()) == 0)
      absent = static_cast<size_t>(std::count_if(resident.begin(), resident.end(),
                                                  [](unsigned char r) { return (r & 1) == 0; }));
    if (absent == 0) continue;
    // The kernel reads at most max(read-ahead window, largest request) of one
    // MADV_WILLNEED call and drops the rest (a 16 MiB call read 2-4 MiB):
    // pieces of 128 KiB (the default window), which the block layer merges
    // back into large requests.
    constexpr uintptr_t kPiece = uintptr_t{128} << 10;
    for (uintptr_t at = begin; at < end; at += kPiece)
      ::madvise(reinterpret_cast<void*>(at), std::min(kPiece, end - at), MADV_WILLNEED);
    missing += absent;
  }
  return missing;
}

// The samples of a batch, looked up two ahead of their parse: the first
// bytes of each value are prefetched as soon as it is found, so that their
// cache misses overlap with the B-tree searches and copies of the samples
// before it instead of stalling the parse (tiny random reads: a sixth of the
// time went to the first touch of the record; 16 KiB samples on 2 threads:
// two ahead read +2 % over one ahead in 14 paired rounds).
//
// Runs of consecutive indices (sequential batches) are walked with a cursor
// per file: the first sample of a run is searched with MDB_SET_KEY, each
// next one is the cursor's next entry (MDB_NEXT: no descent from the root;
// tiny sequential reads 1.3-1.5x raw mdb_get). Other samples are searched
// with mdb_get, and so is a next entry with another key (a gap), which then
// gets lookup()'s error.
class Lookahead {
 public:
  // `ahead` > 0 (a cold thread, see ColdBatch): every sample is looked up
  // first and the pages of up to `ahead` bytes of them are requested at once.
  // `probe` > 0: the same with `probe` bytes if the first sample's first
  // page is not in the page cache (one mincore; probed() tells).
  Lookahead(const Reader::State& s, const std::vector<std::shared_ptr<Env>>& envs,
            at::ArrayRef<size_t> indices, std::vector<ReadTxn>& txns, size_t ahead = 0, size_t probe = 0)
      : s_(s), envs_(envs), indices_(indices), txns_(txns), cursors_(envs.size()), index_(envs.size()),
        keep_(s.options.keep_cache) {
    if (indices.empty()) return;
    if (ahead == 0) {
      next_ = find(0);
      if (probe == 0 || cached(next_.value)) {
        if (indices.size() > 1) after_ = find(1);
        return;
      }
      probed_ = true;
      ahead = probe;
    }
    found_.reserve(indices.size());
    thread_local std::vector<MDB_val> values;
    values.clear();
    bool packed = false;
    for (size_t i = 0; i < indices.size(); ++i) {
      found_.push_back(i == 0 && probed_ ? next_ : find(i, /*slice=*/false));
      const Found& f = found_.back();
      if (f.per_value > 1 && f.value.mv_data == nullptr) {
        // A packed value: where its record lies is in the value's header.
        packed = true;
        values.push_back(MDB_val{std::min(f.whole.mv_size, packed_header_bytes(f.per_value)), f.whole.mv_data});
      }
    }
    // Headers of packed values first (their reads overlap), then the records.
    if (packed) missing_ += request_pages(values, ahead);
    values.clear();
    for (Found& f : found_) {
      if (f.value.mv_data == nullptr) f.value = record_in(*f.env, f.whole, f.local, f.per_value);
      values.push_back(f.value);
    }
    missing_ += request_pages(values, ahead);
  }

  // The batch looked ahead because its first sample was not cached.
  bool probed() const { return probed_; }

  // Parses sample i (called for i = 0, 1, ... in order) into `views`.
  void parse_next(size_t i, std::vector<FieldView>& views) {
    if (!found_.empty()) {
      const Found& cur = found_[i];
      if (!keep_) parsed_.push_back(cur);
      parse(*cur.env, cur.value, cur.local, s_, views);
      return;
    }
    const Found cur = next_;
    next_ = after_;
    if (i + 2 < indices_.size()) after_ = find(i + 2);
    if (!keep_) parsed_.push_back(cur);
    parse(*cur.env, cur.value, cur.local, s_, views);
  }

  // Pages requested ahead that were not cached.
  size_t missing() const { return missing_; }

  // keep_cache = false: drops the pages of the parsed samples (call once
  // their copies are done, while the transactions live).
  void evict() {
    for (const Found& f : parsed_) {
      const auto [begin, end] = value_pages(f.value);
      const uintptr_t p = reinterpret_cast<uintptr_t>(f.value.mv_data);
      // A value on overflow pages owns its whole run; another shares its page.
      if (p - begin == 16) {
        f.env->evict(reinterpret_cast<const void*>(begin), end - begin);
      } else {
        f.env->evict(f.value.mv_data, f.value.mv_size);
      }
    }
    parsed_.clear();
  }

 private:
  struct Found {
    const Env* env = nullptr;
    uint64_t local = 0;
    MDB_val value{0, nullptr};  // the record (null: a packed value's slot not yet found)
    MDB_val whole{0, nullptr};  // the LMDB value holding it
    uint32_t per_value = 1;
  };
  // Read-only cursors are closed explicitly, here before their txns end
  // (the callers' txns outlive this object).
  struct CursorCloser {
    void operator()(MDB_cursor* c) const noexcept { mdb_cursor_close(c); }
  };
  struct Cursor {
    std::unique_ptr<MDB_cursor, CursorCloser> cursor;
    uint64_t at = 0;            // the key it points at
    MDB_val value{0, nullptr};  // its value
    bool positioned = false;
  };

  // Sample i's value; with `slice` (or one record per value) also its record.
  Found find(size_t i, bool slice = true) {
    const auto loc = s_.locate(indices_[i]);
    const Env& env = *envs_[loc.first];
    if (txns_[loc.first].get() == nullptr) {
      txns_[loc.first] = env.read_txn();
      index_[loc.first] = env.value_index(txns_[loc.first].get(), s_.options.value_index_bytes / ValueIndex::kSlotBytes);
    }
    const bool run = i + 1 < indices_.size() && indices_[i + 1] == indices_[i] + 1;
    Found f{&env, loc.second, {0, nullptr}, {0, nullptr}, s_.per_value[loc.first]};
    f.whole = seek(env, loc.first, loc.second, f.per_value, run);
    if (f.per_value <= 1) {
      f.value = f.whole;
    } else if (slice) {
      f.value = record_in(env, f.whole, f.local, f.per_value);
    } else {
      return f;  // the header's pages are requested first (the lookahead)
    }
    // Every cache line of the record's first kPrefetchBytes (all of a small
    // record), then the first line of each further page of a large record
    // (up to kPrefetchPages) and its last line (where its last field and
    // checksum lie): each page's first touch (a TLB miss, and the hardware
    // prefetcher stops at page boundaries) then overlaps the copy of the
    // sample before it (16 KiB samples, 2 threads: +8 to +10 %).
    const uintptr_t begin = reinterpret_cast<uintptr_t>(f.value.mv_data);
    const uintptr_t end = begin + std::min<size_t>(f.value.mv_size, kPrefetchBytes);
    for (uintptr_t line = begin & ~uintptr_t{63}; line < end; line += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(line));
    if (f.value.mv_size > kPrefetchBytes) {
      const uintptr_t last = begin + f.value.mv_size - 1;
      const uintptr_t page = page_bytes();
      const uintptr_t stop = std::min(last, begin + kPrefetchPages * page);
      for (uintptr_t at = (begin | (page - 1)) + 1; at <= stop; at += page)
        __builtin_prefetch(reinterpret_cast<const void*>(at));
      __builtin_prefetch(reinterpret_cast<const void*>(last));
    }
    return f;
  }

  // The value holding `local` in `file` (key local / per_value); `run`: the
  // next sample follows it.
  MDB_val seek(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run) {
    Cursor& c = cursors_[file];
    const uint64_t key = local / per_value;
    if (c.positioned && key == c.at) return c.value;  // the next record of a packed value
    ValueIndex* index = index_[file].get();
    if (index != nullptr) {
      const MDB_val known = index->find(key);
      if (known.mv_data != nullptr) {
        env.check_sample_value(known, local);  // (as every value LMDB returns)
        return known;
      }
    }
    const MDB_val v = search(env, file, local, per_value, run);
    if (index != nullptr) index->store(key, v);
    return v;
  }

  // seek() in the B-tree.
  MDB_val search(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run) {
    Cursor& c = cursors_[file];
    MDB_txn* txn = txns_[file].get();
    const uint64_t key = local / per_value;
    MDB_val k{0, nullptr}, v{0, nullptr};
    if (c.positioned && key == c.at + 1 && detail::guarded_cursor_get(c.cursor.get(), &k, &v, MDB_NEXT) == MDB_SUCCESS &&
        k.mv_size == 8 && decode_key(static_cast<const unsigned char*>(k.mv_data)) == key) {
      env.check_sample_value(v, local);
      c.at = key;
      c.value = v;
      return v;
    }
    c.positioned = false;
    // A search through a positioned cursor is ~10 % slower than mdb_get
    // (tiny random reads): the cursor is only positioned for a run.
    if (run) {
      if (c.cursor == nullptr) {
        MDB_cursor* opened = nullptr;
        const int rc = mdb_cursor_open(txn, env.samples_dbi(), &opened);
        if (rc != MDB_SUCCESS) read_failed(env, rc, "mdb_cursor_open", local);
        c.cursor.reset(opened);
      }
      unsigned char kbuf[8];
      encode_key(key, kbuf);
      k = MDB_val{8, kbuf};
      if (detail::guarded_cursor_get(c.cursor.get(), &k, &v, MDB_SET_KEY) == MDB_SUCCESS) {
        env.check_sample_value(v, local);
        c.at = key;
        c.value = v;
        c.positioned = true;
        return v;
      }
    }
    return lookup_value(env, txn, local, per_value);  // (on a failed search: throws the error of this index)
  }

  static constexpr size_t kPrefetchBytes = 256;
  static constexpr size_t kPrefetchPages = 16;
  const Reader::State& s_;
  const std::vector<std::shared_ptr<Env>>& envs_;
  at::ArrayRef<size_t> indices_;
  std::vector<ReadTxn>& txns_;
  std::vector<Cursor> cursors_;
  std::vector<std::shared_ptr<ValueIndex>> index_;  // per file: its snapshot's values (or none)
  Found next_, after_;  // samples i + 1 and i + 2 while sample i is parsed
  bool keep_;
  std::vector<Found> found_;   // every sample, when looking ahead
  std::vector<Found> parsed_;  // keep_cache = false: what to evict
  size_t missing_ = 0;
  bool probed_ = false;

  static bool cached(const MDB_val& v) {
    const uintptr_t page = page_bytes();
    unsigned char in = 0;
    void* first = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(v.mv_data) & ~(page - 1));
    return v.mv_size == 0 || ::mincore(first, page, &in) != 0 || (in & 1) != 0;
  }
};

// Copies a row-major block of shape `src_shape` into a larger row-major
// block of shape `dst_shape` (padding), last dimension at a time.
void copy_padded(char* dst, const int64_t* dst_shape, const char* src, const int64_t* src_shape,
                 int ndim, size_t itemsize) {
  if (ndim == 0) {
    std::memcpy(dst, src, itemsize);
    return;
  }
  if (ndim == 1) {
    std::memcpy(dst, src, static_cast<size_t>(src_shape[0]) * itemsize);
    return;
  }
  size_t dst_inner = itemsize, src_inner = itemsize;
  for (int d = 1; d < ndim; ++d) {
    dst_inner *= static_cast<size_t>(dst_shape[d]);
    src_inner *= static_cast<size_t>(src_shape[d]);
  }
  for (int64_t i = 0; i < src_shape[0]; ++i)
    copy_padded(dst + i * dst_inner, dst_shape + 1, src + i * src_inner, src_shape + 1, ndim - 1,
                itemsize);
}


// ---- shard manifests --------------------------------------------------------
// A directory holding manifest.json is one dataset of the shards it lists
// (README "Shards with a manifest"). The manifest is written last, so a
// directory of shards without one is an unfinished write: refused, named.

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kManifestFormat = "torch_lmdb.manifest";
// Version 2 adds `dataset_id`, which each shard's metadata `shard` repeats
// with its index and the number of shards; version 1 directories (no
// identity) stay readable.
constexpr int64_t kManifestVersion = 2;
constexpr int64_t kMinManifestVersion = 1;
constexpr std::streamoff kMaxManifestBytes = std::streamoff{64} << 20;

struct ShardExpectation {
  std::string manifest;  // path of manifest.json; empty for a plain database path
  size_t shard = 0;      // index in the manifest's list
  size_t num_samples = 0;
  std::string meta_checksum;
  std::vector<FieldSchema> schema;
  std::string dataset_id;  // manifest version 2: the identity the shard's metadata must state
  size_t shards = 0;       // how many the manifest lists
};

// The directory's canonical path (realpath) with a trailing '/', or "" when
// it cannot be resolved.
std::string canonical_dir(const std::string& p) {
  char* resolved = ::realpath(p.c_str(), nullptr);
  if (resolved == nullptr) return std::string();
  std::string out(resolved);
  std::free(resolved);
  return out.back() == '/' ? out : out + "/";
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Names of sub-directories of `dir` that hold an LMDB data file (shards).
std::vector<std::string> shard_like_entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (is_file(join(join(dir, name), "data.mdb"))) out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

[[noreturn]] void bad_manifest(const std::string& manifest, const std::string& why) {
  throw InvalidDatabaseError("shard manifest '" + manifest + "' is invalid: " + why, 0, manifest);
}

// Parses dir/manifest.json; appends its shards to `paths` and `expect`.
void expand_manifest(const std::string& dir, std::vector<std::string>& paths,
                     std::vector<ShardExpectation>& expect) {
  const std::string manifest = join(dir, kManifestName);
  std::ifstream in(manifest, std::ios::binary);
  if (!in) throw NotFoundError("cannot read shard manifest '" + manifest + "'", ENOENT, manifest);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0 || size > kMaxManifestBytes)
    bad_manifest(manifest, "size " + std::to_string(size) + " bytes (at most " + std::to_string(kMaxManifestBytes) +
                               ")");
  in.seekg(0);
  std::string text(static_cast<size_t>(size), '\0');
  in.read(&text[0], size);
  if (in.gcount() != size) bad_manifest(manifest, "short read");
  if (detail::json_depth(text.data(), text.size()) > detail::kMaxMetaDepth)
    bad_manifest(manifest, "nested deeper than " + std::to_string(detail::kMaxMetaDepth) + " levels");
  detail::Json j = detail::Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad_manifest(manifest, "not JSON");
  if (!j.is_object()) bad_manifest(manifest, "expected a JSON object, got " + std::string(j.type_name()));
  if (j.value("format", std::string()) != kManifestFormat)
    bad_manifest(manifest, std::string("'format' is not \"") + kManifestFormat + "\"");
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    bad_manifest(manifest, "no integer 'format_version'");
  const int64_t version = j["format_version"].get<int64_t>();
  if (version < kMinManifestVersion || version > kManifestVersion)
    bad_manifest(manifest, "format version " + std::to_string(version) + " (this torch_lmdb reads versions " +
                               std::to_string(kMinManifestVersion) + " to " + std::to_string(kManifestVersion) + ")");
  std::string dataset_id;
  if (version >= 2) {
    if (!j.contains("dataset_id") || !j["dataset_id"].is_string() || j["dataset_id"].get<std::string>().empty())
      bad_manifest(manifest, "no 'dataset_id' (a version 2 manifest names its dataset)");
    dataset_id = j["dataset_id"].get<std::string>();
  }
  const std::string root = canonical_dir(dir);
  std::set<std::string> seen;  // shards' canonical paths
  size_t total = 0;
  if (!j.contains("schema")) bad_manifest(manifest, "no 'schema'");
  const std::vector<FieldSchema> schema = detail::schema_from_json(j["schema"], manifest);
  if (!j.contains("shards") || !j["shards"].is_array() || j["shards"].empty())
    bad_manifest(manifest, "'shards' is not a non-empty list");
  size_t k = 0;
  for (const auto& shard : j["shards"]) {
    const std::string where = "shards[" + std::to_string(k) + "]";
    if (!shard.is_object()) bad_manifest(manifest, where + " is not an object");
    if (!shard.contains("path") || !shard["path"].is_string()) bad_manifest(manifest, where + " has no 'path'");
    const std::string rel = shard["path"].get<std::string>();
    // Paths stay inside the manifest's directory: relative, no "..".
    bool escapes = rel.empty() || rel[0] == '/';
    for (size_t pos = 0; !escapes && pos <= rel.size();) {
      const size_t end = std::min(rel.find('/', pos), rel.size());
      escapes = rel.compare(pos, end - pos, "..") == 0 && end - pos == 2;
      pos = end + 1;
    }
    if (escapes) bad_manifest(manifest, where + " path '" + rel + "' is not a relative path inside the directory");
    if (!shard.contains("num_samples") || !shard["num_samples"].is_number_unsigned())
      bad_manifest(manifest, where + " ('" + rel + "') has no 'num_samples'");
    if (!shard.contains("meta_xxh3_64") || !shard["meta_xxh3_64"].is_string())
      bad_manifest(manifest, where + " ('" + rel + "') has no 'meta_xxh3_64'");
    const std::string path = join(dir, rel);
    if (!is_file(join(path, "data.mdb")))
      throw NotFoundError("shard '" + path + "' listed in '" + manifest + "' is missing (no data.mdb)", ENOENT, path);
    // Resolved, a shard stays inside the directory (no symlink out of it),
    // and is listed once.
    const std::string real = canonical_dir(path);
    if (root.empty() || real.size() <= root.size() || real.compare(0, root.size(), root) != 0)
      bad_manifest(manifest, where + " '" + rel + "' resolves to '" + real + "', outside the directory '" + root + "'");
    const std::string data_real = canonical_dir(join(path, "data.mdb"));
    if (data_real.compare(0, root.size(), root) != 0)
      bad_manifest(manifest, where + " '" + rel + "' has a data.mdb outside the directory ('" + data_real + "')");
    if (!seen.insert(real).second) bad_manifest(manifest, where + " '" + rel + "' is listed twice");
    const size_t n = shard["num_samples"].get<size_t>();
    total += n;
    paths.push_back(path);
    expect.push_back(ShardExpectation{manifest, k, n, shard["meta_xxh3_64"].get<std::string>(), schema, dataset_id,
                                      j["shards"].size()});
    ++k;
  }
  if (!j.contains("num_samples") || !j["num_samples"].is_number_unsigned() || j["num_samples"].get<size_t>() != total)
    bad_manifest(manifest, "'num_samples' is " + (j.contains("num_samples") ? j["num_samples"].dump() : "missing") +
                               " but its shards list " + std::to_string(total) + " samples");
}

// Plain database paths stay; manifest directories become their shards.
std::vector<std::string> expand_paths(const std::vector<std::string>& given, std::vector<ShardExpectation>& expect) {
  std::vector<std::string> out;
  for (const auto& p : given) {
    if (is_dir(p) && is_file(join(p, kManifestName))) {
      expand_manifest(p, out, expect);
      continue;
    }
    if (is_dir(p) && !is_file(join(p, "data.mdb"))) {
      const auto shards = shard_like_entries(p);
      if (!shards.empty())
        throw InvalidDatabaseError("'" + p + "' holds " + std::to_string(shards.size()) + " shard database(s) ('" +
                                       shards[0] + "'...) but no manifest.json: an incomplete write (the manifest " +
                                       "is written last, once every shard is complete)",
                                   0, p);
    }
    out.push_back(p);
    expect.push_back(ShardExpectation{});
  }
  return out;
}

bool same_fields(const std::vector<FieldSchema>& got, const std::vector<FieldSchema>& want) {
  if (got.size() != want.size()) return false;
  for (size_t f = 0; f < got.size(); ++f) {
    if (got[f].name != want[f].name || got[f].kind != want[f].kind || got[f].dtype != want[f].dtype ||
        got[f].shape.size() != want[f].shape.size())
      return false;
    for (size_t d = 0; d < got[f].shape.size(); ++d)
      if (want[f].shape[d] != -1 && got[f].shape[d] != want[f].shape[d]) return false;
  }
  return true;
}

}  // namespace

namespace {
std::string xxh3_hex(const std::string& text) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits(text.data(), text.size())));
  return hex;
}
}  // namespace

std::string metadata_checksum(const std::string& meta_json) {
  // Canonical form (docs/FORMAT.md): nlohmann::json sorts object keys by
  // their bytes at every depth; dump() adds no whitespace.
  const nlohmann::json parsed = nlohmann::json::parse(meta_json, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!parsed.is_discarded(), "metadata_checksum: the metadata is not JSON");
  return xxh3_hex(parsed.dump());
}

namespace {

// Whether a Writer holds `path`: one of this process (its claim on the env),
// or of any process (its fcntl lock on writer.lock, listed in /proc/locks).
// Never opens writer.lock: closing any descriptor of a file drops this
// process's fcntl locks on it, a Writer's among them.
bool writer_alive(const std::string& path, const Env& env) {
  if (env.writer_claimed()) return true;
  struct stat st {};
  if (::stat((path + "/writer.lock").c_str(), &st) != 0) return false;
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    if (line.find("->") != std::string::npos) continue;  // a waiter, not a holder
    // "<n>: POSIX  ADVISORY  WRITE <pid> <major>:<minor>:<inode> <start> <end>" (major, minor in hex)
    std::istringstream in(line);
    std::string id, kind, mode, rw, pid, file;
    if (!(in >> id >> kind >> mode >> rw >> pid >> file)) continue;
    unsigned dev_major = 0, dev_minor = 0;
    unsigned long long inode = 0;
    if (std::sscanf(file.c_str(), "%x:%x:%llu", &dev_major, &dev_minor, &inode) != 3) continue;
    if (inode == static_cast<unsigned long long>(st.st_ino) && dev_major == major(st.st_dev) &&
        dev_minor == minor(st.st_dev))
      return true;
  }
  return false;
}

// A database left incomplete by a dead writer is reported once per process
// (every reader of every worker would repeat it otherwise).
bool first_report(const std::string& path) {
  static std::mutex mutex;
  static std::set<std::string> reported;
  std::lock_guard<std::mutex> lock(mutex);
  return reported.insert(path).second;
}

}  // namespace

Reader::Reader(std::vector<std::string> paths, ReaderOptions options)
    : state_(std::make_shared<State>()) {
  TORCH_CHECK_VALUE(!paths.empty(), "Reader needs at least one path");
  State& s = *state_;
  std::vector<ShardExpectation> expect;
  s.paths = expand_paths(paths, expect);
  s.options = std::move(options);
  s.offsets.push_back(0);
  const auto warn = s.options.warn ? s.options.warn
                                   : [](const std::string& m) { TORCH_WARN(m); };
  for (size_t i = 0; i < s.paths.size(); ++i) {
    const std::string& path = s.paths[i];
    auto env = Env::open(path, s.env_options());
    detail::Json meta;
    {
      ReadTxn txn = env->read_txn();
      meta = detail::read_meta(*env, txn.get());
    }
    detail::check_layout(meta, path);  // damage or an edit first: then what the keys say
    const auto info = detail::validate_meta(meta, path);  // every key and its JSON type, before the uses below
    auto invalid = [&](const std::string& why) {
      throw InvalidDatabaseError("'" + path + "' is not a readable torch_lmdb database: " + why, 0, path);
    };
    if (meta.value("format", std::string()) != "torch_lmdb") invalid("metadata 'format' is not \"torch_lmdb\"");
    if (!meta.contains("format_version") || !meta["format_version"].is_number_integer()) invalid("no 'format_version'");
    const int64_t version = meta["format_version"].get<int64_t>();
    if (version < kMinFormatVersion || version > kMaxFormatVersion)
      invalid("format version " + std::to_string(version) + " (this torch_lmdb reads versions " +
              std::to_string(kMinFormatVersion) + " to " + std::to_string(kMaxFormatVersion) + ")");
    if (meta.value("byte_order", std::string("little")) != "little") invalid("byte order is not little-endian");
    if (!meta.contains("num_samples") || !meta["num_samples"].is_number_unsigned()) invalid("no 'num_samples'");
    const size_t n = meta["num_samples"].get<size_t>();
    auto schema = detail::schema_from_json(meta.value("schema", detail::Json::array()), path);
    if (!expect[i].manifest.empty()) {
      const ShardExpectation& e = expect[i];
      auto mismatch = [&](const std::string& why) {
        throw InvalidDatabaseError("shard '" + path + "' (shards[" + std::to_string(e.shard) + "] of '" + e.manifest +
                                       "') does not match the manifest: " + why,
                                   0, path);
      };
      if (n != e.num_samples)
        mismatch(std::to_string(n) + " samples, the manifest says " + std::to_string(e.num_samples));
      if (!same_fields(schema, e.schema)) mismatch("its fields or dtypes differ from the manifest's schema");
      const std::string sum = metadata_checksum(meta.dump());
      // A version 1 manifest hashed the text as stored (no canonical form).
      if (sum != e.meta_checksum && !(e.dataset_id.empty() && xxh3_hex(meta.dump()) == e.meta_checksum))
        mismatch("metadata checksum " + sum + ", the manifest says " + e.meta_checksum +
                 " (the shard was rewritten or altered after the manifest)");
      // The checksum may have been recomputed: the shard's own identity.
      if (!e.dataset_id.empty()) {
        const detail::Json want{{"dataset_id", e.dataset_id}, {"index", e.shard}, {"count", e.shards}};
        const detail::Json got = meta.value("shard", detail::Json());
        if (got != want)
          mismatch("it is " + (got.is_null() ? std::string("no shard of a dataset") : "shard " + got.dump()) +
                   ", the manifest lists it as " + want.dump() +
                   " (a shard listed twice, left out, moved or taken from another dataset)");
      }
    }
    if (!meta.value("complete", false)) {
      s.complete = false;
      // A live writer's database is incomplete until it closes: nothing to report.
      if (!writer_alive(path, *env) && first_report(path))
        warn("torch_lmdb: '" + path + "' is incomplete (its writer did not close cleanly); reading its " +
             std::to_string(n) + " committed samples");
    }
    if (i == 0 || s.stored.empty()) {
      s.stored = schema;
    } else if (n > 0) {
      bool same = schema.size() == s.stored.size();
      for (size_t f = 0; same && f < schema.size(); ++f) {
        same = schema[f].name == s.stored[f].name && schema[f].kind == s.stored[f].kind &&
               schema[f].dtype == s.stored[f].dtype && schema[f].shape.size() == s.stored[f].shape.size();
        for (size_t d = 0; same && d < schema[f].shape.size(); ++d)
          if (schema[f].shape[d] != s.stored[f].shape[d]) s.stored[f].shape[d] = -1;
      }
      if (!same)
        throw InvalidDatabaseError("'" + path + "' has other fields or dtypes than '" + s.paths[0] +
                                       "'; files of one dataset must share a schema",
                                   0, path);
    }
    s.offsets.push_back(s.offsets.back() + n);
    s.meta_json.push_back(meta.dump());
    s.per_value.push_back(static_cast<uint32_t>(info.samples_per_value));
    s.envs.push_back(std::move(env));
  }
  s.generation.store(fork_generation());
  s.buffers = std::make_shared<BufferPool>(s.options.batch_cache_bytes);
  s.keep.assign(s.stored.size(), s.options.fields.empty() ? 1 : 0);
  for (const auto& name : s.options.fields) {
    auto it = std::find_if(s.stored.begin(), s.stored.end(), [&](const FieldSchema& f) { return f.name == name; });
    if (it == s.stored.end()) {
      std::string names;
      for (const auto& f : s.stored) names += (names.empty() ? "" : ", ") + f.name;
      TORCH_CHECK_VALUE(false, "unknown field '", name, "' in '", s.paths[0], "'; available: ", names);
    }
    s.keep[static_cast<size_t>(it - s.stored.begin())] = 1;
  }
  for (size_t f = 0; f < s.stored.size(); ++f)
    if (s.keep[f]) s.schema.push_back(s.stored[f]);
}

size_t Reader::size() const { return state_->offsets.back(); }

std::vector<Field> Reader::get_fields(size_t index) const {
  State& s = *state_;
  const auto loc = s.locate(index);
  const Env& env = *s.current_envs()[loc.first];
  thread_local std::vector<FieldView> views;
  std::vector<Field> out;
  ReadTxn txn = env.read_txn();
  parse(env, lookup(env, txn.get(), loc.second, s.per_value[loc.first]), loc.second, s, views);
  out.reserve(s.schema.size());
  for (size_t f = 0; f < views.size(); ++f)
    if (s.keep[f]) out.push_back(Field{views[f].name_str(), views[f].kind, to_tensor(views[f])});
  env.check_intact();  // a fault contained while reading (fault_guard.h): nothing read is returned
  return out;
}

std::vector<Sample> Reader::get_many(at::ArrayRef<size_t> indices) const {
  State& s = *state_;
  const auto& envs = s.current_envs();
  std::vector<ReadTxn> txns(envs.size());
  thread_local std::vector<FieldView> views;
  std::vector<Sample> out;
  out.reserve(indices.size());
  Lookahead samples(s, envs, indices, txns);
  for (size_t i = 0; i < indices.size(); ++i) {
    samples.parse_next(i, views);
    Sample sample;
    sample.reserve(s.schema.size());
    for (size_t f = 0; f < views.size(); ++f)
      if (s.keep[f]) sample.insert(views[f].name_str(), to_tensor(views[f]));
    out.push_back(std::move(sample));
  }
  check_intact(envs);
  return out;
}

namespace {

// read_batch for batches whose tensor fields all keep the first sample's
// shape (the common case): the outputs are allocated from sample 0, then each
// sample is fetched and copied at once, so the views of one sample stay in
// cache (collecting every sample's views first cost 10-30 % on tiny samples).
// Returns false, having returned nothing, at the first shape that differs:
// the caller then takes the general path (padding, errors).
bool read_batch_fixed(const Reader::State& s, const std::vector<std::shared_ptr<Env>>& envs,
                      at::ArrayRef<size_t> indices, std::vector<ReadTxn>& txns, Batch& batch,
                      ColdBatch& cold, unsigned threads, bool around_cache) {
  const size_t B = indices.size();
  // Compressed payloads decoded on `threads` threads: helpers take them as
  // soon as their records are parsed (their views stay valid: the txns are
  // open until the caller returns), this thread takes the rest at the end.
  struct Decode {
    FieldView view;
    char* dst;
  };
  thread_local std::vector<Decode> decodes;
  decodes.clear();
  constexpr size_t kPublishEvery = 4;  // items published at a time
  thread_local std::vector<FieldView> first, cur;
  struct Out {
    size_t field;
    char* dst = nullptr;
    size_t slot = 0;
    Batch::Blobs* blobs = nullptr;
  };
  thread_local std::vector<Out> outs;
  outs.clear();
  std::vector<at::Tensor> tensors;
  // Declared after the tensors: on an early return or an exception, its
  // destructor waits for the helpers before the tensors go.
  std::unique_ptr<DecodePool::Job> job;
  batch.blobs.reserve(s.stored.size());
  Lookahead samples(s, envs, indices, txns, cold.ahead(), cold.probe());
  if (samples.probed()) cold.engaged();
  for (size_t i = 0; i < B; ++i) {
    std::vector<FieldView>& v = i == 0 ? first : cur;
    samples.parse_next(i, v);
    if (i == 0) {
      for (size_t f = 0; f < s.stored.size(); ++f) {
        if (!s.keep[f]) continue;
        const FieldSchema& field = s.stored[f];
        Out o{f};
        if (field.kind != FieldKind::Tensor) {
          batch.blobs.push_back(Batch::Blobs{field.name, field.kind, {}});
          batch.blobs.back().values.reserve(B);
          o.blobs = &batch.blobs.back();
        } else {
          std::vector<int64_t> shape{static_cast<int64_t>(B)};
          shape.insert(shape.end(), v[f].sizes, v[f].sizes + v[f].ndim);
          tensors.push_back(s.buffers->empty(shape, field.dtype, v[f].data));
          o.dst = static_cast<char*>(tensors.back().data_ptr());
          o.slot = v[f].nbytes;
        }
        outs.push_back(o);
      }
      // Helpers when the batch's compressed payloads, estimated from this
      // sample's, come to kParallelBytes (fewer helpers for smaller batches).
      constexpr size_t kParallelBytes = size_t{256} << 10;
      size_t compressed = 0;
      for (const Out& o : outs)
        if (o.blobs == nullptr && o.slot && v[o.field].codec != Codec::None) compressed += v[o.field].stored;
      const size_t estimate = compressed * B;
      if (threads > 1 && estimate >= kParallelBytes) {
        decodes.reserve(B * outs.size());  // never reallocated while the helpers read it
        const Decode* items = decodes.data();
        job = std::make_unique<DecodePool::Job>(
            static_cast<unsigned>(std::min<size_t>(threads - 1, estimate / (kParallelBytes / 2))),
            [items](size_t k) { decode_payload(items[k].view, items[k].dst); });
      }
    }
    for (Out& o : outs) {
      const FieldView& fv = v[o.field];
      if (o.blobs != nullptr) {
        o.blobs->values.emplace_back(fv.data, fv.nbytes);
        continue;
      }
      if (i > 0) {
        const FieldView& f0 = first[o.field];
        if (fv.ndim != f0.ndim || !std::equal(fv.sizes, fv.sizes + fv.ndim, f0.sizes)) {
          batch = Batch();
          return false;  // (the general path reads the batch again: nothing is evicted yet)
        }
      }
      if (o.slot == 0) continue;
      if (job && fv.codec != Codec::None && decodes.size() < decodes.capacity()) {
        decodes.push_back(Decode{fv, o.dst + i * o.slot});
        if (decodes.size() % kPublishEvery == 0) job->publish(decodes.size());
      } else {
        decode_to_slot(fv, o.dst + i * o.slot, around_cache);  // a copy, or Blosc straight into the batch
      }
    }
  }
#if defined(__SSE2__)
  if (around_cache) _mm_sfence();  // non-temporal stores are ordered before the batch is handed over
#endif
  if (job) {
    job->publish(decodes.size());
    job->finish();
  }
  size_t t = 0;
  for (const Out& o : outs) {
    const std::string& name = s.stored[o.field].name;
    batch.order.push_back(name);
    if (o.blobs == nullptr) batch.tensors.insert(name, std::move(tensors[t++]));
  }
  samples.evict();
  cold.done(samples.missing(), s);
  return true;
}

}  // namespace

Batch Reader::read_batch(at::ArrayRef<size_t> indices, const BatchOptions& options) const {
  State& s = *state_;
  const auto& envs = s.current_envs();
  const size_t B = indices.size();
  TORCH_CHECK_VALUE(B > 0, "read_batch needs at least one index");
  ColdBatch cold(s.options);
  if (!options.allocate) {  // (a caller's allocator is only asked for the outputs it gets)
    std::vector<ReadTxn> txns(envs.size());
    Batch batch;
    if (read_batch_fixed(s, envs, indices, txns, batch, cold, decode_threads(s.options, options), options.read_ahead)) {
      check_intact(envs);
      return batch;
    }
  }
  // Views point into the map: every txn stays open until the copies are done.
  std::vector<ReadTxn> txns(envs.size());
  thread_local std::vector<std::vector<FieldView>> views;
  if (views.size() < B) views.resize(B);
  Lookahead samples(s, envs, indices, txns, cold.ahead(), cold.probe());
  if (samples.probed()) cold.engaged();
  for (size_t i = 0; i < B; ++i) samples.parse_next(i, views[i]);

  Batch batch;
  for (size_t f = 0; f < s.stored.size(); ++f) {
    if (!s.keep[f]) continue;
    const FieldSchema& field = s.stored[f];
    batch.order.push_back(field.name);
    if (field.kind != FieldKind::Tensor) {
      Batch::Blobs blobs{field.name, field.kind, {}};
      blobs.values.reserve(B);
      for (size_t i = 0; i < B; ++i) blobs.values.emplace_back(views[i][f].data, views[i][f].nbytes);
      batch.blobs.push_back(std::move(blobs));
      continue;
    }
    const FieldView& first = views[0][f];
    const int ndim = first.ndim;
    std::vector<int64_t> shape(first.sizes, first.sizes + ndim);
    bool varies = false;
    size_t odd = 0;
    for (size_t i = 1; i < B; ++i) {
      const FieldView& v = views[i][f];
      bool same = v.ndim == ndim;
      for (int d = 0; same && d < ndim; ++d) same = v.sizes[d] == first.sizes[d];
      if (!same) {
        if (!varies) odd = i;
        varies = true;
        TORCH_CHECK_VALUE(v.ndim == ndim, "field '", field.name, "' has ", v.ndim, " dims at index ",
                          indices[i], " but ", ndim, " at index ", indices[0]);
        for (int d = 0; d < ndim; ++d) shape[d] = std::max(shape[d], v.sizes[d]);
      }
    }
    const bool pad = options.pad || std::find(options.pad_fields.begin(), options.pad_fields.end(),
                                              field.name) != options.pad_fields.end();
    TORCH_CHECK_VALUE(!varies || pad, "field '", field.name, "' has shape ", views[odd][f].shape(),
                      " at index ", indices[odd], " but ", first.shape(), " at index ", indices[0],
                      "; set BatchOptions::pad (or name it in BatchOptions::pad_fields) to pad it");
    std::vector<int64_t> out_shape{static_cast<int64_t>(B)};
    out_shape.insert(out_shape.end(), shape.begin(), shape.end());
    at::Tensor out = options.allocate ? options.allocate(out_shape, field.dtype)
                                      : s.buffers->empty(out_shape, field.dtype, first.data);
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == field.dtype &&
                    out.sizes() == at::IntArrayRef(out_shape),
                "the batch allocator returned a tensor of the wrong shape or dtype for field '",
                field.name, "'");
    char* dst = static_cast<char*>(out.data_ptr());
    const size_t itemsize = c10::elementSize(field.dtype);
    size_t slot = itemsize;
    for (int64_t d : shape) slot *= static_cast<size_t>(d);
    if (!varies) {
      for (size_t i = 0; i < B; ++i)
        if (slot) decode_payload(views[i][f], dst + i * slot);
    } else {
      out.fill_(options.pad_value);
      at::Tensor lengths = at::empty({static_cast<int64_t>(B), ndim}, at::kLong);
      int64_t* len = lengths.data_ptr<int64_t>();
      for (size_t i = 0; i < B; ++i) {
        const FieldView& v = views[i][f];
        std::copy(v.sizes, v.sizes + ndim, len + i * ndim);
        if (v.nbytes == 0) continue;
        const char* src = v.data;
        if (v.codec != Codec::None) {  // decompressed beside, then padded into its slot
          thread_local std::vector<char> decoded;
          decoded.resize(v.nbytes);
          decode_payload(v, decoded.data());
          src = decoded.data();
        }
        copy_padded(dst + i * slot, shape.data(), src, v.sizes, ndim, itemsize);
      }
      batch.tensors.insert(field.name, std::move(out));
      batch.tensors.insert(field.name + "_lengths", std::move(lengths));
      continue;
    }
    batch.tensors.insert(field.name, std::move(out));
  }
  samples.evict();
  cold.done(samples.missing(), s);
  check_intact(envs);
  return batch;
}

const std::vector<FieldSchema>& Reader::schema() const { return state_->schema; }

std::string Reader::metadata_json(size_t file) const {
  TORCH_CHECK_INDEX(file < state_->meta_json.size(), "file ", file, " out of range for ",
                    state_->meta_json.size(), " files");
  return state_->meta_json[file];
}

const std::vector<std::string>& Reader::paths() const { return state_->paths; }

std::vector<size_t> Reader::file_sizes() const {
  std::vector<size_t> out;
  for (size_t i = 0; i + 1 < state_->offsets.size(); ++i)
    out.push_back(state_->offsets[i + 1] - state_->offsets[i]);
  return out;
}

int Reader::reader_count(size_t file) const {
  const auto& envs = state_->current_envs();
  TORCH_CHECK_INDEX(file < envs.size(), "file ", file, " out of range for ", envs.size(), " files");
  return envs[file]->reader_count();
}

size_t Reader::map_size(size_t file) const {
  const auto& envs = state_->current_envs();
  TORCH_CHECK_INDEX(file < envs.size(), "file ", file, " out of range for ", envs.size(), " files");
  return envs[file]->map_size();
}

bool Reader::complete() const { return state_->complete; }

Reader::IoStats Reader::io_stats() const {
  const State& s = *state_;
  return IoStats{s.io_batches.load(), s.io_lookahead.load(), s.io_pages.load(), s.io_prefetched.load(),
                 s.io_prefetches.load()};
}

const ReaderOptions& Reader::options() const { return state_->options; }

bool Reader::looking_ahead() const {
  const ReaderOptions& o = state_->options;
  if (o.lookahead_bytes == 0 || o.lookahead == LookaheadMode::Never) return false;
  return o.lookahead == LookaheadMode::Always || cold_state.cold;
}

Reader::Prefetched Reader::prefetch(at::ArrayRef<size_t> indices) const {
  State& s = *state_;
  const size_t budget = s.options.lookahead_bytes;
  if (budget == 0 || s.options.lookahead == LookaheadMode::Never || indices.empty()) return {};
  const auto& envs = s.current_envs();
  const size_t n = s.offsets.back();
  std::vector<ReadTxn> txns(envs.size());
  thread_local std::vector<MDB_val> values;
  values.clear();
  size_t bytes = 0;
  uint64_t last_key = 0;
  size_t last_file = 0;
  for (const size_t index : indices) {
    if (bytes >= budget) break;
    if (index >= n) continue;
    const auto [file, local] = s.locate(index);
    const Env& env = *envs[file];
    if (txns[file].get() == nullptr) txns[file] = env.read_txn();
    // A packed value is requested whole (a stream's chunk of samples is
    // mostly runs of the file: the value's other samples come next).
    const uint32_t per_value = s.per_value[file];
    unsigned char kbuf[8];
    encode_key(local / per_value, kbuf);
    MDB_val k{8, kbuf}, v{0, nullptr};
    if (!values.empty() && per_value > 1 && local / per_value == last_key && file == last_file) continue;
    if (detail::guarded_get(txns[file].get(), env.samples_dbi(), &k, &v) != MDB_SUCCESS) continue;
    if (!env.value_inside(v)) continue;  // the read of this sample raises it
    last_key = local / per_value;
    last_file = file;
    values.push_back(v);
    const auto [begin, end] = value_pages(v);
    bytes += end - begin;
  }
  // Samples at most 16 KiB apart (B-tree pages between runs of values): one
  // read for them and what lies between.
  const size_t missing = request_pages(values, budget, uintptr_t{16} << 10);
  s.io_prefetches.fetch_add(1, std::memory_order_relaxed);
  s.io_prefetched.fetch_add(missing, std::memory_order_relaxed);
  // Uncached pages ahead: this thread still reads from the disk (its own
  // batches find the pages requested here cached, which alone would end it).
  if (missing > 0) cold_state.warm_batches = 0;
  return {bytes, missing};
}

Reader Reader::refreshed() const { return Reader(state_->paths, state_->options); }

}  // namespace torch_lmdb
