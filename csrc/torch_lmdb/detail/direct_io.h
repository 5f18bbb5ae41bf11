// torch_lmdb/detail/direct_io.h -- internal: reads of ranges of files (opened
// with O_DIRECT, or buffered), many in flight at once through a per-thread
// io_uring (liburing). What cold batches read their records with: no page
// faults; with O_DIRECT (keep_cache=false) no page-cache insertion and no
// eviction afterwards. Not installed.
//
// Contract
// - start_direct_reads() submits the requests (as many as the ring holds, the
//   rest as earlier ones complete) and returns at once; wait_direct_read(j)
//   returns request j's result (bytes read, or -errno) once it is done, so
//   that the caller works on the first requests while later ones are read.
//   A request whose result is not its length is the caller's to read another
//   way (the map: a file cut short then raises its named error there).
//   start_direct_reads() returns false, having read nothing, when this thread
//   has no ring (io_uring refused by the kernel).
// - finish_direct_reads() waits for every request still in flight; it is
//   called by start_direct_reads() and direct_buffer() first, and must be
//   called before the requests' vector or buffers go (BatchLookup's
//   destructor): no read ever lands in memory that was given back.
// - direct_buffer(bytes) is this thread's arena, 4096-byte aligned, valid
//   until the thread's next direct_buffer() call.
// - direct_alignment(fd): the file offset and length alignment O_DIRECT reads
//   of `fd` need (statx's STATX_DIOALIGN; 4096 where the kernel does not say).
// - Thread safety: each thread has its own ring, requests and arena. After
//   fork(), the child makes its own ring (the parent's is never touched there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace torch_lmdb {
namespace detail {

constexpr size_t kDirectAlign = 4096;

struct DirectRead {
  int fd = -1;
  uint64_t offset = 0;  // O_DIRECT: a multiple of direct_alignment(fd)
  uint32_t length = 0;  // O_DIRECT: a multiple of direct_alignment(fd)
  char* dst = nullptr;  // kDirectAlign-aligned
  int64_t result = 0;
};

bool start_direct_reads(std::vector<DirectRead>& reads);
int64_t wait_direct_read(size_t j);
void finish_direct_reads() noexcept;

char* direct_buffer(size_t bytes);

/// Whether this thread's ring failed (a submit or a wait the kernel refused):
/// reads it had in flight may still land in their buffers, which must then
/// never be freed nor reused.
bool direct_ring_failed() noexcept;

/// This thread's requests started and not yet completed (in the ring or
/// waiting for room in it).
size_t direct_reads_pending() noexcept;

uint32_t direct_alignment(int fd) noexcept;

}  // namespace detail
}  // namespace torch_lmdb
