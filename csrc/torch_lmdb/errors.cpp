#include "torch_lmdb/errors.h"

#include <lmdb.h>

#include <cerrno>

namespace torch_lmdb {
namespace detail {

const char* mdb_code_name(int rc) noexcept {
  switch (rc) {
    case MDB_SUCCESS: return "MDB_SUCCESS";
    case MDB_KEYEXIST: return "MDB_KEYEXIST";
    case MDB_NOTFOUND: return "MDB_NOTFOUND";
    case MDB_PAGE_NOTFOUND: return "MDB_PAGE_NOTFOUND";
    case MDB_CORRUPTED: return "MDB_CORRUPTED";
    case MDB_PANIC: return "MDB_PANIC";
    case MDB_VERSION_MISMATCH: return "MDB_VERSION_MISMATCH";
    case MDB_INVALID: return "MDB_INVALID";
    case MDB_MAP_FULL: return "MDB_MAP_FULL";
    case MDB_DBS_FULL: return "MDB_DBS_FULL";
    case MDB_READERS_FULL: return "MDB_READERS_FULL";
    case MDB_TXN_FULL: return "MDB_TXN_FULL";
    case MDB_CURSOR_FULL: return "MDB_CURSOR_FULL";
    case MDB_PAGE_FULL: return "MDB_PAGE_FULL";
    case MDB_MAP_RESIZED: return "MDB_MAP_RESIZED";
    case MDB_INCOMPATIBLE: return "MDB_INCOMPATIBLE";
    case MDB_BAD_RSLOT: return "MDB_BAD_RSLOT";
    case MDB_BAD_TXN: return "MDB_BAD_TXN";
    case MDB_BAD_VALSIZE: return "MDB_BAD_VALSIZE";
    case MDB_BAD_DBI: return "MDB_BAD_DBI";
    case EACCES: return "EACCES";
    case EROFS: return "EROFS";
    case EAGAIN: return "EAGAIN";
    case ENOENT: return "ENOENT";
    case ENOSPC: return "ENOSPC";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    default: return "error";
  }
}

namespace {
const char* hint_for(int rc) noexcept {
  switch (rc) {
    case MDB_MAP_FULL:
      return "the map is full; the Writer grows the map itself unless "
             "auto_grow=False, otherwise pass a larger map_size";
    case MDB_READERS_FULL:
      return "too many concurrent readers; raise max_readers (default 1024) "
             "or use fewer workers";
    case MDB_NOTFOUND:
      return "the key or named database does not exist; is this a torch_lmdb "
             "database?";
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
      return "the database file is damaged; run `torch-lmdb verify` and "
             "rebuild it from the source data";
    case MDB_INVALID:
      return "the file is not an LMDB database";
    case MDB_VERSION_MISMATCH:
      return "the database was written by an incompatible liblmdb version";
    case EACCES:
    case EROFS:
      return "no permission to open the database or its lock file; readers "
             "fall back to lock=False on read-only storage";
    case EAGAIN:
      return "the lock file is held by another process";
    case ENOENT:
      return "no database at this path";
    case ENOSPC:
      return "the disk is full; committed samples are kept, free space and append (mode=\"a\")";
    default:
      return nullptr;
  }
}
}  // namespace

void throw_mdb(int rc, const char* what, const std::string& path,
               const std::string& context) {
  std::string msg = std::string(what) + " failed: " + mdb_code_name(rc) +
                    " (" + mdb_strerror(rc) + ") at '" + path + "'";
  if (!context.empty()) msg += " (" + context + ")";
  if (const char* hint = hint_for(rc)) msg += ": " + std::string(hint);
  switch (rc) {
    case MDB_MAP_FULL: throw MapFullError(msg, rc, path);
    case MDB_READERS_FULL: throw ReadersFullError(msg, rc, path);
    case MDB_NOTFOUND:
    case ENOENT: throw NotFoundError(msg, rc, path);
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_PANIC: throw CorruptedError(msg, rc, path);
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
    case MDB_INCOMPATIBLE: throw InvalidDatabaseError(msg, rc, path);
    case EACCES:
    case EROFS:
    case EAGAIN: throw LockError(msg, rc, path);
    case ENOSPC: throw DiskFullError(msg, rc, path);
    default: throw Error(msg, rc, path);
  }
}

void check_mdb(int rc, const char* what, const std::string& path,
               const std::string& context) {
  if (rc != MDB_SUCCESS) throw_mdb(rc, what, path, context);
}

}  // namespace detail
}  // namespace torch_lmdb
