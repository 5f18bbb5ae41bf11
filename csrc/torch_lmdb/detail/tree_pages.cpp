#include "torch_lmdb/detail/tree_pages.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "torch_lmdb/detail/fault_guard.h"

namespace torch_lmdb {
namespace detail {
namespace {

// LMDB 0.9's on-disk layout (mdb.c): a page starts with MDB_page's 16 bytes
// (pgno u64, pad u16, flags u16, lower u16, upper u16), then `(lower - 16) / 2`
// u16 offsets of its nodes. A branch node is MDB_node: the child's page number
// in mn_lo, mn_hi (low 32 bits) and mn_flags (high 16), then mn_ksize and the
// key. A named table's record in the main table is MDB_db (48 bytes).
constexpr MDB_dbi kMainDbi = 1;
constexpr size_t kPageHeader = 16;
constexpr uint16_t kBranch = 0x01;
constexpr uint16_t kKinds = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40;

struct TableRecord {
  uint16_t depth = 0;
  uint64_t branch_pages = 0, leaf_pages = 0, overflow_pages = 0, entries = 0, root = 0;
};

template <typename T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

bool table_record(MDB_txn* txn, const std::string& name, TableRecord* out) {
  MDB_val k{name.size(), const_cast<char*>(name.data())}, v{0, nullptr};
  if (guarded_get(txn, kMainDbi, &k, &v) != MDB_SUCCESS || v.mv_size != 48) return false;
  const auto* p = static_cast<const unsigned char*>(v.mv_data);
  out->depth = load<uint16_t>(p + 6);
  out->branch_pages = load<uint64_t>(p + 8);
  out->leaf_pages = load<uint64_t>(p + 16);
  out->overflow_pages = load<uint64_t>(p + 24);
  out->entries = load<uint64_t>(p + 32);
  out->root = load<uint64_t>(p + 40);
  return true;
}

// Asks for pages `pgnos` (sorted) in runs of adjacent pages.
void will_need(int fd, const std::vector<uint64_t>& pgnos, size_t psize) {
  for (size_t i = 0; i < pgnos.size();) {
    size_t j = i + 1;
    while (j < pgnos.size() && pgnos[j] == pgnos[j - 1] + 1) ++j;
    (void)::posix_fadvise(fd, static_cast<off_t>(pgnos[i] * psize), static_cast<off_t>((j - i) * psize),
                          POSIX_FADV_WILLNEED);
    i = j;
  }
}

// The children of branch page `pgno`, appended to `out`; false unless it is
// a branch page whose children lie in the file's `pages` pages.
bool branch_children(int fd, uint64_t pgno, size_t psize, uint64_t pages, std::vector<unsigned char>& buf,
                     std::vector<uint64_t>& out) {
  buf.resize(psize);
  if (::pread(fd, buf.data(), psize, static_cast<off_t>(pgno * psize)) != static_cast<ssize_t>(psize)) return false;
  const unsigned char* p = buf.data();
  const uint16_t flags = load<uint16_t>(p + 10), lower = load<uint16_t>(p + 12), upper = load<uint16_t>(p + 14);
  if (load<uint64_t>(p) != pgno || (flags & kKinds) != kBranch || lower < kPageHeader || lower > upper ||
      upper > psize || (lower - kPageHeader) % 2 != 0)
    return false;
  for (size_t i = 0; i < (lower - kPageHeader) / 2; ++i) {
    const size_t at = load<uint16_t>(p + kPageHeader + 2 * i);
    if (at < upper || at + 8 > psize) return false;
    const uint64_t child = uint64_t{load<uint16_t>(p + at)} | uint64_t{load<uint16_t>(p + at + 2)} << 16 |
                           uint64_t{load<uint16_t>(p + at + 4)} << 32;
    if (child < 2 || child >= pages) return false;  // (pages 0 and 1 are the meta pages)
    out.push_back(child);
  }
  return true;
}

}  // namespace

size_t request_leaf_pages(MDB_txn* txn, MDB_dbi dbi, const std::string& name, int fd, size_t budget) {
  if (txn == nullptr || fd < 0) return 0;
  MDB_stat st{};
  TableRecord t;
  if (guarded_stat(txn, dbi, &st) != MDB_SUCCESS || !table_record(txn, name, &t)) return 0;
  // The record read must be the table's (the layout above is LMDB 0.9's).
  if (t.depth != st.ms_depth || t.branch_pages != st.ms_branch_pages || t.leaf_pages != st.ms_leaf_pages ||
      t.overflow_pages != st.ms_overflow_pages || t.entries != st.ms_entries)
    return 0;
  const size_t psize = st.ms_psize;
  struct stat fst {};
  if (psize < 512 || ::fstat(fd, &fst) != 0) return 0;
  const uint64_t pages = static_cast<uint64_t>(fst.st_size) / psize;
  if (t.depth < 2 || t.leaf_pages == 0 || t.overflow_pages < t.leaf_pages || t.leaf_pages > budget / psize ||
      t.root >= pages)
    return 0;
  std::vector<uint64_t> level{t.root}, next;
  std::vector<unsigned char> buf;
  for (uint16_t d = 1; d < t.depth; ++d) {
    will_need(fd, level, psize);  // (a level's branch pages read in parallel)
    next.clear();
    for (const uint64_t pgno : level) {
      if (!branch_children(fd, pgno, psize, pages, buf, next)) return 0;
      if (next.size() > t.leaf_pages + t.branch_pages) return 0;
    }
    std::sort(next.begin(), next.end());
    level.swap(next);
  }
  if (level.size() != t.leaf_pages) return 0;
  will_need(fd, level, psize);
  return level.size();
}

}  // namespace detail
}  // namespace torch_lmdb
