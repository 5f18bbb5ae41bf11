#include "torch_lmdb/detail/stage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>

#include <nlohmann/json.hpp>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "torch_lmdb/detail/env_files.h"
#include "torch_lmdb/detail/fetch.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace detail {

namespace {

using Clock = std::chrono::steady_clock;
// Shards are fetched in parts of at least this many bytes, at most kMaxParts,
// `transfers` at a time: small parts keep every connection busy to the end.
constexpr uint64_t kMinPart = uint64_t{2} << 20;
constexpr uint64_t kMaxParts = 16;

int open_lock_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    throw LockError("cannot open the cache's lock file '" + path + "': " + std::strerror(errno), errno, path);
  return fd;
}

void flock_or_throw(int fd, int op, const std::string& path) {
  while (::flock(fd, op) != 0) {
    if (errno == EINTR) continue;
    throw LockError("cannot lock '" + path + "': " + std::strerror(errno), errno, path);
  }
}

// cache_dir/.space.lock, locked (`op`). Every change to what the cache holds (a reservation, its rename
// into place, an eviction) is made under it: a walk under it sees one moment of the cache.
int lock_space(const std::string& cache_dir, int op) {
  const std::string path = join(cache_dir, ".space.lock");
  Fd lock(open_lock_file(path));
  flock_or_throw(lock.fd, op, path);
  return lock.release();
}

bool file_size(const std::string& path, uint64_t& size) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  size = static_cast<uint64_t>(st.st_size);
  return true;
}

bool read_small_file(const std::string& path, std::string& out, size_t limit) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) return false;
  out.clear();
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > limit) return false;
  }
}

// Writes `text` to `path` through a temporary and a rename (readers never see
// a partial file).
void write_file_atomic(const std::string& path, const std::string& text) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + hex16(rng());  // unique per writer
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.fd < 0) throw Error("cannot write '" + tmp + "': " + std::strerror(errno), errno, tmp);
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t n = ::write(fd.fd, text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        if (err == ENOSPC) throw DiskFullError("no space left for '" + path + "'", err, path);
        throw Error("cannot write '" + tmp + "': " + std::strerror(err), err, tmp);
      }
      done += static_cast<size_t>(n);
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error("cannot rename '" + tmp + "': " + std::strerror(err), err, path);
  }
}

void touch(int fd) { ::futimens(fd, nullptr); }

bool is_hex16(const std::string& s) {
  return s.size() == 16 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

bool safe_relative(const std::string& rel) {
  if (rel.empty() || rel[0] == '/') return false;
  for (size_t pos = 0; pos <= rel.size();) {
    const size_t end = std::min(rel.find('/', pos), rel.size());
    const std::string part = rel.substr(pos, end - pos);
    if (part == ".." || part == "." || part.empty() || part[0] == '.') return false;  // no hidden names either
    pos = end + 1;
  }
  return true;
}

// Staged and downloading bytes under `dir`, and the shards that may be
// evicted (path of data.mdb, its .use.lock, last use). Temporaries whose
// process died are removed on the way.
struct Evictable {
  std::string data, use_lock, stamp, ahead;
  uint64_t size = 0;
  double last_use = 0;
  bool fetched_ahead = false;  // staged by a prefetch and not read since
};

void scan(const std::string& dir, int depth, uint64_t& used, std::vector<Evictable>& out, bool clean) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) names.emplace_back(e->d_name);
  ::closedir(d);
  for (const std::string& name : names) {
    if (name == "." || name == "..") continue;
    const std::string p = join(dir, name);
    struct stat st;
    if (::lstat(p.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      if (depth < 8) scan(p, depth + 1, used, out, clean);
      continue;
    }
    if (!S_ISREG(st.st_mode)) continue;
    if (name.rfind(".tmp-", 0) == 0) {  // a download: live (flocked) or left by a dead process
      Fd fd(clean ? ::open(p.c_str(), O_RDONLY | O_CLOEXEC) : -1);
      if (fd.fd >= 0 && ::flock(fd.fd, LOCK_EX | LOCK_NB) == 0) {
        ::unlink(p.c_str());
        continue;
      }
      used += static_cast<uint64_t>(st.st_size);
      continue;
    }
    if (name == "data.mdb") {
      used += static_cast<uint64_t>(st.st_size);
      // Only what staging verified and stamped is ever evicted: a database
      // someone put in the cache directory is counted, never deleted.
      struct stat stamp;
      if (::stat(join(dir, ".staged").c_str(), &stamp) != 0) continue;
      Evictable e;
      e.data = p;
      e.use_lock = join(dir, ".use.lock");
      e.stamp = join(dir, ".staged");
      e.ahead = join(dir, ".ahead");
      e.fetched_ahead = ::stat(e.ahead.c_str(), &stamp) == 0;
      e.size = static_cast<uint64_t>(st.st_size);
      struct stat ls;
      e.last_use = ::stat(e.use_lock.c_str(), &ls) == 0
                       ? static_cast<double>(ls.st_mtim.tv_sec) + 1e-9 * static_cast<double>(ls.st_mtim.tv_nsec)
                       : 0;
      out.push_back(std::move(e));
    }
  }
}

