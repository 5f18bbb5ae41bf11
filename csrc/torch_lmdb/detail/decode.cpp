#include "torch_lmdb/detail/decode.h"

#include <c10/util/Exception.h>
#include <unistd.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>

// xxh3's accumulate and scramble steps for AVX2 and AVX-512, compiled for
// those units whatever the build's baseline (hash_and_copy picks at run time).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORCH_LMDB_FUSED_HASH 1
#define XXH_INLINE_ALL
#define XXH_X86DISPATCH 1  // accumulators aligned for AVX-512
#define XXH_DISPATCH_AVX2 1
#define XXH_DISPATCH_AVX512 1
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#define XXH_TARGET_AVX512 __attribute__((__target__("avx512f")))
#if defined(__GNUC__) && !defined(__clang__)
// (GCC 12 reports its own AVX-512 intrinsics' undefined operands as uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif
#include <xxhash.h>

namespace torch_lmdb {
namespace detail {

// ---- BufferPool ---------------------------------------------------------------

BufferPool::~BufferPool() {
  for (auto& [bytes, list] : free_)
    for (void* p : list) std::free(p);
}

at::Tensor BufferPool::empty(at::IntArrayRef shape, at::ScalarType dtype, const void* source) {
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

void* BufferPool::take(size_t capacity) {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = free_.find(capacity);
  if (it == free_.end() || it->second.empty()) return nullptr;
  void* p = it->second.back();
  it->second.pop_back();
  cached_ -= capacity;
  return p;
}

void BufferPool::give(void* p, size_t capacity) {
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

// ---- DecodePool ---------------------------------------------------------------

struct DecodePool::Job::Task {
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

DecodePool& DecodePool::get() {
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

void DecodePool::work() {
  for (;;) {
    std::shared_ptr<Job::Task> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return !queue_.empty(); });
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task->help(/*wait=*/true);
  }
}

DecodePool::Job::Job(unsigned helpers, std::function<void(size_t)> fn) : task_(std::make_shared<Task>(std::move(fn))) {
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

void DecodePool::Job::publish(size_t n) {
  {
    std::lock_guard<std::mutex> guard(task_->mutex);
    task_->published.store(n, std::memory_order_release);
  }
  task_->more.notify_all();
}

void DecodePool::Job::finish() {
  close_and_wait();
  // Taken out of the task: a helper may drop the task's last reference, and
  // the exception, thrown on a helper, is then the caller's alone to free
  // (its reference count lives in uninstrumented libstdc++, which
  // ThreadSanitizer cannot see order the free after the caller's handler).
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> guard(task_->mutex);
    error = task_->error;
    task_->error = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

DecodePool::Job::~Job() {
  if (!finished_) close_and_wait();
}

void DecodePool::Job::close_and_wait() {
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

// ---- decoding into a batch slot -----------------------------------------------

namespace {

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

// ---- hash_and_copy ---------------------------------------------------------------

#if defined(TORCH_LMDB_FUSED_HASH)
// Where the stripes of a body being hashed go: xxh3's stripe loop hands each
// 64-byte stripe it has just loaded, in ascending order (the last stripe may
// overlap the one before), to the span that holds it, so that the body is
// read from memory once for both. A stripe inside span `k` ([begin, end))
// is stored whole at its address + `delta`; any other stripe before `limit`
// (the end of the last span) goes to place_stripe_parts(). Small enough to
// live in registers through the loop.
struct Cursor {
  const char* begin;
  const char* end;
  ptrdiff_t delta;
  size_t k;
  const char* limit;
};

// The parts of the stripe at `p` that lie in spans, copied; returns the
// cursor at the first span that may still receive bytes.
__attribute__((noinline)) Cursor place_stripe_parts(const CopySpan* spans, size_t n, Cursor c, const char* p) {
  while (c.k < n && spans[c.k].src + spans[c.k].size <= p) ++c.k;
  for (size_t j = c.k; j < n && spans[j].src < p + 64; ++j) {
    const char* begin = std::max(p, spans[j].src);
    const char* end = std::min(p + 64, spans[j].src + spans[j].size);
    if (begin < end) std::memcpy(spans[j].dst + (begin - spans[j].src), begin, static_cast<size_t>(end - begin));
  }
  if (c.k < n) {
    c.begin = spans[c.k].src;
    c.end = spans[c.k].src + spans[c.k].size;
    c.delta = spans[c.k].dst - spans[c.k].src;
  }
  return c;
}

// xxh3's steps (XXH3_accumulate_512_<unit>, XXH3_scrambleAcc_<unit>) and
// the store of a stripe, as the loop below takes them.
using AccumulateStripe = void (*)(void*, const void*, const void*);
using ScrambleAccumulators = void (*)(void*, const void*);
using StoreStripe = void (*)(char*, const char*);

// How far ahead of the stripe being hashed its lines are requested (xxh3's
// own distance, 384 bytes, is for data already in cache; a record's pages
// come from memory).
#ifndef TORCH_LMDB_PLACING_PREFETCH
#define TORCH_LMDB_PLACING_PREFETCH 4096
#endif
constexpr size_t kPlacingPrefetch = TORCH_LMDB_PLACING_PREFETCH;

XXH_FORCE_INLINE void placing_stripe(xxh_u64* acc, const char* in, const xxh_u8* key, Cursor& c,
                                     const CopySpan* spans, size_t n, AccumulateStripe Accumulate,
                                     StoreStripe Store) {
  Accumulate(acc, in, key);
  if (in >= c.begin && in + 64 <= c.end) {
    Store(const_cast<char*>(in) + c.delta, in);  // (a destination span)
  } else if (in < c.limit && !(in + 64 <= c.begin)) {  // (a stripe before span k: nothing to place)
    c = place_stripe_parts(spans, n, c, in);
  }
}

// XXH3_64bits of [input, input + len) for len > XXH3_MIDSIZE_MAX: xxh3's
// long-input loop (XXH3_hashLong_64b_internal with the default secret and
// seed 0), each stripe placed after it is accumulated. (The steps are passed
// as arguments, as xxh3 passes them: inlined into a caller compiled for their
// vector unit, the calls become its instructions.)
XXH_FORCE_INLINE uint64_t hash_long_placing(const char* input, size_t len, const CopySpan* spans, size_t n,
                                            AccumulateStripe Accumulate, ScrambleAccumulators Scramble,
                                            StoreStripe Store) {
  XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;
  const xxh_u8* const secret = XXH3_kSecret;
  constexpr size_t kSecretSize = sizeof(XXH3_kSecret);
  constexpr size_t kStripesPerBlock = (kSecretSize - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
  constexpr size_t kBlockLen = XXH_STRIPE_LEN * kStripesPerBlock;
  Cursor c{nullptr, nullptr, 0, 0, n ? spans[n - 1].src + spans[n - 1].size : nullptr};
  const size_t blocks = (len - 1) / kBlockLen;
  for (size_t b = 0; b < blocks; ++b) {
    for (size_t s = 0; s < kStripesPerBlock; ++s) {
      const char* in = input + b * kBlockLen + s * XXH_STRIPE_LEN;
      XXH_PREFETCH(in + kPlacingPrefetch);
      placing_stripe(acc, in, secret + s * XXH_SECRET_CONSUME_RATE, c, spans, n, Accumulate, Store);
    }
    Scramble(acc, secret + kSecretSize - XXH_STRIPE_LEN);
  }
  const size_t stripes = ((len - 1) - kBlockLen * blocks) / XXH_STRIPE_LEN;
  for (size_t s = 0; s < stripes; ++s) {
    const char* in = input + blocks * kBlockLen + s * XXH_STRIPE_LEN;
    XXH_PREFETCH(in + kPlacingPrefetch);
    placing_stripe(acc, in, secret + s * XXH_SECRET_CONSUME_RATE, c, spans, n, Accumulate, Store);
  }
  placing_stripe(acc, input + len - XXH_STRIPE_LEN, secret + kSecretSize - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START,
                 c, spans, n, Accumulate, Store);
  return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START, static_cast<xxh_u64>(len) * XXH_PRIME64_1);
}

XXH_FORCE_INLINE XXH_TARGET_AVX512 void store_stripe_avx512(char* dst, const char* src) {
  _mm512_storeu_si512(dst, _mm512_loadu_si512(src));  // (the line Accumulate loaded)
}

XXH_FORCE_INLINE XXH_TARGET_AVX2 void store_stripe_avx2(char* dst, const char* src) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32)));
}

XXH_TARGET_AVX512 uint64_t hash_long_placing_avx512(const char* body, size_t size, const CopySpan* spans, size_t n) {
  return hash_long_placing(body, size, spans, n, XXH3_accumulate_512_avx512, XXH3_scrambleAcc_avx512,
                           store_stripe_avx512);
}

XXH_TARGET_AVX2 uint64_t hash_long_placing_avx2(const char* body, size_t size, const CopySpan* spans, size_t n) {
  return hash_long_placing(body, size, spans, n, XXH3_accumulate_512_avx2, XXH3_scrambleAcc_avx2, store_stripe_avx2);
}

enum class FusedUnit { None, Avx2, Avx512 };

FusedUnit fused_unit() {
  static const FusedUnit unit = __builtin_cpu_supports("avx512f") ? FusedUnit::Avx512
                                : __builtin_cpu_supports("avx2")  ? FusedUnit::Avx2
                                                                  : FusedUnit::None;
  return unit;
}

// Spans sorted by source, disjoint and inside [body, body + size).
bool spans_in_order(const char* body, size_t size, const CopySpan* spans, size_t n) {
  const char* at = body;
  for (size_t j = 0; j < n; ++j) {
    if (spans[j].src < at || spans[j].size > size || spans[j].src + spans[j].size > body + size) return false;
    at = spans[j].src + spans[j].size;
  }
  return true;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

}  // namespace

void decode_to_slot(const FieldView& v, char* dst, bool around_cache) {
#if defined(__SSE2__)
  if (around_cache && v.codec == Codec::None && !v.in_column && v.nbytes >= 4096) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(dst);
#if defined(TORCH_LMDB_AVX2_COPY)
    if ((at & 31) == 0 && cpu_has_avx2()) return copy_around_cache_avx2(dst, v.data, v.nbytes);
#endif
    if ((at & 15) == 0) return copy_around_cache_sse2(dst, v.data, v.nbytes);
  }
#endif
  decode_payload(v, dst);
}

uint64_t hash_and_copy(const char* body, size_t size, const CopySpan* spans, size_t n) noexcept {
#if defined(TORCH_LMDB_FUSED_HASH)
  const FusedUnit unit = size > XXH3_MIDSIZE_MAX ? fused_unit() : FusedUnit::None;
  if (unit != FusedUnit::None && spans_in_order(body, size, spans, n)) {
    return unit == FusedUnit::Avx512 ? hash_long_placing_avx512(body, size, spans, n)
                                     : hash_long_placing_avx2(body, size, spans, n);
  }
#endif
  const uint64_t h = XXH3_64bits(body, size);
  for (size_t j = 0; j < n; ++j)
    if (spans[j].size) std::memcpy(spans[j].dst, spans[j].src, spans[j].size);
  return h;
}

bool hash_and_copy_is_one_pass() noexcept {
#if defined(TORCH_LMDB_FUSED_HASH)
  return fused_unit() != FusedUnit::None;
#else
  return false;
#endif
}

unsigned decode_threads(const ReaderOptions& r, const BatchOptions& b) {
  unsigned n = b.decode_threads != 0 ? b.decode_threads : r.decode_threads;
  static const unsigned cores = std::max(1u, std::thread::hardware_concurrency());  // (reads /sys)
  if (n == 0) n = std::min(cores, DecodePool::kMaxHelpers + 1);
  return std::min(n, DecodePool::kMaxHelpers + 1);
}

}  // namespace detail
}  // namespace torch_lmdb
