// torch_lmdb/detail/direct_io.h -- internal: reads of page-aligned ranges of
// files (opened with O_DIRECT, or buffered), many in flight at once through a
// per-thread io_uring (liburing). What cold batches read their records with:
// no page faults; with O_DIRECT (keep_cache=false) no page-cache insertion
// and no eviction afterwards. Not installed.
//
// Contract
// - read_direct() submits every request, waits for all of them and sets each
//   request's `result` (bytes read, or -errno). A request whose result is not
//   its length is the caller's to read another way (the map: a file cut
//   short then raises its named error there). Returns false, having read
//   nothing, when this thread has no ring (io_uring refused by the kernel).
// - direct_buffer(bytes) is this thread's arena, 4096-byte aligned, valid
//   until the thread's next direct_buffer() call.
// - Thread safety: each thread has its own ring and arena. After fork(), the
//   child makes its own ring (the parent's is never touched there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace torch_lmdb {
namespace detail {

constexpr size_t kDirectAlign = 4096;

struct DirectRead {
  int fd = -1;
  uint64_t offset = 0;  // multiple of kDirectAlign
  uint32_t length = 0;  // multiple of kDirectAlign
  char* dst = nullptr;  // kDirectAlign-aligned
  int64_t result = 0;
};

bool read_direct(std::vector<DirectRead>& reads);

char* direct_buffer(size_t bytes);

}  // namespace detail
}  // namespace torch_lmdb