// Evicts the least recently used of `staged` that no process reads until
// `bytes` more fit under `limit`; returns how many it evicted. A prefetch
// (`for_prefetch`) never evicts what another prefetch fetched ahead and
// nobody has read yet: fetching ahead never undoes itself.
uint64_t evict(uint64_t& used, uint64_t bytes, uint64_t limit, std::vector<Evictable>& staged, bool for_prefetch) {
  // What was read before goes first (least recently used first), what was
  // fetched ahead and not read yet last.
  std::sort(staged.begin(), staged.end(), [](const Evictable& a, const Evictable& b) {
    return a.fetched_ahead != b.fetched_ahead ? b.fetched_ahead : a.last_use < b.last_use;
  });
  uint64_t evicted = 0;
  for (const Evictable& e : staged) {
    if (used + bytes <= limit) break;
    if (for_prefetch && e.fetched_ahead) continue;
    Fd use(::open(e.use_lock.c_str(), O_RDWR | O_CLOEXEC));
    if (use.fd >= 0 && ::flock(use.fd, LOCK_EX | LOCK_NB) != 0) continue;  // someone reads it
    ::unlink(e.stamp.c_str());
    ::unlink(e.ahead.c_str());
    if (::unlink(e.data.c_str()) == 0) {
      used -= std::min(used, e.size);
      ++evicted;
    }
  }
  return evicted;
}

}  // namespace

// ---- ShardCache -------------------------------------------------------------

ShardCache::ShardCache(std::string source, StageOptions options)
    : source_(strip_slash(std::move(source))), options_(std::move(options)) {
  if (options_.cache_dir.empty())
    value_error("a dataset at '" + source_ + "' is read through a local cache: give cache_dir");
  if (options_.transfers == 0) value_error("transfers must be at least 1");
  if (!make_dirs(options_.cache_dir))
    throw Error("cannot make the cache directory '" + options_.cache_dir + "': " + std::strerror(errno), errno,
                options_.cache_dir);
  char* resolved = ::realpath(options_.cache_dir.c_str(), nullptr);
  if (resolved != nullptr) {
    options_.cache_dir = resolved;
    std::free(resolved);
  }
  std::string key_source = source_;
  if (!is_url(source_)) {  // a local directory: its canonical path names it
    char* src = ::realpath(source_.c_str(), nullptr);
    if (src == nullptr) throw NotFoundError("the dataset '" + source_ + "' was not found", ENOENT, source_);
    key_source = src;
    std::free(src);
    if (key_source == options_.cache_dir || key_source.rfind(options_.cache_dir + "/", 0) == 0 ||
        options_.cache_dir.rfind(key_source + "/", 0) == 0)
      value_error("the cache directory '" + options_.cache_dir + "' and the dataset '" + source_ +
                  "' lie inside one another: give a cache_dir of its own");
  }
  local_dir_ = join(options_.cache_dir, hex16(XXH3_64bits(key_source.data(), key_source.size())));
  if (!make_dirs(local_dir_))
    throw Error("cannot make '" + local_dir_ + "': " + std::strerror(errno), errno, local_dir_);
  write_file_atomic(join(local_dir_, ".source"), key_source + "\n");
  load_manifest();
  uint64_t largest = 0;
  for (const auto& s : shards_) largest = std::max(largest, s.size);
  if (options_.cache_limit != 0 && largest > options_.cache_limit)
    value_error("cache_limit " + std::to_string(options_.cache_limit) + " bytes is smaller than the largest shard of '" +
                source_ + "' (" + std::to_string(largest) + " bytes): raise it to at least that");
}

