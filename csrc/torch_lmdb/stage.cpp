#include "torch_lmdb/stage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>

#include <curl/curl.h>
#include <nlohmann/json.hpp>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "torch_lmdb/env_files.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace detail {

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxManifestBytes = size_t{64} << 20;

std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string strip_slash(std::string s) {
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

[[noreturn]] void value_error(const std::string& what) { throw std::invalid_argument(what); }

// A file descriptor closed on scope exit.
struct Fd {
  int fd = -1;
  explicit Fd(int f = -1) : fd(f) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  void reset(int f = -1) {
    if (fd >= 0) ::close(fd);
    fd = f;
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

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
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
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

// ---- libcurl ----------------------------------------------------------------

void curl_init_once() {
  static const CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
  if (rc != CURLE_OK) throw Error(std::string("libcurl failed to initialise: ") + curl_easy_strerror(rc), 0, "");
}

// One easy handle per thread: its connections are reused by every request
// of the thread (HTTP keep-alive).
struct EasyHandle {
  CURL* h = nullptr;
  int pid = 0;
  ~EasyHandle() {
    if (h != nullptr && pid == ::getpid()) curl_easy_cleanup(h);
  }
  CURL* get() {
    if (h == nullptr || pid != ::getpid()) {  // a forked child makes its own
      curl_init_once();
      h = curl_easy_init();
      pid = ::getpid();
      if (h == nullptr) throw Error("libcurl could not make a handle", 0, "");
    }
    curl_easy_reset(h);
    return h;
  }
};

CURL* thread_handle() {
  thread_local EasyHandle handle;
  return handle.get();
}

// What a URL stands for when requested: http(s) as is; s3://bucket/key as a
// path-style URL of the S3 endpoint, signed with SigV4.
struct Target {
  std::string url;
  bool s3 = false;
  std::string region;
};

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

Target resolve(const std::string& url) {
  Target t;
  if (url.rfind("s3://", 0) != 0) {
    t.url = url;
    return t;
  }
  const std::string rest = url.substr(5);
  const size_t slash = rest.find('/');
  const std::string bucket = rest.substr(0, slash);
  const std::string key = slash == std::string::npos ? std::string() : rest.substr(slash + 1);
  t.s3 = true;
  t.region = env_or("AWS_REGION", env_or("AWS_DEFAULT_REGION", "us-east-1"));
  const std::string endpoint = env_or("AWS_ENDPOINT_URL_S3", env_or("AWS_ENDPOINT_URL", ""));
  if (!endpoint.empty())
    t.url = strip_slash(endpoint) + "/" + bucket + "/" + key;  // path style (MinIO, moto, Ceph)
  else
    t.url = "https://" + bucket + ".s3." + t.region + ".amazonaws.com/" + key;
  return t;
}

// The body of one GET, written at `offset` onward of a file (or a string),
// hashed as it comes.
struct Sink {
  int fd = -1;               // the file, or -1: into `text`
  std::string text;
  size_t text_limit = kMaxManifestBytes;
  uint64_t offset = 0;       // bytes of the body kept so far
  uint64_t expect = 0;       // the whole body's size (file sinks)
  XXH3_state_t* hash = nullptr;
  bool range_sent = false;   // this attempt asked for offset- (a Range request)
  bool first_write = true;
  bool overflow = false;     // the body is longer than expected
  int write_errno = 0;
  CURL* handle = nullptr;
};

size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
  Sink& s = *static_cast<Sink*>(user);
  const size_t n = size * nmemb;
  if (s.first_write) {
    s.first_write = false;
    long code = 0;
    curl_easy_getinfo(s.handle, CURLINFO_RESPONSE_CODE, &code);
    if (code >= 300) return n;  // an error page: not kept (the status decides)
    if (s.range_sent && code == 200) {  // the server ignored Range: start again
      s.offset = 0;
      s.text.clear();
      if (s.hash != nullptr) XXH3_64bits_reset(s.hash);
    }
  }
  long code = 0;
  curl_easy_getinfo(s.handle, CURLINFO_RESPONSE_CODE, &code);
  if (code >= 300) return n;
  if (s.fd < 0) {
    if (s.text.size() + n > s.text_limit) {
      s.overflow = true;
      return 0;
    }
    s.text.append(data, n);
    s.offset += n;
    return n;
  }
  if (s.offset + n > s.expect) {
    s.overflow = true;
    return 0;
  }
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::pwrite(s.fd, data + done, n - done, static_cast<off_t>(s.offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      s.write_errno = errno;
      return 0;
    }
    done += static_cast<size_t>(w);
  }
  if (s.hash != nullptr) XXH3_64bits_update(s.hash, data, n);
  s.offset += n;
  return n;
}

bool transient_curl_error(CURLcode rc) {
  switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_WEIRD_SERVER_REPLY:
      return true;
    default:
      return false;
  }
}

void sleep_backoff(unsigned attempt) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  const double base = std::min(5.0, 0.05 * std::pow(2.0, attempt));
  const double jitter = std::uniform_real_distribution<double>(0.5, 1.0)(rng);
  std::this_thread::sleep_for(std::chrono::duration<double>(base * jitter));
}

