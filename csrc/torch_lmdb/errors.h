// torch_lmdb/errors.h -- the error classes, one table of them (Python reads it
// too), and the checks of LMDB return codes (their table is in errors.cpp).
//
// Contract
// - Every exception thrown by torch_lmdb for a storage problem derives from
//   torch_lmdb::Error (itself a std::runtime_error). Its what() names the
//   operation, the LMDB code name and mdb_strerror text, the database path,
//   the key or index when there is one, and a hint for the known codes.
// - Argument errors use LibTorch's checks instead (TORCH_CHECK_INDEX,
//   TORCH_CHECK_VALUE, TORCH_CHECK_TYPE), which the Python module maps to
//   IndexError, ValueError and TypeError.
// - Thread safety: the functions here are pure; safe from any thread.
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>

namespace torch_lmdb {

/// Base class of every storage error. `code()` is the LMDB or errno code
/// (0 when the error is ours, e.g. a bad checksum); `path()` the database.
class Error : public std::runtime_error {
 public:
  Error(const std::string& message, int code, std::string path)
      : std::runtime_error(message), code_(code), path_(std::move(path)) {}
  int code() const noexcept { return code_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int code_;
  std::string path_;
};

/// The error classes, one row each: X(Class, os_errno, summary). Every class
/// derives from Error alone; Python registers one class of the same name per
/// row (a subclass of torch_lmdb.Error, and of OSError too when `os_errno` is
/// not 0: its errno, strerror and filename are then set). Which LMDB and errno
/// codes raise which class, and their hints, is the table of errors.cpp.
#define TORCH_LMDB_ERROR_CLASSES(X)                                                                        \
  X(MapFullError, 0,                                                                                       \
    "MDB_MAP_FULL: the map is too small (the Writer grows it itself unless auto_grow is off).")            \
  X(ReadersFullError, 0, "MDB_READERS_FULL: more concurrent readers than max_readers.")                    \
  X(NotFoundError, 0, "MDB_NOTFOUND, ENOENT: a key, named database or database is missing.")              \
  X(CorruptedError, 0,                                                                                     \
    "MDB_CORRUPTED, MDB_PAGE_NOTFOUND, MDB_PANIC, or a record that fails validation (truncated, bad "     \
    "checksum, absurd sizes), or a file changed under its map.")                                           \
  X(InvalidDatabaseError, 0,                                                                               \
    "The path is not a torch_lmdb database, or of an unsupported version, or the operation conflicts "    \
    "with its state (e.g. mode \"w\" on existing data).")                                                  \
  X(LockError, 0, "EACCES, EROFS, EAGAIN on open: permissions, read-only storage, lock files.")            \
  X(DiskFullError, ENOSPC,                                                                                 \
    "The disk is full (ENOSPC), or a write failed while its filesystem had no room left.")

#define TORCH_LMDB_DECLARE_ERROR(Class, os_errno, summary) \
  class Class : public Error {                              \
    using Error::Error;                                     \
  };
TORCH_LMDB_ERROR_CLASSES(TORCH_LMDB_DECLARE_ERROR)
#undef TORCH_LMDB_DECLARE_ERROR

namespace detail {
/// Throws the exception class for `rc` unless rc == MDB_SUCCESS.
/// `what` names the call ("mdb_put"), `path` the database, `context` the key
/// or index (may be empty).
void check_mdb(int rc, const char* what, const std::string& path,
               const std::string& context = std::string());

/// Builds and throws the exception for `rc` (never returns).
[[noreturn]] void throw_mdb(int rc, const char* what, const std::string& path,
                            const std::string& context);

/// Name of an LMDB or errno code, e.g. "MDB_MAP_FULL", "EACCES".
const char* mdb_code_name(int rc) noexcept;
}  // namespace detail

}  // namespace torch_lmdb