ShardCache::~ShardCache() {
  if (threads_pid_ != 0 && threads_pid_ != ::getpid()) {
    // A forked child's copy: the threads (and perhaps the mutex's holder) are
    // the parent's. Never join or lock; closing our copies of the lease
    // descriptors leaves the parent's locks held.
    new std::vector<std::thread>(std::move(threads_));  // leaked on purpose
    for (auto& [k, lease] : leases_)
      if (lease.fd >= 0) ::close(lease.fd);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    queue_.clear();
  }
  queue_cv_.notify_all();
  for (auto& t : threads_) t.join();
  for (auto& [k, lease] : leases_)
    if (lease.fd >= 0) ::close(lease.fd);
}

void ShardCache::load_manifest() {
  const std::string path = join(local_dir_, "manifest.json");
  const std::string url = source_ + "/manifest.json";
  Fd lock(open_lock_file(join(local_dir_, ".manifest.lock")));
  flock_or_throw(lock.fd, LOCK_EX, join(local_dir_, ".manifest.lock"));
  struct stat st;
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const double now_s = std::chrono::duration<double>(now).count();
  const bool fresh = ::stat(path.c_str(), &st) == 0 &&
                     now_s - static_cast<double>(st.st_mtim.tv_sec) < options_.manifest_ttl;
  std::string text;
  if (!(fresh && read_small_file(path, text, kMaxManifestBytes))) {
    Sink sink;
    if (is_url(source_)) {
      std::atomic<uint64_t> retries{0};
      fetch(url, sink, options_, retries);
      stats_.retries += retries;
    } else {
      if (!read_small_file(url, sink.text, kMaxManifestBytes)) {
        uint64_t size = 0;
        if (file_size(url, size))
          throw InvalidDatabaseError("shard manifest '" + url + "' is larger than 64 MiB", 0, url);
        throw NotFoundError("'" + source_ + "' has no manifest.json (not a shard directory)", ENOENT, url);
      }
    }
    text = std::move(sink.text);
  }
  auto bad = [&](const std::string& why) {
    throw InvalidDatabaseError("shard manifest '" + url + "' is invalid: " + why, 0, url);
  };
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) bad("not a JSON object");
  if (j.value("format", std::string()) != "torch_lmdb.manifest") bad("'format' is not \"torch_lmdb.manifest\"");
  if (!j.contains("shards") || !j["shards"].is_array() || j["shards"].empty()) bad("'shards' is not a non-empty list");
  std::vector<StagedShard> shards;
  for (size_t k = 0; k < j["shards"].size(); ++k) {
    const auto& e = j["shards"][k];
    const std::string where = "shards[" + std::to_string(k) + "]";
    if (!e.is_object() || !e.contains("path") || !e["path"].is_string()) bad(where + " has no 'path'");
    StagedShard s;
    s.path = e["path"].get<std::string>();
    if (!safe_relative(s.path)) bad(where + " path '" + s.path + "' is not a relative path inside the directory");
    if (!e.contains("num_samples") || !e["num_samples"].is_number_unsigned()) bad(where + " has no 'num_samples'");
    s.num_samples = e["num_samples"].get<uint64_t>();
    if (!e.contains("size") || !e["size"].is_number_unsigned() || !e.contains("data_xxh3_64") ||
        !e["data_xxh3_64"].is_string())
      throw InvalidDatabaseError("shard manifest '" + url + "' gives no 'size' and 'data_xxh3_64' for " + where +
                                     " ('" + s.path + "'), which staging needs: run `torch-lmdb manifest --hash DIR` "
                                     "on the shard directory where it is written",
                                 0, url);
    s.size = e["size"].get<uint64_t>();
    s.hash = e["data_xxh3_64"].get<std::string>();
    if (!is_hex16(s.hash)) bad(where + " 'data_xxh3_64' is not 16 lowercase hex digits");
    for (const auto& other : shards)
      if (other.path == s.path) bad(where + " lists '" + s.path + "' twice");
    shards.push_back(std::move(s));
  }
  if (!fresh) write_file_atomic(path, text);
  manifest_json_ = std::move(text);
  shards_ = std::move(shards);
}

