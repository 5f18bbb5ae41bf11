#include "torch_lmdb/detail/direct_io.h"

#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <new>
#include <cstdlib>
#include <memory>

namespace torch_lmdb {
namespace detail {

namespace {

constexpr unsigned kRingEntries = 128;

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

}  // namespace

bool read_direct(std::vector<DirectRead>& reads) {
  io_uring* r = ring.get();
  if (r == nullptr) return false;
  // Chunks of at most kRingEntries requests: all submitted at once, all
  // collected before the next chunk (the ring is empty between chunks).
  for (size_t first = 0; first < reads.size(); first += kRingEntries) {
    const size_t count = std::min<size_t>(kRingEntries, reads.size() - first);
    for (size_t i = first; i < first + count; ++i) {
      io_uring_sqe* sqe = io_uring_get_sqe(r);  // (an empty ring has room for kRingEntries)
      DirectRead& d = reads[i];
      io_uring_prep_read(sqe, d.fd, d.dst, d.length, d.offset);
      io_uring_sqe_set_data64(sqe, i);
      d.result = -EINPROGRESS;
    }
    int submitted;
    do {
      submitted = io_uring_submit(r);
    } while (submitted == -EINTR);
    int got = 0;
    while (got < submitted) {
      io_uring_cqe* cqe = nullptr;
      const int rc = io_uring_wait_cqe(r, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) break;  // (the ring is abandoned below)
      reads[static_cast<size_t>(io_uring_cqe_get_data64(cqe))].result = cqe->res;
      io_uring_cqe_seen(r, cqe);
      ++got;
    }
    if (submitted < static_cast<int>(count) || got < submitted) {
      // Requests left in the ring, or completions never collected: this ring
      // is not used again (nor closed: a read still in flight writes into the
      // arena, which is leaked with it). The rest are read another way.
      ring.failed = true;
      arena.release();
      arena_bytes = 0;
      return true;
    }
  }
  return true;
}

char* direct_buffer(size_t bytes) {
  if (bytes > arena_bytes) {
    void* p = nullptr;
    const size_t size = (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    if (::posix_memalign(&p, kDirectAlign, size) != 0) throw std::bad_alloc();
    arena.reset(static_cast<char*>(p));
    arena_bytes = size;
  }
  return arena.get();
}

}  // namespace detail
}  // namespace torch_lmdb