// GETs `url` into `sink` (the rest of it when sink.offset > 0), retrying
// transient failures; `retries` counts them. Throws NotFoundError (404),
// LockError (401, 403) or Error naming the URL.
void fetch(const std::string& url, Sink& sink, const StageOptions& o, std::atomic<uint64_t>& retries) {
  const Target t = resolve(url);
  std::string last;
  for (unsigned attempt = 0;; ++attempt) {
    CURL* h = thread_handle();
    sink.handle = h;
    sink.first_write = true;
    sink.range_sent = sink.offset > 0;
    curl_easy_setopt(h, CURLOPT_URL, t.url.c_str());
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(std::min(o.stall_seconds, 30.0) * 1000));
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, std::max(1L, static_cast<long>(std::ceil(o.stall_seconds))));
    curl_easy_setopt(h, CURLOPT_USERAGENT, "torch_lmdb");
    const std::string range = std::to_string(sink.offset) + "-";
    if (sink.range_sent) curl_easy_setopt(h, CURLOPT_RANGE, range.c_str());
    std::string sigv4, userpwd;
    curl_slist* headers = nullptr;
    if (t.s3) {
      sigv4 = "aws:amz:" + t.region + ":s3";
      userpwd = env_or("AWS_ACCESS_KEY_ID", "") + ":" + env_or("AWS_SECRET_ACCESS_KEY", "");
      curl_easy_setopt(h, CURLOPT_AWS_SIGV4, sigv4.c_str());
      curl_easy_setopt(h, CURLOPT_USERPWD, userpwd.c_str());
      const std::string token = env_or("AWS_SESSION_TOKEN", "");
      if (!token.empty()) headers = curl_slist_append(headers, ("x-amz-security-token: " + token).c_str());
      curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    }
    const CURLcode rc = curl_easy_perform(h);
    if (headers != nullptr) curl_slist_free_all(headers);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (sink.write_errno != 0) {
      const int err = sink.write_errno;
      if (err == ENOSPC) throw DiskFullError("no space left in the cache while fetching '" + url + "'", err, url);
      throw Error("cannot write the download of '" + url + "': " + std::strerror(err), err, url);
    }
    if (sink.overflow) {
      if (sink.fd < 0) throw Error("'" + url + "' is larger than " + std::to_string(sink.text_limit) + " bytes", 0, url);
      return;  // longer than the manifest says: the caller's size check refetches or refuses it
    }
    if (rc == CURLE_OK && (code == 200 || code == 206)) {
      if (sink.fd < 0 || sink.offset == sink.expect) return;
      last = "body cut short at " + std::to_string(sink.offset) + " of " + std::to_string(sink.expect) + " bytes";
    } else if (rc == CURLE_OK && code == 404) {
      throw NotFoundError("'" + url + "' was not found (HTTP 404)", ENOENT, url);
    } else if (rc == CURLE_OK && (code == 401 || code == 403)) {
      throw LockError("'" + url + "' was refused (HTTP " + std::to_string(code) +
                          "): check the credentials (for s3://, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                      EACCES, url);
    } else if (rc == CURLE_OK && code == 416 && sink.offset == sink.expect && sink.fd >= 0) {
      return;  // asked for the rest of a body that was already whole
    } else if (rc == CURLE_OK && !(code >= 500 || code == 408 || code == 429)) {
      throw Error("'" + url + "' answered HTTP " + std::to_string(code), 0, url);
    } else if (rc != CURLE_OK && !transient_curl_error(rc)) {
      throw Error("cannot fetch '" + url + "': " + curl_easy_strerror(rc), 0, url);
    } else {
      last = rc != CURLE_OK ? std::string(curl_easy_strerror(rc)) : "HTTP " + std::to_string(code);
    }
    if (attempt >= o.retries)
      throw Error("cannot fetch '" + url + "' after " + std::to_string(attempt + 1) + " attempts: " + last, 0, url);
    ++retries;
    if (sink.fd < 0) sink.offset = 0, sink.text.clear();
    sleep_backoff(attempt);
  }
}