uint64_t ShardCache::total_bytes() const {
  uint64_t total = 0;
  for (const auto& s : shards_) total += s.size;
  return total;
}

std::string ShardCache::shard_dir(size_t k) const { return join(local_dir_, shards_[k].path); }

std::string ShardCache::shard_url(size_t k) const { return source_ + "/" + shards_[k].path + "/data.mdb"; }

bool ShardCache::staged(size_t k) const {
  const std::string dir = shard_dir(k);
  uint64_t size = 0;
  std::string stamp;
  return file_size(join(dir, "data.mdb"), size) && size == shards_[k].size &&
         read_small_file(join(dir, ".staged"), stamp, 64) && stamp == shards_[k].hash;
}

std::string ShardCache::acquire(size_t k) {
  if (k >= shards_.size())
    throw std::out_of_range("shard " + std::to_string(k) + " out of range for " + std::to_string(shards_.size()) +
                            " shards of '" + source_ + "'");
  const std::string dir = shard_dir(k);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = leases_.find(k);
    if (it != leases_.end() && it->second.count > 0) {
      ++it->second.count;
      ++stats_.cache_hits;
      return dir;
    }
  }
  if (!make_dirs(dir)) throw Error("cannot make '" + dir + "': " + std::strerror(errno), errno, dir);
  Fd use(open_lock_file(join(dir, ".use.lock")));
  flock_or_throw(use.fd, LOCK_SH, join(dir, ".use.lock"));  // from here on, nobody evicts it
  if (staged(k)) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.cache_hits;
  } else {
    stage(k, /*wait_for_space=*/true);
  }
  touch(use.fd);
  ::unlink(join(dir, ".ahead").c_str());  // read now: an ordinary staged shard
  std::lock_guard<std::mutex> lock(mutex_);
  Lease& lease = leases_[k];
  if (lease.count++ == 0) {
    lease.fd = use.release();
  }  // else another thread took it meanwhile: ours closes, theirs holds it
  return dir;
}

void ShardCache::release(size_t k, bool unread) {
  int fd = -1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = leases_.find(k);
    if (it == leases_.end() || it->second.count == 0) return;
    if (--it->second.count == 0) {
      fd = it->second.fd;
      leases_.erase(it);
    }
  }
  if (fd >= 0 && unread) write_file_atomic(join(shard_dir(k), ".ahead"), "");  // as if fetched ahead
  if (fd >= 0) {
    touch(fd);  // the last use: what eviction orders by
    ::close(fd);
  }
}

