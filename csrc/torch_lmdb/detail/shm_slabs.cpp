// Recycled shared-memory batch buffers; the contract is in shm_slabs.h.
#include "torch_lmdb/detail/shm_slabs.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <utility>

namespace torch_lmdb {
namespace {

// The header word (see shm_slabs.h). Lives in the slab's first page, so it is
// shared by every process that maps the slab: only lock-free atomics work there.
constexpr uint64_t kHolds = 1;          // the producer holds a tensor of this generation
constexpr uint64_t kClaimed = 2;        // a receiver holds a tensor of this generation
constexpr uint64_t kPendingOne = 1u << 8;
constexpr uint64_t kPendingMask = 0xffu << 8;
constexpr int kGenerationShift = 16;
constexpr size_t kHeader = 4096;  // one page: the data stays page-aligned
constexpr size_t kRound = size_t{1} << 20;
static_assert(std::atomic<uint64_t>::is_always_lock_free, "process-shared words need lock-free atomics");

uint64_t generation_of(uint64_t word) { return word >> kGenerationShift; }

std::atomic<uint64_t>& word_of(char* base) { return *reinterpret_cast<std::atomic<uint64_t>*>(base); }

// Clears `bits` if the word still has generation `gen` and any of `bits` set.
// A stale release (the slab has moved on) changes nothing.
void clear_bits(std::atomic<uint64_t>& word, uint64_t gen, uint64_t bits) noexcept {
  uint64_t w = word.load(std::memory_order_relaxed);
  while (generation_of(w) == gen && (w & bits) != 0) {
    if (word.compare_exchange_weak(w, w & ~bits, std::memory_order_release, std::memory_order_relaxed)) return;
  }
}

size_t nbytes_of(at::IntArrayRef shape, at::ScalarType dtype) {
  size_t bytes = c10::elementSize(dtype);
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "negative dimension in shape ", shape);
    bytes *= static_cast<size_t>(d);
  }
  return bytes;
}

// One memfd and this process's mapping of it (header + capacity bytes).
struct Slab {
  size_t id = 0;
  int fd = -1;
  char* base = nullptr;
  size_t capacity = 0;
  bool fd_sent = false;  // guarded by the pool's mutex
  ~Slab() {
    if (base != nullptr) munmap(base, kHeader + capacity);
    if (fd >= 0) close(fd);
  }
};

// The context of a producer tensor's storage.
struct ProducerRef {
  std::shared_ptr<Slab> slab;
  uint64_t generation;
  pid_t pid;
  uint64_t pool;  // the pool's serial (an address could be reused by a later pool)
};

void release_producer(void* ctx) noexcept {
  auto* ref = static_cast<ProducerRef*>(ctx);
  if (::getpid() == ref->pid) clear_bits(word_of(ref->slab->base), ref->generation, kHolds);
  delete ref;
}

// A receiver's mapping of one slab.
struct Mapping {
  Mapping(char* b, size_t l) : base(b), length(l) {}
  ~Mapping() { munmap(base, length); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  char* base;
  size_t length;
};

// The context of a received tensor's storage.
struct ConsumerRef {
  std::shared_ptr<Mapping> mapping;
  uint64_t generation;
  pid_t pid;
};

void release_consumer(void* ctx) noexcept {
  auto* ref = static_cast<ConsumerRef*>(ctx);
  if (::getpid() == ref->pid) clear_bits(word_of(ref->mapping->base), ref->generation, kClaimed);
  delete ref;
}

// The producer reference of `t`'s storage, if it is a slab's.
const ProducerRef* producer_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& dp = t.storage().data_ptr();
  if (dp.get_deleter() != &release_producer) return nullptr;
  return static_cast<const ProducerRef*>(dp.get_context());
}

