// torch_lmdb/detail/env.h -- RAII owners of LMDB handles and the process-wide env
// registry.
//
// Contract
// - One MDB_env per data file per process: Env::open() looks `data.mdb` up
//   by device+inode in a registry and returns the live Env when there is one
//   (lmdb.h: "Do not have open an LMDB database twice in the same process at
//   the same time"). Readers and a Writer of the same file in one process
//   share it. Opening and closing happen under the registry's lock, and an
//   open waits for a close of the same file that is under way, so two handles
//   of one file never coexist (closing one would drop the other's fcntl
//   locks).
// - Readers open the file read-write when they may (no write happens through
//   a reader), so that a Writer of the same process can share the env; on a
//   read-only file or filesystem they open it MDB_RDONLY, and a Writer of
//   that path then gets InvalidDatabaseError.
// - Map resizes never race a read: every transaction of the process (read or
//   write) holds the env's transaction gate for its lifetime; a resize
//   (set_map_size, or adopting another process's growth on MDB_MAP_RESIZED)
//   closes the gate, waits until no transaction of the process is live,
//   remaps, and reopens it (lmdb.h mdb_env_set_mapsize: "may only be called
//   if no transactions are active in this process"). MDB_MAP_RESIZED is
//   retried inside read_txn() and never reaches the caller.
// - A thread must not resize an env while it holds a transaction of that env
//   (it would wait for itself): Env::set_map_size throws instead.
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
//   check_value() bounds such memory by the file's size: a damaged file whose
//   B-tree points past its end raises CorruptedError instead of SIGBUS.
// - Files changed under the map (fault_guard.h): a fault on a page of a
//   registered map is contained; the env is then faulted(), its reads throw
//   CorruptedError, and the next Env::open() of the path closes it (once no
//   transaction of it is live) and opens the file anew. An open that finds
//   another data.mdb at a path whose lock file an env of this process holds
//   (a new version published by rename) closes that env first: two envs on
//   one lock file in one process would reset each other's reader slots.
//   Transactions of a closed env throw InvalidDatabaseError saying why.
// - Damage at open: a data.mdb shorter than the last page its meta page
//   claims raises CorruptedError naming the path (reading it would SIGBUS),
//   and so does a meta page whose page size is not a power of two from 512
//   to 64 KiB (LMDB would divide by it).
// - Thread safety: Env::open, ReadTxn acquisition and all const members are
//   thread-safe. WriteTxn follows LMDB: one at a time per env.
#pragma once

#include <lmdb.h>
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
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
  bool os_readahead = false;
  /// Size of the reader table (MDB_READERS_FULL guard for many workers).
  unsigned max_readers = 1024;
  /// Initial map size in bytes for writers (0 = keep the file's own size or
  /// 64 MiB for a new database; smaller sizes are raised to 1 MiB). Readers
  /// map at least twice the file's size.
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

/// A write transaction; aborted on destruction unless committed. Holds the
/// env's transaction gate while it lives. Move-only.
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

/// The samples table's values in one snapshot of one file, by key: filled by the
/// batched reads (Reader::read_batch and all that use it), so that a key
/// read again in the same snapshot (the next epoch) skips the B-tree search.
/// Its pointers are into the map: use them only while holding a read
/// transaction of that snapshot (Env::value_index). Thread-safe: slots are
/// filled and read concurrently, and a slot only ever holds its key's value
/// in that snapshot.
class ValueIndex {
 public:
  ValueIndex(uint64_t txnid, uint64_t file_version, size_t keys);
  /// The snapshot (mdb_txn_id) it holds values of.
  uint64_t txnid() const noexcept { return txnid_; }
  /// The file it was made for: its inode, size and change time (ctime)
  /// together (Env::value_index), so that another file copied over
  /// data.mdb with the same transaction id never reads through this index.
  uint64_t file_version() const noexcept { return file_version_; }
  /// Keys 0 .. keys() - 1 have a slot.
  size_t keys() const noexcept { return keys_; }
  /// The value of `key` once stored, else {0, nullptr}.
  MDB_val find(uint64_t key) const noexcept {
    if (key >= keys_) return MDB_val{0, nullptr};
    Slot* s = slots_.get() + key;
    char* data = __atomic_load_n(&s->data, __ATOMIC_ACQUIRE);
    if (data == nullptr) return MDB_val{0, nullptr};
    return MDB_val{__atomic_load_n(&s->size, __ATOMIC_RELAXED), data};
  }
  /// Records `v` (found by mdb_get or a cursor in this snapshot) as `key`'s value.
  void store(uint64_t key, const MDB_val& v) noexcept {
    if (key >= keys_ || v.mv_data == nullptr) return;
    Slot* s = slots_.get() + key;
    __atomic_store_n(&s->size, v.mv_size, __ATOMIC_RELAXED);
    __atomic_store_n(&s->data, static_cast<char*>(v.mv_data), __ATOMIC_RELEASE);
  }
  /// Bytes per key.
  static constexpr size_t kSlotBytes = 2 * sizeof(void*);