void ShardCache::stage(size_t k, bool wait_for_space) {
  const std::string dir = shard_dir(k);
  if (!make_dirs(dir)) throw Error("cannot make '" + dir + "': " + std::strerror(errno), errno, dir);
  Fd fetch_lock(open_lock_file(join(dir, ".fetch.lock")));
  if (wait_for_space) {
    flock_or_throw(fetch_lock.fd, LOCK_EX, join(dir, ".fetch.lock"));
  } else if (::flock(fetch_lock.fd, LOCK_EX | LOCK_NB) != 0) {
    return;  // another process fetches it now (prefetch only)
  }
  if (staged(k)) {  // fetched by another process while we waited
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.cache_hits;
    return;
  }
  ::unlink(join(dir, ".staged").c_str());
  for (unsigned attempt = 0;; ++attempt) {
    std::mt19937_64 rng(std::random_device{}());
    const std::string tmp = join(dir, ".tmp-" + std::to_string(::getpid()) + "-" + hex16(rng()));
    Fd fd(reserve(shards_[k].size, tmp, wait_for_space));
    if (fd.fd < 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.prefetch_skipped;
      return;
    }
    try {
      if (download(k, fd.fd, tmp, attempt, /*ahead=*/!wait_for_space)) return;
    } catch (...) {
      ::unlink(tmp.c_str());
      throw;
    }
  }
}

bool ShardCache::download(size_t k, int fd, const std::string& tmp, unsigned attempt, bool ahead) {
  const std::string dir = shard_dir(k), url = shard_url(k);
  const auto t0 = Clock::now();
  Sink sink;
  sink.fd = fd;
  sink.expect = shards_[k].size;
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> hash(XXH3_createState(), XXH3_freeState);
  XXH3_64bits_reset(hash.get());
  sink.hash_update = [&hash](const char* p, size_t n) { XXH3_64bits_update(hash.get(), p, n); };
  sink.hash_reset = [&hash] { XXH3_64bits_reset(hash.get()); };
  std::atomic<uint64_t> retries{0};
  std::string got;
  const uint64_t size = shards_[k].size;
  const unsigned parts = is_url(source_) ? static_cast<unsigned>(std::min<uint64_t>(kMaxParts, size / kMinPart)) : 1;
  if (parts > 1 && fetch_parts(url, fd, size, parts, retries)) {
    sink.offset = size;  // every part arrived whole; the file is hashed in one pass (from the page cache)
    got = file_xxh3(tmp);
  } else {
    sink.offset = 0;
    XXH3_64bits_reset(hash.get());
    Connection slot(*this);
    if (is_url(source_))
      fetch(url, sink, options_, retries);
    else
      copy_file(url, sink);
    got = hex16(XXH3_64bits_digest(hash.get()));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.retries += retries;
    stats_.bytes_fetched += sink.offset;
    stats_.fetch_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  }
  if (!sink.overflow && sink.offset == shards_[k].size && got == shards_[k].hash) {
    {
      Fd space(lock_space(options_.cache_dir, LOCK_EX));
      if (::rename(tmp.c_str(), join(dir, "data.mdb").c_str()) != 0)
        throw Error("cannot rename '" + tmp + "': " + std::strerror(errno), errno, tmp);
    }
    if (ahead) write_file_atomic(join(dir, ".ahead"), "");
    write_file_atomic(join(dir, ".staged"), shards_[k].hash);
    {  // staged counts as used now: what was fetched ahead is not the first to go
      Fd use(open_lock_file(join(dir, ".use.lock")));
      touch(use.fd);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.shards_fetched;
    return true;
  }
  ::unlink(tmp.c_str());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.hash_failures;
  }
  if (attempt >= options_.hash_retries)
    throw CorruptedError("shard " + std::to_string(k) + " ('" + shards_[k].path + "') fetched from '" + url +
                             "' does not match its manifest after " + std::to_string(attempt + 1) +
                             " attempts: " + std::to_string(sink.offset) + (sink.overflow ? "+" : "") +
                             " bytes with xxh3 " + got + ", the manifest says " + std::to_string(shards_[k].size) +
                             " bytes with xxh3 " + shards_[k].hash,
                         0, url);
  return false;
}

