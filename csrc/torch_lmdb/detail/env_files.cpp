#include "torch_lmdb/detail/env_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/tree_pages.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace detail {

// LMDB 0.9 takes the page size from the meta pages without checking it: a
// damaged meta page with page size 0 makes mdb_env_open divide by zero
// (SIGFPE). Each meta page that LMDB would accept (P_META flag, magic, data
// version; lmdb's mdb_env_read_header) must name a power of two from 512 to
// 64 KiB, else CorruptedError naming the file.
void check_meta_pages(const std::string& data_path, const std::string& path) {
  int meta = 0;
  for (const detail::MetaPage& m : detail::read_meta_pages(data_path)) {
    if (m.lmdb_accepts && !m.page_size_ok())
      throw CorruptedError("'" + data_path + "' is damaged: its meta page " + std::to_string(meta) +
                               " gives a page size of " + std::to_string(m.page_size) +
                               " bytes; run `torch-lmdb verify` and rebuild it from the source data",
                           MDB_CORRUPTED, path);
    ++meta;
  }
  // A damaged root of the table of tables can make mdb_dbi_open search it
  // forever (found by fuzz_open). A commit between the reads of the meta page
  // and of its root may have reused that page: read both again then.
  std::string problem;
  for (int attempt = 0; attempt < 3; ++attempt) {
    problem = main_root_problem(data_path);
    if (problem.empty()) return;
  }
  throw CorruptedError("'" + data_path + "' is damaged: " + problem +
                           "; run `torch-lmdb verify` and rebuild it from the source data",
                       MDB_CORRUPTED, path);
}


// Size of LMDB's lock file for `max_readers` slots: sizeof(MDB_txninfo) +
// (max_readers - 1) * sizeof(MDB_reader) (mdb.c), that is 192 + 64 * (n - 1)
// bytes on Linux x86-64 and aarch64 (each part padded to a 64-byte cache
// line). LMDB adopts the size of an existing lock file, so this must be exact
// for max_readers to hold.
size_t lock_file_bytes(unsigned max_readers) {
  return static_cast<size_t>(max_readers) * 64 + 128;
}


// Creates (or opens) lock.mdb and gives it its disk blocks now: LMDB maps
// the lock file and writes it through the map, so on a full disk its first
// write would be a SIGBUS. Returns 0, or the errno of a failed open (the
// caller decides: read-only storage), or throws DiskFullError.
int preallocate_lock_file(const std::string& path, unsigned max_readers) {
  const std::string lock_path = path + "/lock.mdb";
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  struct stat st {};
  size_t bytes = lock_file_bytes(max_readers);
  if (::fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) > bytes) bytes = static_cast<size_t>(st.st_size);
  const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  ::close(fd);
  if (rc == ENOSPC || rc == EDQUOT) {
    throw DiskFullError("cannot create the lock file of '" + path + "': " + std::strerror(rc) +
                            " (the disk is full; free space and open again)",
                        ENOSPC, path);
  }
  return 0;  // other fallocate failures (e.g. EOPNOTSUPP): LMDB's own ftruncate then
}


// This process's mappings of the file (dev, ino): start address and length,
// from /proc/self/maps. LMDB does not expose its map's address (MDB_envinfo's
// me_mapaddr is only the MDB_FIXEDMAP address), and check_value needs it.
std::vector<std::pair<uintptr_t, size_t>> mappings_of(std::pair<dev_t, ino_t> key) {
  std::vector<std::pair<uintptr_t, size_t>> out;
  FILE* maps = std::fopen("/proc/self/maps", "re");
  if (maps == nullptr) return out;
  char line[4096];
  while (std::fgets(line, sizeof line, maps) != nullptr) {
    unsigned long start = 0, end = 0, offset = 0, inode = 0;
    unsigned major = 0, minor = 0;
    char perms[8];
    if (std::sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &start, &end, perms, &offset, &major, &minor, &inode) != 7)
      continue;
    if (inode == static_cast<unsigned long>(key.second) && offset == 0)  // (st_dev and the maps device differ on some filesystems)
      out.emplace_back(start, end - start);
  }
  std::fclose(maps);
  return out;
}


// The map LMDB made between two looks at the file's mappings: the one that is
// new, else the one of the map's length; nullptr when it cannot be told.
const char* find_map(const std::vector<std::pair<uintptr_t, size_t>>& before,
                     const std::vector<std::pair<uintptr_t, size_t>>& after, size_t length) {
  const char* found = nullptr;
  int candidates = 0;
  for (const auto& m : after) {
    if (std::find(before.begin(), before.end(), m) == before.end()) {
      found = reinterpret_cast<const char*>(m.first);
      ++candidates;
    }
  }
  if (candidates == 1) return found;
  candidates = 0;
  for (const auto& m : after) {
    if (m.second == length) {
      found = reinterpret_cast<const char*>(m.first);
      ++candidates;
    }
  }
  return candidates == 1 ? found : nullptr;
}


bool filesystem_readonly(const std::string& path) {
  struct statvfs vfs {};
  return ::statvfs(path.c_str(), &vfs) == 0 && (vfs.f_flag & ST_RDONLY) != 0;
}


