#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/fault_guard.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <utility>

#include "torch_lmdb/detail/env_files.h"
#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace {

constexpr size_t kDefaultMapSize = size_t{64} << 20;  // 64 MiB, grows by doubling
constexpr size_t kMinMapSize = size_t{64} << 10;      // smaller requests are raised to this
// Readers map at least this much, and at least twice the file: a writer in
// another process then rarely grows the file past the reader's map (each
// time it does, the reader remaps once, as a resize).
constexpr size_t kMinReaderMap = size_t{8} << 20;
// Retries of MDB_MAP_RESIZED (another process grew the map again while we
// adopted its size) before giving up.
constexpr int kResizeRetries = 1000;

std::atomic<uint64_t> g_fork_generation{0};

// The registry of open envs, keyed by data.mdb's device+inode. Envs are
// opened and closed under its mutex; an entry whose Env is being destroyed
// (expired weak_ptr) stays until its handle is closed, and an open of the
// same file waits for that (`closed`). The mutex is taken around fork() by
// the atfork handlers, so a child never inherits it locked; the child
// empties the map (without closing: the parent's handles are not the
// child's to close).
struct Registry {
  std::mutex mutex;
  std::condition_variable closed;
  std::map<std::pair<dev_t, ino_t>, std::weak_ptr<Env>> envs;
};

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry();  // leaked on purpose: used from atfork handlers
    pthread_atfork([] { registry().mutex.lock(); },
                   [] { registry().mutex.unlock(); },
                   [] {
                     Registry& self = registry();
                     // weak_ptrs only: dropping them closes nothing.
                     self.envs.clear();
                     g_fork_generation.fetch_add(1, std::memory_order_acq_rel);
                     self.mutex.unlock();
                   });
    return reg;
  }();
  return *r;
}

// Transactions the calling thread holds, per env (for Env::holds_txn).
thread_local std::vector<std::pair<const Env*, int>> t_held;

void note_held(const Env* env, int delta) noexcept {
  for (auto& e : t_held) {
    if (e.first == env) {
      e.second += delta;
      return;
    }
  }
  if (delta > 0) t_held.emplace_back(env, delta);
}

// MDB_READERS_FULL with the table's size in force (the lock file's, fixed by
// the first process that opened the database) and what to do about it.
[[noreturn]] void throw_readers_full(MDB_env* env, const std::string& path) {
  unsigned slots = 0;
  mdb_env_get_maxreaders(env, &slots);
  throw ReadersFullError("mdb_txn_begin(read) failed: MDB_READERS_FULL at '" + path + "': all " +
                             std::to_string(slots) + " reader slots (max_readers=" + std::to_string(slots) +
                             ") of its lock file are in use by live threads and processes. The table's size is "
                             "fixed by the first process that opens the database; to change it, stop every "
                             "process using it and open it again with another max_readers, or use fewer workers",
                         MDB_READERS_FULL, path);
}

void default_warn(const std::string& msg) { TORCH_WARN(msg); }

// The order of LMDB's default comparator (memcmp, then the shorter key first),
// with the 8-byte big-endian sample keys compared as two integers instead of a
// memcmp call. The order is identical, so the tree stays the one any other
// LMDB program (py-lmdb, mdb_dump) reads and writes with the default. LMDB's
// memcmp calls were about 13 % of the time of tiny random reads.
int compare_sample_keys(const MDB_val* a, const MDB_val* b) {
  if (a->mv_size == 8 && b->mv_size == 8) {
    const uint64_t x = decode_key(static_cast<const unsigned char*>(a->mv_data));
    const uint64_t y = decode_key(static_cast<const unsigned char*>(b->mv_data));
    return (x > y) - (x < y);
  }
  const size_t n = std::min(a->mv_size, b->mv_size);
  const int diff = n ? std::memcmp(a->mv_data, b->mv_data, n) : 0;
  if (diff) return diff;
  return (a->mv_size > b->mv_size) - (a->mv_size < b->mv_size);
}

}  // namespace

uint64_t fork_generation() noexcept {
  registry();  // make sure the atfork handlers are installed
  return g_fork_generation.load(std::memory_order_acquire);
}

namespace detail {

void EnvCloser::operator()(MDB_env* e) const noexcept {
  // lmdb.h: an env must not be used or closed in a forked child.
  if (e != nullptr && ::getpid() == owner) mdb_env_close(e);
}
}  // namespace detail

