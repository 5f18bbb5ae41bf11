// torch_lmdb/detail/tree_pages.h -- internal: the leaf pages of a table's
// B-tree asked of the disk at once. Not installed.
//
// A cold epoch of records stored on overflow pages (LMDB moves a value there
// once it exceeds about half a page) reads each record with one io_uring
// read, but finds it through a leaf page of the B-tree, which its reading
// thread faults in from the map one at a time while its reads wait. Asking
// for every leaf at once reads them in parallel with each other and with the
// records.
//
// Contract
// - request_leaf_pages(txn, dbi, name, fd, budget) walks the branch pages of
//   the table `name` (opened as `dbi`) in `txn`'s snapshot, reading them with
//   pread() from `fd` (data.mdb, opened buffered: the pages it reads stay in
//   the page cache), and asks the kernel to read the table's leaf pages into
//   the page cache (posix_fadvise POSIX_FADV_WILLNEED over runs of adjacent
//   pages). It returns the number of leaf pages asked for. The caller waits
//   for the branch pages (one read per level) and for the requests' submission
//   (which blocks while the device's queue is full: up to budget / page size
//   single-page reads), not for the leaves.
// - It asks for nothing (returns 0) when the leaves are not a small part of
//   the table (fewer overflow pages than leaf pages: the values lie in the
//   leaves, and reading the leaves would read the table), when they take
//   more than `budget` bytes, or when any page it walks is not what LMDB
//   writes (a damaged file: the lookups raise it as they would without
//   this). It reads the branch pages with pread(), each at most once and no
//   more than the table's record counts, at most 32 levels (LMDB's own
//   limit); the table's record comes from the main table through the map,
//   under the fault guard (fault_guard.h).
// - Advisory only: what a lookup returns does not depend on it.
// - Thread safety: reentrant; `txn` is used only by the calling thread.
#pragma once

#include <lmdb.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace torch_lmdb {
namespace detail {

// LMDB 0.9's page header (mdb.c MDB_page): pgno u64, pad u16, flags u16,
// lower u16, upper u16; then `(lower - 16) / 2` u16 offsets of its nodes.
struct PageHeader {
  static constexpr size_t kBytes = 16;
  static constexpr uint16_t kBranch = 0x01, kLeaf = 0x02;
  static constexpr uint16_t kKinds = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40;
  uint64_t pgno = 0;
  uint16_t flags = 0, lower = 0, upper = 0;

  static PageHeader read(const unsigned char* p) noexcept {
    PageHeader h;
    std::memcpy(&h.pgno, p, 8);
    std::memcpy(&h.flags, p + 10, 2);
    std::memcpy(&h.lower, p + 12, 2);
    std::memcpy(&h.upper, p + 14, 2);
    return h;
  }
  uint16_t kind() const noexcept { return flags & kKinds; }
  /// Page `at` of a file of `psize`-byte pages, as LMDB writes it: its own
  /// number, kBytes <= lower <= upper <= psize.
  bool sane(uint64_t at, size_t psize) const noexcept {
    return pgno == at && lower >= kBytes && lower <= upper && upper <= psize;
  }
};

// The most a table's leaves may take for readers to ask for them at once:
// a 16 KiB record takes ~26 bytes of a leaf, so 256 MiB covers ~10 million
// of them (~160 GB).
constexpr size_t kLeafRequestBytes = size_t{256} << 20;

size_t request_leaf_pages(MDB_txn* txn, MDB_dbi dbi, const std::string& name, int fd, size_t budget) noexcept;

}  // namespace detail
}  // namespace torch_lmdb