bool make_dirs(const std::string& path) {
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    partial = path.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) return false;
  }
  return true;
}

int lock_writer_file(const std::string& path) {
  const int fd = ::open((path + "/writer.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw_mdb(errno, "open(writer.lock)", path, "");
  struct flock region {};
  region.l_type = F_WRLCK;
  region.l_whence = SEEK_SET;
  if (::fcntl(fd, F_SETLK, &region) != 0) {
    ::close(fd);  // (this process holds no lock on the file: its Writer claims the env first)
    throw LockError("another Writer has '" + path + "' open (in another process); one writer at a time", EAGAIN,
                    path);
  }
  return fd;
}

// ---- meta pages (meta.h) -------------------------------------------------------

std::vector<MetaPage> read_meta_pages(const std::string& data_path) {
  // Layout (lmdb 0.9, 64-bit; mdb.c MDB_page, MDB_meta): a 16-byte page
  // header (flags u16 at 10), then magic u32, version u32, address u64, map
  // size u64, two MDB_db of 48 bytes (the first one's leading u32 holds the
  // page size), last_pg u64, txnid u64. The second meta page starts at the
  // first one's page size. LMDB reads 152 bytes of each (the page header and
  // MDB_meta), so a file of 152 bytes is all it needs to accept one.
  std::vector<MetaPage> out;
  const int fd = ::open(data_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  size_t offset = 0;
  for (int meta = 0; meta < 2; ++meta) {
    unsigned char page[152] = {};
    if (::pread(fd, page, sizeof page, static_cast<off_t>(offset)) < static_cast<ssize_t>(sizeof page)) break;
    MetaPage m;
    uint16_t flags;
    uint32_t magic, version;
    std::memcpy(&flags, page + 10, 2);
    std::memcpy(&magic, page + 16, 4);
    std::memcpy(&version, page + 20, 4);
    std::memcpy(&m.page_size, page + 40, 4);
    std::memcpy(&m.last_page, page + 136, 8);
    std::memcpy(&m.txnid, page + 144, 8);
    std::memcpy(&m.main_root, page + 128, 8);  // the second MDB_db's md_root
    m.lmdb_accepts = (flags & 0x08) && magic == 0xBEEFC0DE && version == 1;
    out.push_back(m);
    if (meta == 0) {
      if (!m.page_size_ok()) break;  // where LMDB would read the second one is unknown
      offset = m.page_size;
    }
  }
  ::close(fd);
  return out;
}


// The meta page LMDB opens the file at: the newest one it accepts.
const MetaPage* newest_meta_page(const std::vector<MetaPage>& metas) {
  const MetaPage* best = nullptr;
  for (const MetaPage& m : metas)
    if (m.lmdb_accepts && m.page_size_ok() && (best == nullptr || m.txnid > best->txnid)) best = &m;
  return best;
}

std::string meta_pages_problem(const std::string& data_path) {
  struct stat st {};
  if (::stat(data_path.c_str(), &st) != 0) return "cannot read " + data_path + ": " + std::strerror(errno);
  const auto metas = read_meta_pages(data_path);
  const MetaPage* best = newest_meta_page(metas);
  if (best == nullptr)
    return data_path + " has no valid LMDB meta page (" + std::to_string(st.st_size) +
           " bytes; the first pages are damaged or this is not an LMDB file)";
  const uint64_t needed = (best->last_page + 1) * best->page_size;
  if (static_cast<uint64_t>(st.st_size) < needed)
    return data_path + " is truncated: " + std::to_string(st.st_size) + " bytes, its last commit uses " +
           std::to_string(needed) + " (" + std::to_string(best->last_page + 1) + " pages of " +
           std::to_string(best->page_size) + ")";
  const std::string root = main_root_problem(data_path);
  return root.empty() ? root : data_path + " is damaged: " + root;
}

std::string main_root_problem(const std::string& data_path) {
  const auto metas = read_meta_pages(data_path);
  const MetaPage* best = newest_meta_page(metas);
  if (best == nullptr || best->main_root == ~uint64_t{0}) return std::string();
  const std::string root = "the root page " + std::to_string(best->main_root) + " of its table of tables";
  if (best->main_root > best->last_page)
    return root + " lies past its last page " + std::to_string(best->last_page);
  const int fd = ::open(data_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::string();
  unsigned char header[PageHeader::kBytes] = {};
  const ssize_t got = ::pread(fd, header, sizeof header, static_cast<off_t>(best->main_root * best->page_size));
  ::close(fd);
  if (got < static_cast<ssize_t>(sizeof header)) return std::string();  // (a short file: its own error)
  const PageHeader h = PageHeader::read(header);
  if (!h.sane(best->main_root, best->page_size) || (h.kind() != PageHeader::kBranch && h.kind() != PageHeader::kLeaf))
    return root + " is not a B-tree page (page number " + std::to_string(h.pgno) + ", flags " +
           std::to_string(h.flags) + ", bounds " + std::to_string(h.lower) + ".." + std::to_string(h.upper) + ")";
  return std::string();
}

}  // namespace detail
}  // namespace torch_lmdb