// ---- ReadTxn ---------------------------------------------------------------

ReadTxn::ReadTxn(ReadTxn&& other) noexcept : env_(other.env_), txn_(other.txn_) {
  other.txn_ = nullptr;
}

ReadTxn& ReadTxn::operator=(ReadTxn&& other) noexcept {
  if (this != &other) {
    if (txn_ != nullptr) env_->release(txn_);
    env_ = other.env_;
    txn_ = other.txn_;
    other.txn_ = nullptr;
  }
  return *this;
}

ReadTxn::~ReadTxn() {
  if (txn_ != nullptr) env_->release(txn_);
}

// ---- WriteTxn --------------------------------------------------------------

WriteTxn::WriteTxn(Env& env) : env_(&env) {
  env.enter();
  const int rc = mdb_txn_begin(env.handle(), nullptr, 0, &txn_);
  if (rc != 0) {
    txn_ = nullptr;
    env.leave();
    detail::throw_mdb(rc, "mdb_txn_begin(write)", env.path(), "");
  }
}

void WriteTxn::commit() {
  MDB_txn* txn = txn_;
  txn_ = nullptr;  // lmdb.h: the handle is freed by commit, even on failure
  int rc = mdb_txn_commit(txn);
  env_->leave();
  if (rc == EIO) {
    // LMDB reports a short write(2) as EIO; on a full filesystem that is ENOSPC.
    struct statvfs vfs {};
    if (::statvfs(env_->path().c_str(), &vfs) == 0 &&
        static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize < (uint64_t{1} << 20))
      rc = ENOSPC;
  }
  detail::check_mdb(rc, "mdb_txn_commit", env_->path());
}

void WriteTxn::abort() noexcept {
  if (txn_ != nullptr) {
    mdb_txn_abort(txn_);
    txn_ = nullptr;
    env_->leave();
  }
}

// ---- Env -------------------------------------------------------------------

void Env::throw_faulted() const {
  throw CorruptedError("'" + path_ + "/data.mdb' changed while it was mapped (truncated, or overwritten in "
                           "place): a read touched a page the file no longer holds. Reads of it are refused "
                           "until it is opened again (refresh() or a new dataset); if nobody replaced the file, "
                           "run `torch-lmdb verify`",
                       MDB_CORRUPTED, path_);
}

void Env::retire(const std::string& why) {
  TORCH_CHECK(!holds_txn(), "torch_lmdb: cannot reopen '", path_, "' on a thread that holds one of its transactions");
  if (writer_claimed())
    throw LockError("'" + path_ + "' must be opened anew (" + why + ") but a Writer of this process holds the "
                        "old file; close it first",
                    EBUSY, path_);
  std::unique_lock<std::mutex> lock(gate_mutex_);
  gate_cv_.wait(lock, [this] { return !resizing_; });
  resizing_ = true;  // new transactions wait, then find the env retired
  gate_cv_.wait(lock, [this] { return live_ == 0; });
  for (MDB_txn* txn : pool_) mdb_txn_abort(txn);
  pool_.clear();
  {
    std::lock_guard<std::mutex> index_lock(index_mutex_);
    index_.reset();
  }
  if (map_bytes_ != 0) detail::unregister_map(map_addr_);
  map_bytes_ = 0;
  env_.reset();  // mdb_env_close: its fcntl locks go before another env takes the lock file
  retired_ = "'" + path_ + "' was opened anew in this process (" + why +
             "); this handle's snapshot is gone: use the dataset's refresh() or a new reader";
  resizing_ = false;
  lock.unlock();
  gate_cv_.notify_all();
}

// ---- Env::open, step by step -----------------------------------------------