 private:
  // Zeroed memory from calloc (large tables: pages of zeros the kernel maps
  // as they are first touched, so a table costs what its filled slots use).
  // Accessed with atomic builtins only.
  struct Slot {
    char* data;
    size_t size;
  };
  struct Free {
    void operator()(Slot* p) const noexcept { std::free(p); }
  };
  uint64_t txnid_;
  uint64_t file_version_;
  size_t keys_;
  std::unique_ptr<Slot, Free> slots_;
};

/// A shared, opened database environment with its `samples` and `meta`
/// named databases. Obtain with Env::open(); never copied.
class Env {
 public:
  /// Opens (or returns the already opened) database at `path`.
  /// Writers (options.readonly == false) create the directory and the named
  /// databases. Throws NotFoundError when a reader's path does not exist,
  /// InvalidDatabaseError when the file is open read-only (MDB_RDONLY or
  /// MDB_NOLOCK) in this process and a writer asks for it, LockError on
  /// permission problems, DiskFullError (ENOSPC) when the lock or data file
  /// cannot be created or extended, CorruptedError for a truncated file.
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
  bool os_readahead() const noexcept { return os_readahead_; }
  MDB_dbi samples_dbi() const noexcept { return samples_; }
  MDB_dbi meta_dbi() const noexcept { return meta_; }
  pid_t owner() const noexcept { return owner_; }

  /// Borrows a read transaction (renewed snapshot). Handles MDB_MAP_RESIZED
  /// (another process grew the map) by adopting the new size, as a resize.
  ReadTxn read_txn() const;

  /// Current map size in bytes.
  size_t map_size() const;
  /// Resizes the map to `bytes`: waits until no transaction of this process
  /// is live (new ones wait meanwhile), then remaps. Throws Error when the
  /// calling thread holds a transaction of this env.
  void set_map_size(size_t bytes);
  /// Whether `v` lies inside the data file as it is on disk now (memory
  /// outside the map, a write transaction's dirty page, passes).
  bool value_inside(const MDB_val& v) const noexcept;
  /// Throws CorruptedError (naming the path and `what`) unless value_inside(v).
  void check_value(const MDB_val& v, const std::string& what) const;
  /// check_value for the value of sample `index`; its message is only built
  /// when it throws.
  void check_sample_value(const MDB_val& v, uint64_t index) const {
    if (!value_inside(v)) check_value(v, "sample index " + std::to_string(index));
  }
  /// The ValueIndex of the snapshot of `txn` (a read transaction of this
  /// env, held by the caller while it uses the index). One index per env:
  /// made for the newest snapshot seen of the file as it is now (replacing
  /// an older one, or one made before the file changed: a file copied over
  /// data.mdb in place may repeat a transaction id); nullptr for a snapshot
  /// older than the index's, or when the samples table holds more than
  /// `max_keys` entries (no index then: reads search the B-tree). A resize
  /// of the map drops it (its pointers would be stale).
  std::shared_ptr<ValueIndex> value_index(MDB_txn* txn, size_t max_keys) const;
  /// data.mdb as it is now: a hash of its inode, size and ctime (0 when fstat
  /// fails). A writer's commit changes it, and so does a file copied over
  /// data.mdb in place, whatever transaction id that file repeats.
  uint64_t file_version() const noexcept;
  /// Drops the pages of the map wholly inside [p, p + n) from this process's
  /// map and from the page cache (madvise + posix_fadvise DONTNEED). Only
  /// for memory of the map, with a read transaction of this env held by the
  /// caller (the map cannot move meanwhile). Best effort: errors are ignored.
  void evict(const void* p, size_t n) const noexcept;
  /// data.mdb opened again with O_DIRECT (once, on first use; closed with the
  /// env), and the file offset of a pointer into the map: what cold reads of
  /// keep_cache=false readers read past the page cache with
  /// (detail/direct_io.h). -1 where the file system refuses O_DIRECT or the
  /// map was not found.
  int direct_fd() const;
  /// The file offset and length alignment reads of direct_fd() need
  /// (detail::direct_alignment; valid once direct_fd() returned one).
  uint32_t direct_align() const noexcept { return direct_align_; }
  /// The descriptor cold reads of keep_cache=true readers read with
  /// (buffered: the pages they read stay in the page cache); -1 when the map
  /// was not found.
  int buffered_fd() const noexcept { return map_bytes_ != 0 ? fd_ : -1; }
  uint64_t file_offset(const void* p) const noexcept {
    return static_cast<uint64_t>(static_cast<const char*>(p) - map_addr_);
  }
  /// Number of reader-table slots in use (mdb_reader_list), -1 without lock.
  int reader_count() const;
  /// Flushes to disk (mdb_env_sync force).
  void sync();
  /// The Writer of this file in this process: claim_writer() returns false
  /// when another Writer of this process holds it.
  bool claim_writer() noexcept { return !writer_.exchange(true); }
  void release_writer() noexcept { writer_.store(false); }
  /// True for the first caller only: a cold read asks the disk for the
  /// leaves of the samples table once per opened file (detail/tree_pages.h).
  bool claim_leaf_request() const noexcept { return !leaves_requested_.exchange(true); }
  /// Whether a fault on this env's map was contained (the file shrank or
  /// changed under it: fault_guard.h). Its reads are then refused
  /// (read_txn() throws CorruptedError) and the next Env::open() of the
  /// path retires it and opens the file anew.
  bool faulted() const noexcept { return faults_.load(std::memory_order_relaxed) != 0; }
  /// Throws CorruptedError naming the path when faulted().
  void check_intact() const {
    if (faulted()) throw_faulted();
  }
  /// Whether a Writer of this process holds the file.
  bool writer_claimed() const noexcept { return writer_.load(); }

