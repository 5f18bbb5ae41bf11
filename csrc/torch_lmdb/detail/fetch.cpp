#include "torch_lmdb/detail/fetch.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <curl/curl.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace detail {

namespace {

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
size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
  Sink& s = *static_cast<Sink*>(user);
  const size_t n = size * nmemb;
  if (s.first_write) {
    s.first_write = false;
    long code = 0;
    curl_easy_getinfo(static_cast<CURL*>(s.handle), CURLINFO_RESPONSE_CODE, &code);
    if (code >= 300) return n;  // an error page: not kept (the status decides)
    if (s.range_sent && code == 200 && s.range_only) {  // a part, but the server sends the whole body
      s.overflow = true;
      return 0;
    }
    if (s.range_sent && code == 200) {  // the server ignored Range: start again
      s.offset = 0;
      s.text.clear();
      if (s.hash_reset) s.hash_reset();
    }
  }
  long code = 0;
  curl_easy_getinfo(static_cast<CURL*>(s.handle), CURLINFO_RESPONSE_CODE, &code);
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
  if (s.hash_update) s.hash_update(data, n);
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


}  // namespace

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
    sink.range_sent = sink.offset > 0 || sink.range_only;
    curl_easy_setopt(h, CURLOPT_URL, t.url.c_str());
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");  // never file:// or others, redirects included
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(std::min(o.stall_seconds, 30.0) * 1000));
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, std::max(1L, static_cast<long>(std::ceil(o.stall_seconds))));
    curl_easy_setopt(h, CURLOPT_USERAGENT, "torch_lmdb");
    const std::string range =
        std::to_string(sink.offset) + "-" + (sink.range_only ? std::to_string(sink.expect - 1) : std::string());
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

}  // namespace detail
}  // namespace torch_lmdb
