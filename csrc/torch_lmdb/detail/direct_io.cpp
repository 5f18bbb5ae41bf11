#include "torch_lmdb/detail/direct_io.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <memory>
#include <new>

namespace torch_lmdb {
namespace detail {

namespace {

constexpr unsigned kRingEntries = 32;
// Completions are collected as they come; the ring is topped up once this
// many requests have completed (one submit call for several).
constexpr size_t kRefill = 8;

struct Ring {
  io_uring ring{};
  pid_t pid = 0;  // the process that made it (0: none)
  bool failed = false;

  ~Ring() {
    if (pid != 0 && pid == ::getpid() && !failed) io_uring_queue_exit(&ring);
  }
  // This process's ring, made on first use; null when the kernel refuses one.
  io_uring* get() {
    const pid_t now = ::getpid();
    if (pid != now) {
      // None yet, or the parent's after fork(): its memory is shared with the
      // parent and never touched here (left as it is).
      failed = io_uring_queue_init(kRingEntries, &ring, 0) != 0;  // (refused: not asked again)
      pid = now;
    }
    return failed ? nullptr : &ring;
  }
};

thread_local Ring ring;

struct FreeDeleter {
  void operator()(char* p) const noexcept { std::free(p); }
};
thread_local std::unique_ptr<char, FreeDeleter> arena;
thread_local size_t arena_bytes = 0;

// This thread's requests in flight.
struct InFlight {
  std::vector<DirectRead>* reads = nullptr;  // null: none
  size_t next = 0;                           // the first request not yet submitted
  size_t pending = 0;                        // submitted, not completed
};
thread_local InFlight flight;

// The ring failed (a submit or a wait the kernel refused): it is not used
// again, nor closed (a read still in flight writes into the arena, which is
// leaked with it). The requests not completed are read another way.
void abandon() noexcept {
  ring.failed = true;
  (void)arena.release();
  arena_bytes = 0;
  if (flight.reads != nullptr)
    for (DirectRead& d : *flight.reads)
      if (d.result == -EINPROGRESS) d.result = -EIO;
  flight = InFlight();
}

// Submits requests while the ring has room. false: the ring failed.
bool submit_more(io_uring* r) noexcept {
  std::vector<DirectRead>& reads = *flight.reads;
  unsigned queued = 0;
  while (flight.next < reads.size() && flight.pending + queued < kRingEntries) {
    io_uring_sqe* sqe = io_uring_get_sqe(r);
    if (sqe == nullptr) break;
    DirectRead& d = reads[flight.next];
    io_uring_prep_read(sqe, d.fd, d.dst, d.length, d.offset);
    io_uring_sqe_set_data64(sqe, flight.next);
    ++flight.next;
    ++queued;
  }
  if (queued == 0) return true;
  int submitted;
  do {
    submitted = io_uring_submit(r);
  } while (submitted == -EINTR);
  if (submitted != static_cast<int>(queued)) {
    abandon();
    return false;
  }
  flight.pending += queued;
  return true;
}

// Takes the completions from `cqe` on (null: those already there, without
// waiting), and tops the ring up. false: the ring failed.
bool take(io_uring* r, io_uring_cqe* cqe) noexcept {
  std::vector<DirectRead>& reads = *flight.reads;
  if (cqe == nullptr && io_uring_peek_cqe(r, &cqe) != 0) cqe = nullptr;
  while (cqe != nullptr) {
    reads[static_cast<size_t>(io_uring_cqe_get_data64(cqe))].result = cqe->res;
    io_uring_cqe_seen(r, cqe);
    --flight.pending;
    cqe = nullptr;
    if (io_uring_peek_cqe(r, &cqe) != 0) cqe = nullptr;
  }
  if (flight.next < reads.size() && flight.pending + kRefill <= kRingEntries) return submit_more(r);
  return true;
}

// Waits for one completion, then takes every one already there, and tops the
// ring up. false: the ring failed.
bool reap(io_uring* r) noexcept {
  io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = io_uring_wait_cqe(r, &cqe);
  } while (rc == -EINTR);
  if (rc < 0) {
    abandon();
    return false;
  }
  return take(r, cqe);
}

}  // namespace

bool start_direct_reads(std::vector<DirectRead>& reads) {
  finish_direct_reads();
  io_uring* r = ring.get();
  if (r == nullptr) return false;
  for (DirectRead& d : reads) d.result = -EINPROGRESS;
  flight.reads = &reads;
  flight.next = 0;
  flight.pending = 0;
  submit_more(r);  // (failed: every request says -EIO)
  return true;
}

int64_t wait_direct_read(size_t j) {
  if (flight.reads == nullptr || j >= flight.reads->size()) return -EINVAL;
  std::vector<DirectRead>& reads = *flight.reads;
  io_uring* r = &ring.ring;
  // The reads completed while this thread copied: taken without waiting, so
  // the ring is topped up though request j is done already (the device's
  // queue does not run dry while the copies catch up).
  if (flight.pending > 0 && flight.next < reads.size()) (void)take(r, nullptr);
  while (reads[j].result == -EINPROGRESS && flight.reads != nullptr) {
    if (flight.pending == 0) {
      if (!submit_more(r) || flight.pending == 0) break;
    } else if (!reap(r)) {
      break;
    }
  }
  if (reads[j].result == -EINPROGRESS) reads[j].result = -EIO;  // (never submitted: the map reads it)
  return reads[j].result;
}

void finish_direct_reads() noexcept {
  if (flight.reads == nullptr) return;
  std::vector<DirectRead>& reads = *flight.reads;
  for (size_t j = flight.next; j < reads.size(); ++j) reads[j].result = -ECANCELED;
  flight.next = reads.size();
  while (flight.reads != nullptr && flight.pending > 0)
    if (!reap(&ring.ring)) break;
  flight = InFlight();
}

char* direct_buffer(size_t bytes) {
  finish_direct_reads();
  if (bytes > arena_bytes) {
    void* p = nullptr;
    const size_t size = (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    if (::posix_memalign(&p, kDirectAlign, size) != 0) throw std::bad_alloc();
    arena.reset(static_cast<char*>(p));
    arena_bytes = size;
  }
  return arena.get();
}

bool direct_ring_failed() noexcept { return ring.pid == ::getpid() && ring.failed; }

size_t direct_reads_pending() noexcept {
  return flight.reads == nullptr ? 0 : flight.pending + (flight.reads->size() - flight.next);
}

uint32_t direct_alignment(int fd) noexcept {
  uint32_t align = kDirectAlign;
#ifdef STATX_DIOALIGN
  struct statx st {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) == 0 && (st.stx_mask & STATX_DIOALIGN) != 0 &&
      st.stx_dio_offset_align != 0) {
    const uint32_t need = std::max(st.stx_dio_offset_align, st.stx_dio_mem_align);
    // (a power of two; beyond a page, the reads are left to the map)
    if ((need & (need - 1)) == 0 && need <= kDirectAlign) align = need;
  }
#else
  (void)fd;
#endif
  return align;
}

}  // namespace detail
}  // namespace torch_lmdb