 private:
  friend class ReadTxn;
  friend class WriteTxn;
  struct Opener;  // the steps of open() (env.cpp)
  Env() = default;
  void release(MDB_txn* txn) const noexcept;
  // The transaction gate (see the contract).
  void enter() const;
  void leave() const noexcept;
  void remap(size_t bytes) const;  // closes the gate, waits, remaps
  bool holds_txn() const noexcept;  // the calling thread holds a txn of this env
  [[noreturn]] void throw_faulted() const;
  // Closes the MDB_env for good once no transaction of it is live (a newer
  // file took its path, or a fault poisoned its map): later transactions
  // throw InvalidDatabaseError saying why. Called by open() under the
  // registry's lock.
  void retire(const std::string& why);

  detail::UniqueEnv env_{nullptr, detail::EnvCloser{0}};
  std::string path_;
  bool readonly_ = true;
  bool nolock_ = false;
  bool os_readahead_ = false;
  pid_t owner_ = 0;
  MDB_dbi samples_ = 0;
  MDB_dbi meta_ = 0;
  // The gate: `live_` transactions of this process; `resizing_` closed.
  // Its mutex also guards the pool of reset read txns.
  mutable std::mutex gate_mutex_;
  mutable std::vector<MDB_txn*> pool_;
  mutable std::condition_variable gate_cv_;
  mutable size_t live_ = 0;
  mutable bool resizing_ = false;
  // The map's address and the file's size (bytes) as last seen.
  const char* map_addr_ = nullptr;
  size_t map_bytes_ = 0;  // 0: the map was not found, values go unchecked
  mutable std::atomic<size_t> map_size_{0};
  mutable std::atomic<size_t> file_size_{0};
  int fd_ = -1;
  mutable std::once_flag direct_once_;
  mutable int direct_fd_ = -1;
  mutable uint32_t direct_align_ = 4096;
  std::pair<dev_t, ino_t> key_{};
  std::pair<dev_t, ino_t> lock_key_{};  // lock.mdb's (0, 0 without lock)
  mutable std::atomic<uint64_t> faults_{0};  // contained faults on the map (fault_guard.h)
  std::string retired_;                  // why, once retire() closed the env
  bool registered_ = false;
  std::atomic<bool> writer_{false};  // in the registry (false while open() builds it)
  mutable std::atomic<bool> leaves_requested_{false};
  // value_index(): the index of the newest snapshot seen (reset by remap(),
  // when no transaction is live).
  mutable std::mutex index_mutex_;
  mutable std::shared_ptr<ValueIndex> index_;
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