// Copies a file of a shared file system into `sink` (the same checks as a
// download: size and hash).
void copy_file(const std::string& path, Sink& sink) {
  Fd in(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (in.fd < 0) {
    if (errno == ENOENT) throw NotFoundError("'" + path + "' was not found", ENOENT, path);
    throw Error("cannot read '" + path + "': " + std::strerror(errno), errno, path);
  }
  std::vector<char> buf(size_t{4} << 20);
  for (;;) {
    const ssize_t n = ::pread(in.fd, buf.data(), buf.size(), static_cast<off_t>(sink.offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error("cannot read '" + path + "': " + std::strerror(errno), errno, path);
    if (n == 0) return;
    sink.first_write = false;
    if (on_body(buf.data(), 1, static_cast<size_t>(n), &sink) != static_cast<size_t>(n)) {
      if (sink.write_errno == ENOSPC)
        throw DiskFullError("no space left in the cache while copying '" + path + "'", ENOSPC, path);
      if (sink.write_errno != 0) throw Error("cannot write the copy of '" + path + "'", sink.write_errno, path);
      return;  // longer than expected: the caller's size check refuses it
    }
  }
}

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

bool is_url(const std::string& path) {
  return path.rfind("http://", 0) == 0 || path.rfind("https://", 0) == 0 || path.rfind("s3://", 0) == 0;
}

uint64_t parse_bytes(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  size_t j = i;
  while (j < text.size() && (std::isdigit(static_cast<unsigned char>(text[j])) || text[j] == '.')) ++j;
  const std::string number = text.substr(i, j - i);
  while (j < text.size() && std::isspace(static_cast<unsigned char>(text[j]))) ++j;
  std::string unit = text.substr(j);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.back()))) unit.pop_back();
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  char* end = nullptr;
  const double value = number.empty() ? -1 : std::strtod(number.c_str(), &end);
  static const std::pair<const char*, double> units[] = {
      {"", 1},      {"b", 1},        {"k", 1e3},      {"kb", 1e3},     {"m", 1e6},          {"mb", 1e6},
      {"g", 1e9},   {"gb", 1e9},     {"t", 1e12},     {"tb", 1e12},    {"kib", 1024.0},     {"mib", 1048576.0},
      {"gib", 1073741824.0},         {"tib", 1099511627776.0}};
  if (value >= 0 && end == number.c_str() + number.size()) {
    for (const auto& u : units) {
      if (unit == u.first) {
        const double bytes = value * u.second;
        if (bytes < 1.8e19) return static_cast<uint64_t>(std::llround(bytes));
      }
    }
  }
  value_error("not a size: '" + text + "' (bytes, or a number with a unit such as \"20GB\" or \"512MiB\")");
}

std::string file_xxh3(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) throw NotFoundError("cannot read '" + path + "': " + std::strerror(errno), errno, path);
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  std::vector<char> buf(size_t{4} << 20);
  for (;;) {
    const ssize_t n = ::read(fd.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      XXH3_freeState(st);
      throw Error("cannot read '" + path + "': " + std::strerror(errno), errno, path);
    }
    if (n == 0) break;
    XXH3_64bits_update(st, buf.data(), static_cast<size_t>(n));
  }
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return hex16(h);
}

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

void ShardCache::release(size_t k) {
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
  sink.hash = XXH3_createState();
  XXH3_64bits_reset(sink.hash);
  std::atomic<uint64_t> retries{0};
  try {
    if (is_url(source_))
      fetch(url, sink, options_, retries);
    else
      copy_file(url, sink);
  } catch (...) {
    XXH3_freeState(sink.hash);
    throw;
  }
  const std::string got = hex16(XXH3_64bits_digest(sink.hash));
  XXH3_freeState(sink.hash);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.retries += retries;
    stats_.bytes_fetched += sink.offset;
    stats_.fetch_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  }
  if (!sink.overflow && sink.offset == shards_[k].size && got == shards_[k].hash) {
    if (::rename(tmp.c_str(), join(dir, "data.mdb").c_str()) != 0)
      throw Error("cannot rename '" + tmp + "': " + std::strerror(errno), errno, tmp);
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

int ShardCache::reserve(uint64_t bytes, const std::string& tmp, bool wait) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(std::max(1.0, options_.stall_seconds * 10));
  const std::string lock_path = join(options_.cache_dir, ".space.lock");
  for (;;) {
    {
      Fd lock(open_lock_file(lock_path));
      flock_or_throw(lock.fd, LOCK_EX, lock_path);
      uint64_t used = 0;
      std::vector<Evictable> staged;
      scan(options_.cache_dir, 0, used, staged, /*clean=*/true);
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