// Bytes from the storage start that a view needs (0 for an empty view).
size_t view_extent(const SlabTicket& t) {
  TORCH_CHECK_VALUE(t.sizes.size() == t.strides.size(), "slab ticket: ", t.sizes.size(), " sizes but ",
                    t.strides.size(), " strides");
  TORCH_CHECK_VALUE(t.storage_offset >= 0, "slab ticket: negative storage offset ", t.storage_offset);
  uint64_t last = static_cast<uint64_t>(t.storage_offset);
  for (size_t d = 0; d < t.sizes.size(); ++d) {
    TORCH_CHECK_VALUE(t.sizes[d] >= 0 && t.strides[d] >= 0, "slab ticket: negative size or stride in dim ", d);
    if (t.sizes[d] == 0) return 0;
    uint64_t step = 0;
    const bool overflow =
        __builtin_mul_overflow(static_cast<uint64_t>(t.sizes[d] - 1), static_cast<uint64_t>(t.strides[d]), &step) ||
        __builtin_add_overflow(last, step, &last);
    TORCH_CHECK_VALUE(!overflow, "slab ticket: view too large");
  }
  uint64_t bytes = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(last + 1, uint64_t{c10::elementSize(t.dtype)}, &bytes),
                    "slab ticket: view too large");
  return static_cast<size_t>(bytes);
}

}  // namespace

// ---- SlabPool -----------------------------------------------------------

namespace {
std::atomic<uint64_t> next_pool_serial{1};
}  // namespace

struct SlabPool::Impl {
  explicit Impl(size_t max) : max_slabs(max), pid(::getpid()), serial(next_pool_serial.fetch_add(1)) {}
  const size_t max_slabs;
  const pid_t pid;
  const uint64_t serial;
  mutable std::mutex mutex;
  std::vector<std::shared_ptr<Slab>> slabs;

  // A free slab that fits `bytes`, claimed for the next generation; or a new
  // one; or null.
  std::pair<std::shared_ptr<Slab>, uint64_t> claim(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex);
    for (const auto& s : slabs) {
      if (s->capacity < bytes || s->capacity > 2 * bytes + kRound) continue;
      auto& word = word_of(s->base);
      uint64_t w = word.load(std::memory_order_relaxed);
      while ((w & ((uint64_t{1} << kGenerationShift) - 1)) == 0) {
        const uint64_t gen = generation_of(w) + 1;
        if (word.compare_exchange_weak(w, (gen << kGenerationShift) | kHolds, std::memory_order_acquire,
                                       std::memory_order_relaxed))
          return {s, gen};
      }
    }
    if (slabs.size() >= max_slabs) return {nullptr, 0};
    auto s = std::make_shared<Slab>();
    s->id = slabs.size();
    s->capacity = (bytes + kRound - 1) / kRound * kRound;
    s->fd = memfd_create("torch_lmdb_batch", MFD_CLOEXEC);
    if (s->fd < 0) return {nullptr, 0};
    if (ftruncate(s->fd, static_cast<off_t>(kHeader + s->capacity)) != 0) return {nullptr, 0};
    void* base = mmap(nullptr, kHeader + s->capacity, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (base == MAP_FAILED) return {nullptr, 0};
    s->base = static_cast<char*>(base);
    new (s->base) std::atomic<uint64_t>((uint64_t{1} << kGenerationShift) | kHolds);
    slabs.push_back(s);
    return {s, 1};
  }
};

SlabPool::SlabPool(size_t max_slabs) : impl_(std::make_shared<Impl>(max_slabs)) {}
SlabPool::~SlabPool() = default;

at::Tensor SlabPool::allocate(at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(::getpid() == impl_->pid, "torch_lmdb: a SlabPool of process ", impl_->pid,
              " used in process ", ::getpid(), " (after fork(): make a new pool)");
  const size_t bytes = nbytes_of(shape, dtype);
  if (bytes == 0) return at::empty(shape, at::TensorOptions().dtype(dtype));
  auto [slab, gen] = impl_->claim(bytes);
  if (!slab) return at::Tensor();
  char* data = slab->base + kHeader;
  auto* ref = new ProducerRef{std::move(slab), gen, impl_->pid, impl_->serial};
  c10::DataPtr ptr(data, ref, &release_producer, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(ptr), nullptr, false);
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, 0, shape);
}

