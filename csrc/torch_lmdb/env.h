// torch_lmdb/env.h -- RAII owners of LMDB handles and the process-wide env
// registry.
//
// Contract
// - One MDB_env per database directory per process: Env::open() looks the
//   directory up by device+inode in a registry and returns the live Env when
//   there is one (lmdb.h: "Do not have open an LMDB database twice in the same
//   process at the same time").
// - Fork safety: every Env records the pid that opened it. After fork() the
//   child never uses, resets or closes the parent's handles (lmdb.h: "Use an
//   MDB_env* in the process which opened it, without fork()ing"); the
//   registry is emptied in the child by a pthread_atfork handler, so the next
//   Env::open() in the child opens a fresh env. fork_generation() changes in
//   every child, so holders can detect that they must reopen.
// - Read transactions come from a per-env pool of reset transactions
//   (MDB_NOTLS, mdb_txn_reset/mdb_txn_renew): a ReadTxn is valid on any
//   thread but must be used by one thread at a time; returning it to the pool
//   resets it, so no snapshot is held between batches.
// - Memory returned by mdb_get is valid only until the ReadTxn is destroyed.
// - Thread safety: Env::open, ReadTxn acquisition and all const members are
//   thread-safe. WriteTxn follows LMDB: one at a time per env.
#pragma once

#include <lmdb.h>
#include <sys/types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace torch_lmdb {

/// How to open a database.
struct EnvOptions {
  /// Open with MDB_RDONLY (readers). Writers pass false.
  bool readonly = true;
  /// Locking: 1 = use the lock file, 0 = MDB_NOLOCK (only safe when nobody
  /// writes), -1 = automatic: lock, but fall back to MDB_NOLOCK with a warning
  /// when the directory is read-only.
  int lock = -1;
  /// Readahead of the OS; off by default (random access, lmdb.h MDB_NORDAHEAD).
  bool readahead = false;
  /// Size of the reader table (MDB_READERS_FULL guard for many workers).
  unsigned max_readers = 1024;
  /// Initial map size in bytes for writers (0 = keep the file's own size or
  /// 64 MiB for a new database). Readers always adopt the file's size.
  size_t map_size = 0;
  /// Called with warnings (e.g. the lock fallback); default TORCH_WARN.
  std::function<void(const std::string&)> warn;
};

/// Changes in every forked child (pthread_atfork). Cheap: one atomic load.
uint64_t fork_generation() noexcept;

class Env;

namespace detail {
struct EnvCloser {
  pid_t owner;
  void operator()(MDB_env* e) const noexcept;  // never closes a parent's env
};
using UniqueEnv = std::unique_ptr<MDB_env, EnvCloser>;
}  // namespace detail

/// A read transaction borrowed from an Env's pool; returns itself (reset) on
/// destruction. Move-only.
class ReadTxn {
 public:
  ReadTxn() = default;
  ReadTxn(ReadTxn&& other) noexcept;
  ReadTxn& operator=(ReadTxn&& other) noexcept;
  ReadTxn(const ReadTxn&) = delete;
  ReadTxn& operator=(const ReadTxn&) = delete;
  ~ReadTxn();
  MDB_txn* get() const noexcept { return txn_; }

 private:
  friend class Env;
  ReadTxn(const Env* env, MDB_txn* txn) : env_(env), txn_(txn) {}
  const Env* env_ = nullptr;
  MDB_txn* txn_ = nullptr;
};

/// A write transaction; aborted on destruction unless committed. Move-only.
class WriteTxn {
 public:
  explicit WriteTxn(Env& env);
  WriteTxn(WriteTxn&& other) noexcept
      : env_(other.env_), txn_(other.txn_) { other.txn_ = nullptr; }
  WriteTxn(const WriteTxn&) = delete;
  WriteTxn& operator=(const WriteTxn&) = delete;
  ~WriteTxn() { abort(); }
  MDB_txn* get() const noexcept { return txn_; }
  /// Commits; throws torch_lmdb::Error (e.g. MapFullError) on failure, after
  /// which the transaction is gone.
  void commit();
  /// Idempotent, noexcept.
  void abort() noexcept;

 private:
  Env* env_;
  MDB_txn* txn_ = nullptr;
};

/// A shared, opened database environment with its `samples` and `meta`
/// named databases. Obtain with Env::open(); never copied.
class Env {
 public:
  /// Opens (or returns the already opened) database at `path`.
  /// Writers (options.readonly == false) create the directory and the named
  /// databases. Throws NotFoundError when a reader's path does not exist,
  /// InvalidDatabaseError when the path is open read-only in this process and
  /// a writer asks for it, LockError on permission problems.
  static std::shared_ptr<Env> open(const std::string& path,
                                   const EnvOptions& options);

  ~Env();
  Env(const Env&) = delete;
  Env& operator=(const Env&) = delete;

  MDB_env* handle() const noexcept { return env_.get(); }
  const std::string& path() const noexcept { return path_; }
  bool readonly() const noexcept { return readonly_; }
  /// True when MDB_NOLOCK is in effect (forced or by fallback).
  bool nolock() const noexcept { return nolock_; }
  bool readahead() const noexcept { return readahead_; }
  MDB_dbi samples_dbi() const noexcept { return samples_; }
  MDB_dbi meta_dbi() const noexcept { return meta_; }
  pid_t owner() const noexcept { return owner_; }

  /// Borrows a read transaction (renewed snapshot). Handles MDB_MAP_RESIZED
  /// (another process grew the map) by adopting the new size.
  ReadTxn read_txn() const;

  /// Current map size in bytes.
  size_t map_size() const;
  /// Grows the map to at least `bytes` (no transaction may be active).
  void set_map_size(size_t bytes);
  /// Number of reader-table slots in use (mdb_reader_list), -1 without lock.
  int reader_count() const;
  /// Flushes to disk (mdb_env_sync force).
  void sync();

 private:
  friend class ReadTxn;
  Env() = default;
  void release(MDB_txn* txn) const noexcept;

  detail::UniqueEnv env_{nullptr, detail::EnvCloser{0}};
  std::string path_;
  bool readonly_ = true;
  bool nolock_ = false;
  bool readahead_ = false;
  pid_t owner_ = 0;
  MDB_dbi samples_ = 0;
  MDB_dbi meta_ = 0;
  mutable std::mutex pool_mutex_;
  mutable std::vector<MDB_txn*> pool_;  // reset read txns
  mutable std::mutex resize_mutex_;
};

/// Big-endian 8-byte key of sample `index` (key order == index order).
inline void encode_key(uint64_t index, unsigned char out[8]) noexcept {
  for (int i = 7; i >= 0; --i) {
    out[i] = static_cast<unsigned char>(index & 0xff);
    index >>= 8;
  }
}

/// The index of an 8-byte key made by encode_key (one load and a byte swap:
/// the samples table's comparator calls it for every key compare).
inline uint64_t decode_key(const unsigned char key[8]) noexcept {
  uint64_t index;
  std::memcpy(&index, key, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  index = __builtin_bswap64(index);
#endif
  return index;
}

}  // namespace torch_lmdb
