// torch_lmdb/errors.h -- the one table from LMDB return codes to exceptions.
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

/// MDB_MAP_FULL: the map is too small (the Writer grows it itself unless
/// auto_grow is off).
class MapFullError : public Error { using Error::Error; };
/// MDB_READERS_FULL: more concurrent readers than max_readers.
class ReadersFullError : public Error { using Error::Error; };
/// MDB_NOTFOUND: a key or named database is missing.
class NotFoundError : public Error { using Error::Error; };
/// MDB_CORRUPTED / MDB_PAGE_NOTFOUND, or a record that fails validation
/// (truncated, bad checksum, absurd sizes).
class CorruptedError : public Error { using Error::Error; };
/// The path is not a torch_lmdb database, or of an unsupported version, or
/// the operation conflicts with its state (e.g. mode "w" on existing data).
class InvalidDatabaseError : public Error { using Error::Error; };
/// EACCES/EROFS/EAGAIN on open: permissions, read-only storage, lock files.
class LockError : public Error { using Error::Error; };

/// The disk is full (ENOSPC), or a write failed while its filesystem had no
/// room left. Python: torch_lmdb.DiskFullError, an OSError too.
class DiskFullError : public Error { using Error::Error; };

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
