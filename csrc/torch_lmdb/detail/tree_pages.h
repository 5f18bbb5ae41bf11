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
#include <string>

namespace torch_lmdb {
namespace detail {

// The most a table's leaves may take for readers to ask for them at once:
// a 16 KiB record takes ~26 bytes of a leaf, so 256 MiB covers ~10 million
// of them (~160 GB).
constexpr size_t kLeafRequestBytes = size_t{256} << 20;

size_t request_leaf_pages(MDB_txn* txn, MDB_dbi dbi, const std::string& name, int fd, size_t budget) noexcept;

}  // namespace detail
}  // namespace torch_lmdb