namespace {

using Key = std::pair<dev_t, ino_t>;
using Mappings = std::vector<std::pair<uintptr_t, size_t>>;

// `path` is a database directory (made first for a writer); returns
// data.mdb's stat, zeroed when a writer's new database has none yet.
struct stat check_directory(const std::string& path, const std::string& data_path, const EnvOptions& options,
                            bool* exists) {
  if (!options.readonly) {
    TORCH_CHECK_VALUE(detail::make_dirs(path), "cannot create database directory '", path,
                      "': ", std::strerror(errno));
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    detail::throw_mdb(errno, "open", path, "");
  }
  if (!S_ISDIR(st.st_mode)) {
    throw InvalidDatabaseError("'" + path +
                                   "' is not a torch_lmdb database directory "
                                   "(expected a directory holding data.mdb)",
                               0, path);
  }
  struct stat data {};
  *exists = ::stat(data_path.c_str(), &data) == 0;
  if (!*exists && options.readonly) {
    throw NotFoundError("no LMDB database at '" + path + "' (data.mdb is missing)", ENOENT, path);
  }
  if (options.readonly && data.st_size == 0) {
    throw InvalidDatabaseError("'" + path + "' holds an empty data.mdb (a writer that never committed?)", 0,
                               path);
  }
  return data;
}

// The env of `key` this process has open, if any; waits while its last
// holder closes it (then there is none).
std::shared_ptr<Env> find_registered(Registry& reg, std::unique_lock<std::mutex>& guard, const Key& key) {
  for (;;) {
    if (key.second == 0) return nullptr;  // a new database: nothing to find
    auto it = reg.envs.find(key);
    if (it == reg.envs.end()) return nullptr;
    std::shared_ptr<Env> existing = it->second.lock();
    if (existing) return existing;
    reg.closed.wait(guard);  // its last holder is closing it: wait, then open anew
  }
}

// An env already open in this process serves this open too, if its flags allow.
void check_shared(Env& existing, const std::string& path, const EnvOptions& options,
                  const std::function<void(const std::string&)>& warn) {
  if (!options.readonly && (existing.readonly() || existing.nolock())) {
    throw InvalidDatabaseError(
        "'" + path + "' is open " + (existing.nolock() ? "without locking" : "read-only (MDB_RDONLY)") +
            " in this process (a dataset opened it that way); a Writer cannot share that environment: "
            "close those datasets first, or open them with lock=None on writable storage",
        0, path);
  }
  if (options.lock == 1 && existing.nolock()) {
    throw LockError("'" + path +
                        "' is already open without locking in this process; lock=True "
                        "cannot be honoured until those readers are closed",
                    EACCES, path);
  }
  if (!options.readonly) {
    // A reader opened it: the writer's durability settings (see env_flags).
    detail::check_mdb(mdb_env_set_flags(existing.handle(), MDB_NOMETASYNC, 1), "mdb_env_set_flags", path);
  }
  if (options.readonly && options.os_readahead != existing.os_readahead()) {
    // One environment per file and process (lmdb.h): its map keeps the
    // OS readahead it was opened with. (The message keeps the words of
    // releases before os_readahead, which tests match.)
    warn("torch_lmdb: '" + path + "' is already open in this process with readahead " +
         (existing.os_readahead() ? "on" : "off") + "; readahead=" + (options.os_readahead ? "True" : "False") +
         " has no effect until those readers are closed (os_readahead, the OS readahead of the file)");
  }
}

// Whether to open without locking and with MDB_RDONLY. Readers open
// read-write where they may, so a Writer of this process can share the env;
// MDB_RDONLY on read-only files and filesystems, and without a lock file.
struct Locking {
  bool nolock;
  bool rdonly;
};

Locking choose_locking(const std::string& path, const std::string& data_path, const EnvOptions& options,
                       const std::function<void(const std::string&)>& warn) {
  Locking out{options.lock == 0,
              options.readonly && (::access(data_path.c_str(), W_OK) != 0 || detail::filesystem_readonly(path))};
  if (out.nolock) return out;
  const int rc = detail::preallocate_lock_file(path, options.max_readers);
  if (rc == 0) return out;
  if (options.readonly && options.lock == -1 && (rc == EACCES || rc == EROFS || rc == EPERM)) {
    warn("torch_lmdb: cannot create or open the lock file of '" + path + "' (" + std::strerror(rc) +
         "); opening without locking (lock=False). This is only safe if no "
         "process writes to this database while it is read.");
    return Locking{true, true};
  }
  detail::throw_mdb(rc, "open(lock.mdb)", path, "");
}

// A new MDB_env with its reader table, named databases and map size set.
detail::UniqueEnv create_handle(const std::string& path, const EnvOptions& options, size_t file_size, pid_t pid) {
  detail::UniqueEnv handle(nullptr, detail::EnvCloser{pid});
  {
    MDB_env* raw = nullptr;
    detail::check_mdb(mdb_env_create(&raw), "mdb_env_create", path);
    handle.reset(raw);
  }
  MDB_env* raw = handle.get();
  detail::check_mdb(mdb_env_set_maxreaders(raw, options.max_readers), "mdb_env_set_maxreaders", path);
  detail::check_mdb(mdb_env_set_maxdbs(raw, 4), "mdb_env_set_maxdbs", path);
  if (!options.readonly) {
    const size_t requested = options.map_size ? std::max(options.map_size, kMinMapSize) : kDefaultMapSize;
    detail::check_mdb(mdb_env_set_mapsize(raw, requested), "mdb_env_set_mapsize", path);
  } else {
    const size_t want = std::max(kMinReaderMap, (2 * file_size + (size_t{1} << 20) - 1) >> 20 << 20);
    detail::check_mdb(mdb_env_set_mapsize(raw, want), "mdb_env_set_mapsize", path);
  }
  return handle;
}

unsigned env_flags(const EnvOptions& options, Locking locking) {
  unsigned flags = MDB_NOTLS;
  if (locking.rdonly) flags |= MDB_RDONLY;
  if (!options.readonly) flags |= MDB_NOMETASYNC;  // a system crash may lose the last commit, never integrity
  if (!options.os_readahead) flags |= MDB_NORDAHEAD;
  if (locking.nolock) flags |= MDB_NOLOCK;
  return flags;
}

// mdb_env_open, after the meta-page check of an existing file; sets `key`
// for a database it created, and returns this process's mappings of
// data.mdb before and after (to find LMDB's map among them).
std::pair<Mappings, Mappings> open_handle(MDB_env* raw, const std::string& path, unsigned flags,
                                          const struct stat& data, bool exists, Key& key) {
  if (exists && data.st_size > 0) detail::check_meta_pages(path + "/data.mdb", path);
  Mappings before = key.second != 0 ? detail::mappings_of(key) : Mappings{};
  const int rc = mdb_env_open(raw, path.c_str(), flags, 0644);
  if (rc != 0) detail::throw_mdb(rc, "mdb_env_open", path, "");
  if (key.second == 0) {
    int fd = -1;
    struct stat created {};
    detail::check_mdb(mdb_env_get_fd(raw, &fd), "mdb_env_get_fd", path);
    if (::fstat(fd, &created) != 0) detail::throw_mdb(errno, "fstat(data.mdb)", path, "");
    key = std::make_pair(created.st_dev, created.st_ino);
  }
  Mappings after = detail::mappings_of(key);
  mdb_env_set_assert(raw, detail::on_lmdb_assert);
  return {std::move(before), std::move(after)};
}

// The named databases. lmdb.h: a handle opened in a txn is private to it
// until that txn commits, so commit even the read-only one.
void open_tables(MDB_env* raw, const std::string& path, bool readonly, MDB_dbi* samples, MDB_dbi* meta) {
  MDB_txn* txn = nullptr;
  int rc = mdb_txn_begin(raw, nullptr, readonly ? MDB_RDONLY : 0, &txn);
  if (rc == MDB_READERS_FULL) throw_readers_full(raw, path);
  detail::check_mdb(rc, "mdb_txn_begin", path);
  const unsigned dbi_flags = readonly ? 0 : MDB_CREATE;
  rc = mdb_dbi_open(txn, "samples", dbi_flags, samples);
  if (rc == 0) rc = mdb_set_compare(txn, *samples, compare_sample_keys);
  if (rc == 0) rc = mdb_dbi_open(txn, "meta", dbi_flags, meta);
  if (rc != 0) {
    mdb_txn_abort(txn);
    if (rc == MDB_NOTFOUND) {
      throw InvalidDatabaseError("'" + path +
                                     "' is an LMDB database but not a torch_lmdb one "
                                     "(no 'samples'/'meta' tables); convert it with "
                                     "`torch-lmdb convert`",
                                 rc, path);
    }
    detail::throw_mdb(rc, "mdb_dbi_open", path, "");
  }
  rc = mdb_txn_commit(txn);
  if (rc != 0) detail::throw_mdb(rc, "mdb_txn_commit", path, "");
}

}  // namespace