std::optional<SlabTicket> SlabPool::send(const at::Tensor& tensor) {
  const ProducerRef* ref = producer_of(tensor);
  if (ref == nullptr || ref->pool != impl_->serial || ::getpid() != impl_->pid) return std::nullopt;
  if (tensor.is_conj() || tensor.is_neg()) return std::nullopt;
  for (int64_t s : tensor.strides())
    if (s < 0) return std::nullopt;
  auto& word = word_of(ref->slab->base);
  uint64_t w = word.load(std::memory_order_relaxed);
  for (;;) {
    // The producer holds this generation (the tensor is alive), so it cannot change under us.
    if (generation_of(w) != ref->generation || (w & kPendingMask) == kPendingMask) return std::nullopt;
    if (word.compare_exchange_weak(w, w + kPendingOne, std::memory_order_release, std::memory_order_relaxed))
      break;
  }
  SlabTicket t;
  t.pid = impl_->pid;
  t.slab = ref->slab->id;
  t.generation = ref->generation;
  {
    std::lock_guard<std::mutex> guard(impl_->mutex);
    if (!ref->slab->fd_sent) {
      t.fd = ref->slab->fd;
      ref->slab->fd_sent = true;
    }
  }
  t.nbytes = tensor.storage().nbytes();
  t.sizes = tensor.sizes().vec();
  t.strides = tensor.strides().vec();
  t.storage_offset = tensor.storage_offset();
  t.dtype = tensor.scalar_type();
  return t;
}

bool SlabPool::owns(const at::Tensor& tensor) const {
  const ProducerRef* ref = producer_of(tensor);
  return ref != nullptr && ref->pool == impl_->serial;
}

size_t SlabPool::size() const {
  std::lock_guard<std::mutex> guard(impl_->mutex);
  return impl_->slabs.size();
}

size_t SlabPool::busy() const {
  std::lock_guard<std::mutex> guard(impl_->mutex);
  size_t n = 0;
  for (const auto& s : impl_->slabs)
    n += (word_of(s->base).load(std::memory_order_acquire) & ((uint64_t{1} << kGenerationShift) - 1)) != 0;
  return n;
}

// ---- SlabReceiver -------------------------------------------------------

struct SlabReceiver::Impl {
  struct Entry {
    std::shared_ptr<Mapping> mapping;
    uint64_t generation = 0;  // of `storage`
    std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  };
  mutable std::mutex mutex;
  std::map<std::pair<int64_t, size_t>, Entry> slabs;
};

SlabReceiver::SlabReceiver() : impl_(std::make_unique<Impl>()) {}
SlabReceiver::~SlabReceiver() = default;

namespace {
SlabReceiver*& receiver_slot() {
  static SlabReceiver* receiver = [] {
    // A forked child gets a fresh registry: the parent's lock may have been
    // held by another thread at the fork. (The old one leaks in the child;
    // tensors it inherited keep their own mappings.)
    pthread_atfork(nullptr, nullptr, [] { receiver_slot() = new SlabReceiver(); });
    return new SlabReceiver();
  }();
  return receiver;
}
}  // namespace

SlabReceiver& SlabReceiver::instance() { return *receiver_slot(); }

