#include "torch_lmdb/errors.h"

#include <lmdb.h>

#include <cerrno>

namespace torch_lmdb {
namespace detail {
namespace {

constexpr const char* kDamaged =
    "the database file is damaged; run `torch-lmdb verify` and rebuild it from the source data";
constexpr const char* kNoPermission =
    "no permission to open the database or its lock file; readers fall back to lock=False on read-only storage";

// The one table of the LMDB and errno codes torch_lmdb names: X(code, class
// thrown for it, hint or nullptr). The name is the code's own ("MDB_MAP_FULL");
// a code not listed is "error", thrown as Error without a hint. A new code is
// one row; a new class, one row of TORCH_LMDB_ERROR_CLASSES (errors.h).
#define TORCH_LMDB_ERROR_CODES(X)                                                                          \
  X(MDB_SUCCESS, Error, nullptr)                                                                           \
  X(MDB_KEYEXIST, Error, nullptr)                                                                          \
  X(MDB_NOTFOUND, NotFoundError, "the key or named database does not exist; is this a torch_lmdb database?") \
  X(MDB_PAGE_NOTFOUND, CorruptedError, kDamaged)                                                           \
  X(MDB_CORRUPTED, CorruptedError, kDamaged)                                                               \
  X(MDB_PANIC, CorruptedError, nullptr)                                                                    \
  X(MDB_VERSION_MISMATCH, InvalidDatabaseError,                                                            \
    "the database was written by an incompatible liblmdb version")                                         \
  X(MDB_INVALID, InvalidDatabaseError, "the file is not an LMDB database")                                 \
  X(MDB_MAP_FULL, MapFullError,                                                                            \
    "the map is full; the Writer grows the map itself unless auto_grow=False, otherwise pass a larger "   \
    "map_size")                                                                                            \
  X(MDB_DBS_FULL, Error, nullptr)                                                                          \
  X(MDB_READERS_FULL, ReadersFullError,                                                                    \
    "too many concurrent readers; raise max_readers (default 1024) or use fewer workers")                  \
  X(MDB_TXN_FULL, Error, nullptr)                                                                          \
  X(MDB_CURSOR_FULL, Error, nullptr)                                                                       \
  X(MDB_PAGE_FULL, Error, nullptr)                                                                         \
  X(MDB_MAP_RESIZED, Error, nullptr)                                                                       \
  X(MDB_INCOMPATIBLE, InvalidDatabaseError, nullptr)                                                       \
  X(MDB_BAD_RSLOT, Error, nullptr)                                                                         \
  X(MDB_BAD_TXN, Error, nullptr)                                                                           \
  X(MDB_BAD_VALSIZE, Error, nullptr)                                                                       \
  X(MDB_BAD_DBI, Error, nullptr)                                                                           \
  X(EACCES, LockError, kNoPermission)                                                                      \
  X(EROFS, LockError, kNoPermission)                                                                       \
  X(EAGAIN, LockError, "the lock file is held by another process")                                         \
  X(ENOENT, NotFoundError, "no database at this path")                                                     \
  X(ENOSPC, DiskFullError, "the disk is full; committed samples are kept, free space and append (mode=\"a\")") \
  X(ENOMEM, Error, nullptr)                                                                                \
  X(EINVAL, Error, nullptr)                                                                                \
  X(EIO, Error, nullptr)

const char* hint_for(int rc) noexcept {
  switch (rc) {
#define TORCH_LMDB_HINT(code, Class, hint) \
  case code:                               \
    return hint;
    TORCH_LMDB_ERROR_CODES(TORCH_LMDB_HINT)
#undef TORCH_LMDB_HINT
    default:
      return nullptr;
  }
}

}  // namespace

const char* mdb_code_name(int rc) noexcept {
  switch (rc) {
#define TORCH_LMDB_NAME(code, Class, hint) \
  case code:                               \
    return #code;
    TORCH_LMDB_ERROR_CODES(TORCH_LMDB_NAME)
#undef TORCH_LMDB_NAME
    default:
      return "error";
  }
}

void throw_mdb(int rc, const char* what, const std::string& path, const std::string& context) {
  std::string msg = std::string(what) + " failed: " + mdb_code_name(rc) + " (" + mdb_strerror(rc) + ") at '" +
                    path + "'";
  if (!context.empty()) msg += " (" + context + ")";
  if (const char* hint = hint_for(rc)) msg += ": " + std::string(hint);
  switch (rc) {
#define TORCH_LMDB_THROW(code, Class, hint) \
  case code:                                \
    throw Class(msg, rc, path);
    TORCH_LMDB_ERROR_CODES(TORCH_LMDB_THROW)
#undef TORCH_LMDB_THROW
    default:
      throw Error(msg, rc, path);
  }
}

void check_mdb(int rc, const char* what, const std::string& path, const std::string& context) {
  if (rc != MDB_SUCCESS) throw_mdb(rc, what, path, context);
}

}  // namespace detail
}  // namespace torch_lmdb
