// Where an env's values lie: the per-file value index (Env::value_index),
// the check that a value lies inside data.mdb, and eviction of a value's pages.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "torch_lmdb/detail/direct_io.h"
#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/fault_guard.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {

ValueIndex::ValueIndex(uint64_t txnid, uint64_t file_version, size_t keys)
    : txnid_(txnid),
      file_version_(file_version),
      keys_(keys),
      slots_(static_cast<Slot*>(std::calloc(std::max<size_t>(keys, 1), sizeof(Slot)))) {
  if (!slots_) keys_ = 0;  // out of memory: an index that holds nothing
}

std::shared_ptr<ValueIndex> Env::value_index(MDB_txn* txn, size_t max_keys) const {
  if (max_keys == 0) return nullptr;
  const uint64_t id = mdb_txn_id(txn);
  // The file as it is now: a writer's commit changes its ctime too (a new
  // index then, as for its new transaction id); a file copied over data.mdb
  // changes it whatever its transaction id.
  const uint64_t version = file_version();
  if (version == 0) return nullptr;
  {
    std::lock_guard<std::mutex> lock(index_mutex_);
    if (index_ && index_->file_version() == version) {
      if (index_->txnid() == id) return index_;
      if (index_->txnid() > id) return nullptr;  // an older snapshot: keep the newer's index
    }
  }
  MDB_stat st{};
  if (detail::guarded_stat(txn, samples_, &st) != MDB_SUCCESS || st.ms_entries > max_keys) return nullptr;
  auto made = std::make_shared<ValueIndex>(id, version, st.ms_entries);  // (outside the lock: a large table is an mmap)
  std::lock_guard<std::mutex> lock(index_mutex_);
  if (index_ && index_->file_version() == version && index_->txnid() >= id)
    return index_->txnid() == id ? index_ : nullptr;
  index_ = made;
  return made;
}

uint64_t Env::file_version() const noexcept {
  struct stat now {};
  if (::fstat(fd_, &now) != 0) return 0;
  const uint64_t words[4] = {static_cast<uint64_t>(now.st_ino), static_cast<uint64_t>(now.st_size),
                             static_cast<uint64_t>(now.st_ctim.tv_sec), static_cast<uint64_t>(now.st_ctim.tv_nsec)};
  return XXH3_64bits(words, sizeof(words));
}

bool Env::value_inside(const MDB_val& v) const noexcept {
  const char* p = static_cast<const char*>(v.mv_data);
  const char* base = map_addr_;
  // Only memory of the map can lie past the file's end; a value outside the
  // map is a write transaction's dirty page (heap memory).
  if (p < base || static_cast<size_t>(p - base) >= map_bytes_) return true;
  auto inside = [&](size_t file) {
    return p >= base && static_cast<size_t>(p - base) <= file && v.mv_size <= file - static_cast<size_t>(p - base);
  };
  if (v.mv_size == 0 || inside(file_size_.load(std::memory_order_relaxed))) return true;
  struct stat now {};  // the file may have grown since we last looked
  if (::fstat(fd_, &now) == 0) {
    file_size_.store(static_cast<size_t>(now.st_size), std::memory_order_relaxed);
    if (inside(static_cast<size_t>(now.st_size))) return true;
  }
  return false;
}

void Env::check_value(const MDB_val& v, const std::string& what) const {
  if (value_inside(v)) return;
  throw CorruptedError("'" + path_ + "/data.mdb' is damaged: the value of " + what + " (" +
                           std::to_string(v.mv_size) + " bytes) lies outside the file (" +
                           std::to_string(file_size_.load()) + " bytes); run `torch-lmdb verify` and rebuild "
                           "it from the source data",
                       MDB_CORRUPTED, path_);
}

int Env::direct_fd() const {
  std::call_once(direct_once_, [this] {
    if (map_bytes_ == 0 || fd_ < 0) return;
    // The inode the map reads (a file renamed over the path later is not it).
    const std::string self = "/proc/self/fd/" + std::to_string(fd_);
    direct_fd_ = ::open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (direct_fd_ >= 0) direct_align_ = detail::direct_alignment(direct_fd_);
  });
  return direct_fd_;
}

void Env::evict(const void* p, size_t n) const noexcept {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) & ~(page - 1);
  const uintptr_t base = reinterpret_cast<uintptr_t>(map_addr_);
  if (map_bytes_ == 0 || end <= begin || begin < base || end - base > map_bytes_) return;
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  ::posix_fadvise(fd_, static_cast<off_t>(begin - base), static_cast<off_t>(end - begin), POSIX_FADV_DONTNEED);
}

}  // namespace torch_lmdb
