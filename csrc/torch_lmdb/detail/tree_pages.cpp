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

// LMDB 0.9's on-disk layout (mdb.c): a page starts with its header
// (PageHeader). A branch node is MDB_node: the child's page number in mn_lo,
// mn_hi (low 32 bits) and mn_flags (high 16), then mn_ksize and the key. A
// named table's record in the main table is MDB_db (48 bytes).
constexpr MDB_dbi kMainDbi = 1;
constexpr size_t kPageHeader = PageHeader::kBytes;
constexpr uint16_t kMostDepth = 32;     // LMDB's own (CURSOR_STACK): a cursor goes no deeper
constexpr size_t kMostRunPages = 32;    // one WILLNEED call: the kernel reads at most its read-ahead size of one

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
    while (j < pgnos.size() && j - i < kMostRunPages && pgnos[j] == pgnos[j - 1] + 1) ++j;
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
  const PageHeader h = PageHeader::read(p);
  if (!h.sane(pgno, psize) || h.kind() != PageHeader::kBranch || (h.lower - kPageHeader) % 2 != 0) return false;
  const size_t lower = h.lower, upper = h.upper;
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

size_t request_leaf_pages(MDB_txn* txn, MDB_dbi dbi, const std::string& name, int fd, size_t budget) noexcept try {
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
  // The record's counts bound the walk (a damaged one can only stop it early):
  // it reads each of the table's branch pages once, and no page twice.
  if (t.depth < 2 || t.depth > kMostDepth || t.leaf_pages == 0 || t.branch_pages == 0 || t.leaf_pages >= pages ||
      t.branch_pages >= pages || t.overflow_pages < t.leaf_pages || t.leaf_pages > budget / psize || t.root < 2 ||
      t.root >= pages)
    return 0;
  std::vector<uint64_t> level{t.root}, next;
  std::vector<unsigned char> buf;
  uint64_t branches = 0;
  for (uint16_t d = 1; d < t.depth; ++d) {
    const uint64_t most = d + 1 == t.depth ? t.leaf_pages : t.branch_pages;  // children of this level
    will_need(fd, level, psize);  // (a level's branch pages read in parallel)
    next.clear();
    for (const uint64_t pgno : level) {
      if (++branches > t.branch_pages || !branch_children(fd, pgno, psize, pages, buf, next) || next.size() > most)
        return 0;
    }
    std::sort(next.begin(), next.end());
    if (std::adjacent_find(next.begin(), next.end()) != next.end()) return 0;  // a page twice: not a tree
    level.swap(next);
  }
  if (level.size() != t.leaf_pages) return 0;
  will_need(fd, level, psize);
  return level.size();
} catch (...) {  // (std::bad_alloc: it is only a hint)
  return 0;
}

}  // namespace detail
}  // namespace torch_lmdb