// The steps of Env::open that set or retire an Env's private members.
struct Env::Opener {
  // A poisoned map (fault_guard.h) is not reused: the file is opened anew.
  static void retire_poisoned(Registry& reg, std::shared_ptr<Env>& existing,
                              std::vector<std::shared_ptr<Env>>& retired) {
    if (!existing || !existing->faulted()) return;
    existing->retire("its map was poisoned by a fault");
    reg.envs.erase(existing->key_);
    retired.push_back(std::move(existing));
    existing.reset();
  }

  // Another data.mdb now at this path (published by rename, as mv and rsync
  // do): the old file's env shares the lock file, and a second env on one
  // lock file in one process would reinitialise its reader table under the
  // first (MDB_BAD_RSLOT): the old env is closed first.
  static void retire_replaced(Registry& reg, const std::string& path, const Key& key,
                              std::vector<std::shared_ptr<Env>>& retired) {
    struct stat lock_file {};
    if (::stat((path + "/lock.mdb").c_str(), &lock_file) != 0) return;
    const auto lock_key = std::make_pair(lock_file.st_dev, lock_file.st_ino);
    for (auto it = reg.envs.begin(); it != reg.envs.end();) {
      std::shared_ptr<Env> other = it->second.lock();
      if (other && other->lock_key_ == lock_key && other->key_ != key && other->env_ != nullptr) {
        other->retire("its data.mdb was replaced by another file");
        it = reg.envs.erase(it);
        retired.push_back(std::move(other));
      } else {
        ++it;
      }
    }
  }