void SlabReceiver::attach(int64_t pid, size_t slab, int fd) {
  TORCH_CHECK_VALUE(fd >= 0, "torch_lmdb: no fd for batch buffer ", slab, " of process ", pid);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    TORCH_CHECK(false, "torch_lmdb: cannot stat batch buffer ", slab, " of process ", pid, ": ",
                std::strerror(err));
  }
  const size_t length = static_cast<size_t>(st.st_size);
  if (length < kHeader) {
    close(fd);
    TORCH_CHECK(false, "torch_lmdb: batch buffer ", slab, " of process ", pid, " has ", length,
                " bytes, less than its header");
  }
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  TORCH_CHECK(base != MAP_FAILED, "torch_lmdb: cannot map batch buffer ", slab, " of process ", pid, ": ",
              std::strerror(err));
  auto mapping = std::make_shared<Mapping>(static_cast<char*>(base), length);
  std::lock_guard<std::mutex> guard(impl_->mutex);
  for (auto it = impl_->slabs.begin(); it != impl_->slabs.end();) {
    const auto other = static_cast<pid_t>(it->first.first);
    if (other != pid && ::kill(other, 0) != 0 && errno == ESRCH)
      it = impl_->slabs.erase(it);
    else
      ++it;
  }
  impl_->slabs[{pid, slab}] = Impl::Entry{std::move(mapping), 0, std::nullopt};
}

at::Tensor SlabReceiver::receive(const SlabTicket& t) {
  const size_t extent = view_extent(t);
  TORCH_CHECK_VALUE(extent <= t.nbytes, "slab ticket: a view of ", extent, " bytes in a storage of ", t.nbytes);
  std::lock_guard<std::mutex> guard(impl_->mutex);
  auto it = impl_->slabs.find({t.pid, t.slab});
  TORCH_CHECK(it != impl_->slabs.end(), "torch_lmdb: batch buffer ", t.slab, " of process ", t.pid,
              " was never attached in this process");
  Impl::Entry& e = it->second;
  TORCH_CHECK(kHeader + t.nbytes <= e.mapping->length, "torch_lmdb: batch of ", t.nbytes,
              " bytes is larger than buffer ", t.slab, " of process ", t.pid);
  auto& word = word_of(e.mapping->base);
  c10::intrusive_ptr<c10::StorageImpl> live;
  if (e.storage && e.generation == t.generation) live = e.storage->lock();
  uint64_t w = word.load(std::memory_order_acquire);
  if (live) {
    // Already received here and alive: share that storage, consume the send.
    TORCH_CHECK(live->nbytes() == t.nbytes, "torch_lmdb: batch buffer ", t.slab, " of process ", t.pid,
                " received twice with different sizes");
    while (generation_of(w) == t.generation && (w & kPendingMask) != 0 &&
           !word.compare_exchange_weak(w, w - kPendingOne, std::memory_order_acq_rel, std::memory_order_acquire)) {
    }
  } else {
    for (;;) {
      TORCH_CHECK(generation_of(w) == t.generation, "torch_lmdb: batch buffer ", t.slab, " of process ", t.pid,
                  " was released and reused before this batch was received (generation ", t.generation,
                  ", now ", generation_of(w), ")");
      TORCH_CHECK((w & kPendingMask) != 0, "torch_lmdb: batch buffer ", t.slab, " of process ", t.pid,
                  " generation ", t.generation, " has no send pending (received twice?)");
      TORCH_CHECK((w & kClaimed) == 0, "torch_lmdb: batch buffer ", t.slab, " of process ", t.pid,
                  " generation ", t.generation, " is held by another process");
      if (word.compare_exchange_weak(w, (w - kPendingOne) | kClaimed, std::memory_order_acq_rel,
                                     std::memory_order_acquire))
        break;
    }
    auto* ref = new ConsumerRef{e.mapping, t.generation, ::getpid()};
    c10::DataPtr ptr(e.mapping->base + kHeader, ref, &release_consumer, c10::Device(c10::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), t.nbytes, std::move(ptr), nullptr, false);
    live = storage.getWeakStorageImpl().lock();
    e.generation = t.generation;
    e.storage = storage.getWeakStorageImpl();
    // `live` keeps the storage alive past this scope.
  }
  return at::empty({0}, at::TensorOptions().dtype(t.dtype))
      .set_(c10::Storage(std::move(live)), t.storage_offset, t.sizes, t.strides);
}

size_t SlabReceiver::size() const {
  std::lock_guard<std::mutex> guard(impl_->mutex);
  return impl_->slabs.size();
}

}  // namespace torch_lmdb
