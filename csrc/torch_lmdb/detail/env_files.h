// torch_lmdb/detail/env_files.h -- internal: an environment's files, read and
// prepared without LMDB (Env::open, Env::remap, `torch-lmdb verify`). Not
// installed.
//
// Contract
// - check_meta_pages() throws CorruptedError naming data.mdb when a meta
//   page LMDB would accept gives a page size LMDB cannot use (it would
//   divide by it).
// - preallocate_lock_file() gives lock.mdb its disk blocks before LMDB maps
//   it: a full disk is DiskFullError, not a SIGBUS.
// - mappings_of()/find_map() tell where LMDB mapped data.mdb in this
//   process (from /proc/self/maps).
// - lock_writer_file() holds one writer per database across processes.
// - Thread safety: pure functions (they read and create files, hold no state).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torch_lmdb {
namespace detail {

/// Refuses a data.mdb whose meta pages LMDB would misread (`path`: the
/// database, named in the error).
void check_meta_pages(const std::string& data_path, const std::string& path);

/// Size of LMDB's lock file for `max_readers` reader slots.
size_t lock_file_bytes(unsigned max_readers);

/// Creates (or opens) path/lock.mdb with its disk blocks allocated. Returns
/// 0 or the errno of a failed open; throws DiskFullError on a full disk.
int preallocate_lock_file(const std::string& path, unsigned max_readers);

/// This process's mappings (start, length) of the file with inode key.second.
std::vector<std::pair<uintptr_t, size_t>> mappings_of(std::pair<dev_t, ino_t> key);

/// The mapping that is new in `after`, else the one of `length`; nullptr
/// when it cannot be told.
const char* find_map(const std::vector<std::pair<uintptr_t, size_t>>& before,
                     const std::vector<std::pair<uintptr_t, size_t>>& after, size_t length);

/// Whether `path` lies on a file system mounted read-only.
bool filesystem_readonly(const std::string& path);

/// mkdir -p; false when a directory cannot be made.
bool make_dirs(const std::string& path);

/// Takes the writer lock of the database at `path`: an fcntl (POSIX) write
/// lock on path/writer.lock, which the kernel drops when the process dies (a
/// killed writer never blocks the next one) and which a forked child does not
/// inherit (an flock would be shared with it). Returns its descriptor (closing
/// it releases the lock); LockError when another process holds it.
int lock_writer_file(const std::string& path);

}  // namespace detail
}  // namespace torch_lmdb