  // Damage: the data file must hold every page the meta page counts, or the
  // first read of a missing page is a SIGBUS. (Read before any transaction:
  // mdb_env_info reads the meta pages only.) Then the map is registered with
  // the fault guard.
  static void check_pages_and_map(Env& env, const Mappings& before, const Mappings& after) {
    MDB_env* raw = env.env_.get();
    const std::string& path = env.path_;
    MDB_envinfo info{};
    MDB_stat stat{};
    detail::check_mdb(mdb_env_info(raw, &info), "mdb_env_info", path);
    detail::check_mdb(mdb_env_stat(raw, &stat), "mdb_env_stat", path);
    struct stat now {};
    if (::fstat(env.fd_, &now) != 0) detail::throw_mdb(errno, "fstat(data.mdb)", path, "");
    const size_t needed = (static_cast<size_t>(info.me_last_pgno) + 1) * stat.ms_psize;
    if (static_cast<size_t>(now.st_size) < needed) {
      throw CorruptedError("'" + path + "/data.mdb' is damaged: it has " + std::to_string(now.st_size) +
                               " bytes but its meta page counts " + std::to_string(info.me_last_pgno + 1) +
                               " pages of " + std::to_string(stat.ms_psize) + " bytes (" + std::to_string(needed) +
                               "); the file was truncated or its meta page is corrupt: run `torch-lmdb verify` "
                               "and rebuild it from the source data",
                           MDB_CORRUPTED, path);
    }
    env.file_size_.store(static_cast<size_t>(now.st_size));
    env.map_bytes_ = info.me_mapsize;
    env.map_size_.store(info.me_mapsize, std::memory_order_release);
    env.map_addr_ = detail::find_map(before, after, info.me_mapsize);
    if (env.map_addr_ == nullptr) env.map_bytes_ = 0;  // not found: values go unchecked
    detail::install_fault_handler();
    if (env.map_bytes_ != 0) detail::register_map(env.map_addr_, env.map_bytes_, &env.faults_);
  }

  // The lock file's key (to tell a replaced data.mdb), and reader slots of
  // killed processes reclaimed.
  static void adopt_lock_file(Env& env) {
    if (env.nolock_) return;
    struct stat lock_stat {};
    if (::stat((env.path_ + "/lock.mdb").c_str(), &lock_stat) == 0)
      env.lock_key_ = std::make_pair(lock_stat.st_dev, lock_stat.st_ino);
    int dead = 0;
    detail::check_mdb(mdb_reader_check(env.env_.get(), &dead), "mdb_reader_check", env.path_);
  }
};