ShardCache::Connection::Connection(ShardCache& c) : cache(c) {
  std::unique_lock<std::mutex> lock(cache.mutex_);
  cache.connections_cv_.wait(lock, [this] { return cache.connections_ < cache.options_.transfers; });
  ++cache.connections_;
}

ShardCache::Connection::~Connection() {
  {
    std::lock_guard<std::mutex> lock(cache.mutex_);
    --cache.connections_;
  }
  cache.connections_cv_.notify_one();
}

bool ShardCache::fetch_parts(const std::string& url, int fd, uint64_t size, unsigned parts,
                             std::atomic<uint64_t>& retries) {
  // A large shard is fetched as `parts` Range requests at once: a link that
  // is limited per connection is then used whole even for one shard.
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(parts);
  std::vector<char> whole(parts, 0);
  for (unsigned p = 0; p < parts; ++p)
    threads.emplace_back([&, p] {
      try {
        Sink part;
        part.fd = fd;
        part.range_only = true;
        part.offset = size * p / parts;
        part.expect = size * (p + 1) / parts;
        Connection slot(*this);
        fetch(url, part, options_, retries);
        whole[p] = !part.overflow && part.offset == part.expect;
      } catch (...) {
        errors[p] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return std::all_of(whole.begin(), whole.end(), [](char w) { return w != 0; });
}

namespace {

// The node's running count of the cache's bytes, kept in .space.lock (under its lock): the bytes the
// last walk found plus every reservation since, and when that walk was. Every staged byte is reserved
// first and evictions follow a walk under the same lock, so the count never falls short of the
// directory but for files put there by hand, which the next walk (at most kRescanSeconds later)
// counts; what it counts too many (a failed download, a dead process's temporary) goes with that
// walk, or with a ShardCache's first reservation, which always walks.
constexpr double kRescanSeconds = 30;

struct SpaceCount {
  uint64_t used = 0;
  double walked_at = 0;  // seconds since the epoch; 0: no count
};

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

SpaceCount read_count(int fd) {
  char buf[64] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  SpaceCount c;
  unsigned long long used = 0;
  double at = 0;
  if (n > 0 && std::sscanf(buf, "torch_lmdb space %llu %lf", &used, &at) == 2 && at > 0) {
    c.used = used;
    c.walked_at = at;
  }
  return c;
}

void write_count(int fd, const SpaceCount& c) {
  char buf[64];
  const int n = std::snprintf(buf, sizeof(buf), "torch_lmdb space %llu %.3f\n",
                              static_cast<unsigned long long>(c.used), c.walked_at);
  if (n > 0 && ::pwrite(fd, buf, static_cast<size_t>(n), 0) == n) (void)::ftruncate(fd, n);
}

}  // namespace

int ShardCache::reserve(uint64_t bytes, const std::string& tmp, bool wait) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(std::max(1.0, options_.stall_seconds * 10));
  for (;;) {
    {
      Fd lock(lock_space(options_.cache_dir, LOCK_EX));
      uint64_t used = 0;
      std::vector<Evictable> staged;
      SpaceCount count = read_count(lock.fd);
      const double now = wall_seconds();
      // (A cache's first reservation walks: temporaries of dead processes go.)
      const bool counted = walked_.exchange(true) && count.walked_at > 0 && now - count.walked_at < kRescanSeconds &&
                           now + 1 >= count.walked_at &&
                           (options_.cache_limit == 0 || count.used + bytes <= options_.cache_limit);
      if (counted) {
        used = count.used;  // room by the running count: no walk
      } else {
        scan(options_.cache_dir, 0, used, staged, /*clean=*/true);
        count.walked_at = now;
        std::lock_guard<std::mutex> g(mutex_);
        ++stats_.cache_scans;
      }
      if (options_.cache_limit != 0 && used + bytes > options_.cache_limit) {
        const uint64_t evicted = evict(used, bytes, options_.cache_limit, staged, /*for_prefetch=*/!wait);
        std::lock_guard<std::mutex> g(mutex_);
        stats_.evictions += evicted;
      }
      if (options_.cache_limit == 0 || used + bytes <= options_.cache_limit) {
        // Made and locked under the space lock: no scan sees it unlocked.
        Fd fd(::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
        if (fd.fd < 0) throw Error("cannot create '" + tmp + "': " + std::strerror(errno), errno, tmp);
        flock_or_throw(fd.fd, LOCK_EX, tmp);  // a live download: scan() leaves it
        int rc = ::posix_fallocate(fd.fd, 0, static_cast<off_t>(bytes));
        if (rc == EOPNOTSUPP || rc == EINVAL) rc = ::ftruncate(fd.fd, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
        if (rc == 0) write_count(lock.fd, SpaceCount{used + bytes, count.walked_at});
        if (rc != 0) {
          ::unlink(tmp.c_str());
          if (rc == ENOSPC)
            throw DiskFullError("no space left in the cache '" + options_.cache_dir + "'", rc, options_.cache_dir);
          throw Error("cannot allocate the cache's space: " + std::string(std::strerror(rc)), rc, options_.cache_dir);
        }
        return fd.release();
      }
      if (!wait) return -1;
      if (Clock::now() > deadline)
        throw Error("the cache '" + options_.cache_dir + "' (cache_limit " + std::to_string(options_.cache_limit) +
                        " bytes) has no room for " + std::to_string(bytes) + " more bytes: " + std::to_string(used) +
                        " bytes are shards that processes read now. Raise cache_limit, or read fewer shards at once",
                    0, options_.cache_dir);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

uint64_t ShardCache::cached_bytes() const {
  Fd lock(lock_space(options_.cache_dir, LOCK_SH));  // (one moment: see lock_space)
  uint64_t used = 0;
  std::vector<Evictable> staged;
  scan(options_.cache_dir, 0, used, staged, /*clean=*/false);
  return used;
}

void ShardCache::acquire_all() {
  prefetch([this] {
    std::vector<size_t> all(shards_.size());
    for (size_t k = 0; k < all.size(); ++k) all[k] = k;
    return all;
  }());
  for (size_t k = 0; k < shards_.size(); ++k) acquire(k);
}

void ShardCache::start_threads() {
  // Called with mutex_ held.
  if (threads_pid_ == ::getpid() && !threads_.empty()) return;
  if (threads_pid_ != ::getpid() && !threads_.empty()) {
    new std::vector<std::thread>(std::move(threads_));  // the parent's: leaked on purpose
    threads_.clear();
    queue_.clear();
  }
  threads_pid_ = ::getpid();
  for (unsigned i = 0; i < options_.transfers; ++i) threads_.emplace_back([this] { prefetch_loop(); });
}

void ShardCache::prefetch(const std::vector<size_t>& shards) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t k : shards)
    if (k < shards_.size() && std::find(queue_.begin(), queue_.end(), k) == queue_.end()) queue_.push_back(k);
  start_threads();
  queue_cv_.notify_all();
}

void ShardCache::prefetch_loop() {
  for (;;) {
    size_t k;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queue_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      k = queue_.front();
      queue_.pop_front();
    }
    try {
      if (!staged(k)) stage(k, /*wait_for_space=*/false);
    } catch (const std::exception& e) {
      if (std::getenv("TLDBG")) std::fprintf(stderr, "prefetch %zu: %s\n", k, e.what());
      // Only a hint: the shard's acquire() fetches it again and raises.
    }
  }
}

ShardCache::Stats ShardCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace detail
}  // namespace torch_lmdb
