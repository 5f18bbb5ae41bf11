#include "torch_lmdb/env.h"

#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <utility>

#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace {

constexpr size_t kDefaultMapSize = size_t{64} << 20;  // 64 MiB, grows by doubling

std::atomic<uint64_t> g_fork_generation{0};

// The registry of open envs. Its mutex is taken around fork() by the atfork
// handlers, so a child never inherits it locked; the child empties the map
// (without closing: the parent's handles are not the child's to close).
struct Registry {
  std::mutex mutex;
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
  detail::check_mdb(mdb_txn_begin(env.handle(), nullptr, 0, &txn_),
                    "mdb_txn_begin(write)", env.path());
}

void WriteTxn::commit() {
  MDB_txn* txn = txn_;
  txn_ = nullptr;  // lmdb.h: the handle is freed by commit, even on failure
  detail::check_mdb(mdb_txn_commit(txn), "mdb_txn_commit", env_->path());
}

void WriteTxn::abort() noexcept {
  if (txn_ != nullptr) {
    mdb_txn_abort(txn_);
    txn_ = nullptr;
  }
}

// ---- Env -------------------------------------------------------------------

std::shared_ptr<Env> Env::open(const std::string& path, const EnvOptions& options) {
  Registry& reg = registry();
  const auto warn = options.warn ? options.warn : default_warn;

  if (!options.readonly) {
    TORCH_CHECK_VALUE(make_dirs(path), "cannot create database directory '", path,
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
  if (options.readonly) {
    struct stat data {};
    if (::stat((path + "/data.mdb").c_str(), &data) != 0) {
      throw NotFoundError("no LMDB database at '" + path + "' (data.mdb is missing)",
                          ENOENT, path);
    }
  }

  std::lock_guard<std::mutex> guard(reg.mutex);
  const auto key = std::make_pair(st.st_dev, st.st_ino);
  auto it = reg.envs.find(key);
  if (it != reg.envs.end()) {
    if (auto existing = it->second.lock()) {
      if (!options.readonly && existing->readonly()) {
        throw InvalidDatabaseError(
            "'" + path +
                "' is already open read-only in this process (a dataset holds "
                "it); close the readers before writing to it",
            0, path);
      }
      if (options.lock == 1 && existing->nolock()) {
        throw LockError("'" + path +
                            "' is already open without locking in this process; lock=True "
                            "cannot be honoured until those readers are closed",
                        EACCES, path);
      }
      if (options.readonly && options.readahead != existing->readahead()) {
        // One environment per file and process (lmdb.h): its map keeps the
        // readahead it was opened with.
        warn("torch_lmdb: '" + path + "' is already open in this process with readahead " +
             (existing->readahead() ? "on" : "off") + "; readahead=" + (options.readahead ? "True" : "False") +
             " has no effect until those readers are closed");
      }
      return existing;
    }
  }

  const pid_t pid = ::getpid();
  std::shared_ptr<Env> env(new Env());
  env->path_ = path;
  env->readonly_ = options.readonly;
  env->owner_ = pid;

  bool nolock = options.lock == 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    MDB_env* raw = nullptr;
    detail::check_mdb(mdb_env_create(&raw), "mdb_env_create", path);
    detail::UniqueEnv handle(raw, detail::EnvCloser{pid});
    detail::check_mdb(mdb_env_set_maxreaders(raw, options.max_readers),
                      "mdb_env_set_maxreaders", path);
    detail::check_mdb(mdb_env_set_maxdbs(raw, 4), "mdb_env_set_maxdbs", path);
    if (!options.readonly) {
      detail::check_mdb(
          mdb_env_set_mapsize(raw, options.map_size ? options.map_size : kDefaultMapSize),
          "mdb_env_set_mapsize", path);
    }
    unsigned flags = MDB_NOTLS;
    if (options.readonly) flags |= MDB_RDONLY;
    else flags |= MDB_NOMETASYNC;  // a system crash may lose the last commit, never integrity
    if (!options.readahead) flags |= MDB_NORDAHEAD;
    if (nolock) flags |= MDB_NOLOCK;
    const int rc = mdb_env_open(raw, path.c_str(), flags, 0644);
    if (rc == 0) {
      env->env_ = std::move(handle);
      break;
    }
    // lmdb.h: after a failed mdb_env_open the handle must be closed (done by
    // UniqueEnv). Read-only directory or filesystem: retry without the lock
    // file when the caller allowed it.
    if (options.readonly && options.lock == -1 && !nolock && (rc == EACCES || rc == EROFS)) {
      warn("torch_lmdb: cannot create or open the lock file of '" + path +
           "' (" + mdb_strerror(rc) +
           "); opening without locking (lock=False). This is only safe if no "
           "process writes to this database while it is read.");
      nolock = true;
      continue;
    }
    detail::throw_mdb(rc, "mdb_env_open", path, "");
  }
  env->nolock_ = nolock;
  env->readahead_ = options.readahead;

  if (!nolock) {
    int dead = 0;  // reclaim reader slots of killed processes
    detail::check_mdb(mdb_reader_check(env->handle(), &dead), "mdb_reader_check", path);
  }

  // Named databases. lmdb.h: a handle opened in a txn is private to it until
  // that txn commits, so commit even the read-only one.
  MDB_txn* txn = nullptr;
  detail::check_mdb(
      mdb_txn_begin(env->handle(), nullptr, options.readonly ? MDB_RDONLY : 0, &txn),
      "mdb_txn_begin", path);
  const unsigned dbi_flags = options.readonly ? 0 : MDB_CREATE;
  int rc = mdb_dbi_open(txn, "samples", dbi_flags, &env->samples_);
  if (rc == 0) rc = mdb_set_compare(txn, env->samples_, compare_sample_keys);
  if (rc == 0) rc = mdb_dbi_open(txn, "meta", dbi_flags, &env->meta_);
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
  detail::check_mdb(mdb_txn_commit(txn), "mdb_txn_commit", path);

  reg.envs[key] = env;
  return env;
}

Env::~Env() {
  if (::getpid() != owner_) {
    // Forked child: the parent's handles are not ours; leak them (lmdb.h).
    (void)env_.release();
    return;
  }
  for (MDB_txn* txn : pool_) mdb_txn_abort(txn);
}

ReadTxn Env::read_txn() const {
  MDB_txn* txn = nullptr;
  {
    std::lock_guard<std::mutex> guard(pool_mutex_);
    if (!pool_.empty()) {
      txn = pool_.back();
      pool_.pop_back();
    }
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    int rc = txn != nullptr ? mdb_txn_renew(txn)
                            : mdb_txn_begin(env_.get(), nullptr, MDB_RDONLY, &txn);
    if (rc == 0) return ReadTxn(this, txn);
    if (rc == MDB_MAP_RESIZED && attempt == 0) {
      // Another process grew the map: adopt its size (lmdb.h mdb_env_set_mapsize).
      std::lock_guard<std::mutex> guard(resize_mutex_);
      mdb_env_set_mapsize(env_.get(), 0);
      continue;
    }
    if (txn != nullptr && rc != 0) {
      mdb_txn_abort(txn);
      txn = nullptr;
    }
    if (rc == MDB_READERS_FULL && !nolock_) {
      int dead = 0;
      mdb_reader_check(env_.get(), &dead);
      if (dead > 0 && attempt == 0) continue;
    }
    detail::throw_mdb(rc, "mdb_txn_begin(read)", path_, "");
  }
  detail::throw_mdb(MDB_MAP_RESIZED, "mdb_txn_begin(read)", path_, "");
}

void Env::release(MDB_txn* txn) const noexcept {
  if (::getpid() != owner_) return;  // never touch a parent's txn
  mdb_txn_reset(txn);
  std::lock_guard<std::mutex> guard(pool_mutex_);
  pool_.push_back(txn);
}

size_t Env::map_size() const {
  MDB_envinfo info{};
  detail::check_mdb(mdb_env_info(env_.get(), &info), "mdb_env_info", path_);
  return info.me_mapsize;
}

void Env::set_map_size(size_t bytes) {
  std::lock_guard<std::mutex> guard(resize_mutex_);
  detail::check_mdb(mdb_env_set_mapsize(env_.get(), bytes), "mdb_env_set_mapsize", path_,
                    "new size " + std::to_string(bytes));
}

int Env::reader_count() const {
  if (nolock_) return -1;
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