std::shared_ptr<Env> Env::open(const std::string& path, const EnvOptions& options) {
  Registry& reg = registry();
  const auto warn = options.warn ? options.warn : default_warn;
  const std::string data_path = path + "/data.mdb";
  // The registry's key is data.mdb's inode. A writer's new database has no
  // data.mdb yet: no env of it can be open, and the key is taken after
  // mdb_env_open creates the file (under the registry's lock, so a
  // concurrent open of the same path waits and then finds it).
  bool exists = false;
  struct stat data = check_directory(path, data_path, options, &exists);

  std::shared_ptr<Env> existing;  // destroyed after the guard below is released
  std::vector<std::shared_ptr<Env>> retired;  // (likewise)
  std::unique_lock<std::mutex> guard(reg.mutex);
  auto key = std::make_pair(data.st_dev, data.st_ino);
  if (!exists && ::stat(data_path.c_str(), &data) == 0) key = std::make_pair(data.st_dev, data.st_ino);
  existing = find_registered(reg, guard, key);
  Opener::retire_poisoned(reg, existing, retired);
  if (!existing) Opener::retire_replaced(reg, path, key, retired);
  if (existing) {
    check_shared(*existing, path, options, warn);
    return existing;
  }

  const pid_t pid = ::getpid();
  const Locking locking = choose_locking(path, data_path, options, warn);
  detail::UniqueEnv handle = create_handle(path, options, static_cast<size_t>(data.st_size), pid);
  MDB_env* raw = handle.get();
  const auto maps = open_handle(raw, path, env_flags(options, locking), data, exists, key);

  std::shared_ptr<Env> env(new Env());
  env->path_ = path;
  env->readonly_ = locking.rdonly;
  env->owner_ = pid;
  env->nolock_ = locking.nolock;
  env->os_readahead_ = options.os_readahead;
  env->key_ = key;
  env->env_ = std::move(handle);
  detail::check_mdb(mdb_env_get_fd(raw, &env->fd_), "mdb_env_get_fd", path);
  Opener::check_pages_and_map(*env, maps.first, maps.second);
  Opener::adopt_lock_file(*env);
  open_tables(raw, path, options.readonly, &env->samples_, &env->meta_);

  reg.envs[key] = env;
  env->registered_ = true;
  return env;
}

Env::~Env() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (::getpid() != owner_) {
    // Forked child: the parent's handles are not ours; leak them (lmdb.h).
    (void)env_.release();
    return;
  }
  if (!registered_) {
    // Failed inside open(), which holds the registry's lock.
    for (MDB_txn* txn : pool_) mdb_txn_abort(txn);
    return;
  }
  Registry& reg = registry();
  std::lock_guard<std::mutex> guard(reg.mutex);
  for (MDB_txn* txn : pool_) mdb_txn_abort(txn);
  pool_.clear();
  if (map_bytes_ != 0) detail::unregister_map(map_addr_);
  env_.reset();  // mdb_env_close, under the registry's lock
  auto it = reg.envs.find(key_);
  if (it != reg.envs.end() && it->second.expired()) reg.envs.erase(it);
  reg.closed.notify_all();
}

void Env::enter() const {
  // A thread that already holds a transaction of this env does not wait for
  // a pending resize: the resize waits for that transaction.
  const bool held = holds_txn();
  std::unique_lock<std::mutex> lock(gate_mutex_);
  gate_cv_.wait(lock, [this, held] { return held || !resizing_; });
  if (!retired_.empty()) throw InvalidDatabaseError(retired_, 0, path_);
  ++live_;
  note_held(this, 1);
}

void Env::leave() const noexcept {
  {
    std::lock_guard<std::mutex> lock(gate_mutex_);
    --live_;
  }
  note_held(this, -1);
  gate_cv_.notify_all();
}

bool Env::holds_txn() const noexcept {
  for (const auto& e : t_held)
    if (e.first == this) return e.second > 0;
  return false;
}

void Env::remap(size_t bytes) const {
  TORCH_CHECK(!holds_txn(), "torch_lmdb: cannot resize the map of '", path_,
              "' on a thread that holds one of its transactions");
  std::unique_lock<std::mutex> lock(gate_mutex_);
  // One resize at a time; new transactions wait from now on.
  gate_cv_.wait(lock, [this] { return !resizing_; });
  resizing_ = true;
  gate_cv_.wait(lock, [this] { return live_ == 0; });
  // lmdb.h: no transaction of this process is active now.
  const auto maps_before = detail::mappings_of(key_);
  {
    std::lock_guard<std::mutex> index_lock(index_mutex_);
    index_.reset();  // its pointers are into the old map
  }
  if (!retired_.empty()) {
    resizing_ = false;
    lock.unlock();
    gate_cv_.notify_all();
    throw InvalidDatabaseError(retired_, 0, path_);
  }
  if (map_bytes_ != 0) detail::unregister_map(map_addr_);
  const int rc = mdb_env_set_mapsize(env_.get(), bytes);
  MDB_envinfo info{};
  Env* self = const_cast<Env*>(this);
  self->map_bytes_ = 0;
  if (rc == 0 && mdb_env_info(env_.get(), &info) == 0) {
    self->map_size_.store(info.me_mapsize, std::memory_order_release);
    self->map_addr_ = detail::find_map(maps_before, detail::mappings_of(key_), info.me_mapsize);
    self->map_bytes_ = self->map_addr_ != nullptr ? info.me_mapsize : 0;
  }
  if (map_bytes_ != 0) detail::register_map(map_addr_, map_bytes_, &faults_);
  resizing_ = false;
  lock.unlock();
  gate_cv_.notify_all();
  detail::check_mdb(rc, "mdb_env_set_mapsize", path_, "new size " + std::to_string(bytes));
}

