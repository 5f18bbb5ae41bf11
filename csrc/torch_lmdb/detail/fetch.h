// torch_lmdb/detail/fetch.h -- internal: the transfers of staging (stage.h): GETs
// over HTTP(S) and S3 through libcurl, and copies from a shared file system,
// into a file (or a string) with their retries. Not installed.
//
// Contract
// - fetch() retries connection errors, timeouts, HTTP 5xx/408/429 and bodies
//   cut short (asking for the rest with a Range request) up to
//   StageOptions::retries times with exponential backoff; it throws
//   NotFoundError (404), LockError (401/403) or Error naming the URL.
// - A body longer than Sink::expect sets Sink::overflow and stops; bytes are
//   passed to Sink::hash_update as they are written.
// - Thread safety: each thread uses its own libcurl handle (its connections
//   are reused by the thread's requests); a forked child makes new ones.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

#include "torch_lmdb/detail/stage.h"

namespace torch_lmdb {
namespace detail {

constexpr size_t kMaxManifestBytes = size_t{64} << 20;

inline std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

inline std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

inline std::string strip_slash(std::string s) {
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

[[noreturn]] inline void value_error(const std::string& what) { throw std::invalid_argument(what); }

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


/// Where a transfer's body goes: a file at `offset` onward (fd >= 0), or
/// `text` (fd < 0, at most text_limit bytes).
struct Sink {
  int fd = -1;
  std::string text;
  size_t text_limit = kMaxManifestBytes;
  uint64_t offset = 0;  ///< bytes of the body kept so far
  uint64_t expect = 0;  ///< the whole body's size (file sinks)
  std::function<void(const char*, size_t)> hash_update;  ///< the bytes kept, in order
  std::function<void()> hash_reset;  ///< the server restarted the body (it ignored Range)
  /// A part of the body: bytes [offset, expect) by a Range request; a
  /// server that answers with the whole body sets `overflow`.
  bool range_only = false;
  bool range_sent = false;
  bool first_write = true;
  bool overflow = false;  ///< the body is longer than expected
  int write_errno = 0;
  void* handle = nullptr;  ///< the transfer's CURL handle
};

/// GETs `url` (http://, https://, s3://) into `sink`, the rest of it when
/// sink.offset > 0; `retries` counts the retried requests.
void fetch(const std::string& url, Sink& sink, const StageOptions& o, std::atomic<uint64_t>& retries);

/// Copies the file `path` (a shared file system) into `sink`.
void copy_file(const std::string& path, Sink& sink);

}  // namespace detail
}  // namespace torch_lmdb