ReadTxn Env::read_txn() const {
  for (int attempt = 0;; ++attempt) {
    MDB_txn* txn = nullptr;
    {
      const bool held = holds_txn();  // (as in enter())
      std::unique_lock<std::mutex> lock(gate_mutex_);
      gate_cv_.wait(lock, [this, held] { return held || !resizing_; });
      if (!retired_.empty()) throw InvalidDatabaseError(retired_, 0, path_);
      if (faulted()) {
        lock.unlock();
        throw_faulted();
      }
      ++live_;
      if (!pool_.empty()) {
        txn = pool_.back();
        pool_.pop_back();
      }
    }
    note_held(this, 1);
    int rc = txn != nullptr ? mdb_txn_renew(txn) : mdb_txn_begin(env_.get(), nullptr, MDB_RDONLY, &txn);
    if (rc == 0) {
      // The samples table's root, searched now under the fault guard: a
      // file changed under the map (its meta or root page lost) fails here
      // instead of inside a later, unguarded LMDB call.
      MDB_stat st{};
      const int found = detail::guarded_stat(txn, samples_, &st);
      if (found == MDB_SUCCESS || found == MDB_NOTFOUND) return ReadTxn(this, txn);
      ReadTxn doomed(this, txn);  // (returned to the pool, reset)
      if (faulted()) throw_faulted();
      detail::throw_mdb(found, "mdb_stat(samples)", path_, "");
    }
    if (txn != nullptr) mdb_txn_abort(txn);  // (a failed begin leaves txn unset)
    leave();
    if (rc == MDB_MAP_RESIZED && attempt < kResizeRetries && !holds_txn()) {
      // Another process grew the map past ours: adopt its size (lmdb.h
      // mdb_env_set_mapsize with 0), as a resize, then try again.
      remap(0);
      continue;
    }
    if (rc == MDB_READERS_FULL && !nolock_ && attempt == 0) {
      int dead = 0;
      mdb_reader_check(env_.get(), &dead);  // slots of killed processes
      if (dead > 0) continue;
    }
    if (rc == MDB_READERS_FULL) throw_readers_full(env_.get(), path_);
    detail::throw_mdb(rc, "mdb_txn_begin(read)", path_, "");
  }
}

void Env::release(MDB_txn* txn) const noexcept {
  if (::getpid() != owner_) return;  // never touch a parent's txn
  mdb_txn_reset(txn);
  {
    std::lock_guard<std::mutex> guard(gate_mutex_);
    pool_.push_back(txn);
    --live_;
  }
  note_held(this, -1);
  gate_cv_.notify_all();
}

size_t Env::map_size() const {
  // Kept by open() and remap(): mdb_env_info reads the meta page through the
  // map, which a concurrent remap may be replacing.
  return map_size_.load(std::memory_order_acquire);
}

void Env::set_map_size(size_t bytes) { remap(bytes); }

int Env::reader_count() const {
  if (nolock_ || env_ == nullptr) return -1;
  int count = 0;
  auto cb = [](const char* msg, void* ctx) -> int {
    // One line per reader after a header line ("    pid     thread     txnid").
    if (std::strstr(msg, "pid") == nullptr && std::strstr(msg, "(no active readers)") == nullptr)
      ++*static_cast<int*>(ctx);
    return 0;
  };
  mdb_reader_list(env_.get(), cb, &count);
  return count;
}

void Env::sync() {
  detail::check_mdb(mdb_env_sync(env_.get(), 1), "mdb_env_sync", path_);
}

}  // namespace torch_lmdb
