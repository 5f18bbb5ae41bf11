// torch_lmdb/detail/stage.h -- internal: a shard directory that lives elsewhere (an
// http:// or https:// URL, s3://bucket/prefix, or a directory on a shared
// file system), staged shard by shard into a node-local cache directory.
// Used by Reader (ReaderOptions::cache_dir) and by the Python package. Not
// installed.
//
// Contract
// - The source's manifest.json must give each shard's `size` and
//   `data_xxh3_64` (the xxh3-64 of its data.mdb; `torch-lmdb manifest --hash`
//   adds them); otherwise InvalidDatabaseError naming the manifest and the
//   command. The manifest is fetched once per node and `manifest_ttl`
//   seconds (every process of the node reuses a copy younger than that).
// - Layout: cache_dir/<16 hex digits of xxh3(source)>/ mirrors the source:
//   manifest.json and <shard path>/data.mdb, so it opens as a local shard
//   directory (read-only, without a lock file). Nothing outside cache_dir is
//   ever written or deleted.
// - A shard is downloaded to a temporary file beside its place (which holds
//   an exclusive flock while it is written), hashed while it is written,
//   then renamed into place. A hash that differs from the manifest's is
//   fetched again up to `hash_retries` times, then CorruptedError names the
//   shard and the URL. A temporary whose flock is free (its process died) is
//   removed by the next process that reserves space.
// - A shard of 4 MiB or more at a URL is fetched as Range requests of at
//   least 2 MiB (at most 16 parts), then hashed in one pass; a server that
//   ignores Range gets one request for the whole body. A cache has at most
//   `transfers` requests in flight.
// - Requests are retried with exponential backoff (at most `retries` times)
//   on connection errors, timeouts (no byte for `stall_seconds`), HTTP 5xx,
//   408 and 429, and bodies cut short (the retry asks for the rest with a
//   Range request). 404 raises NotFoundError, 401/403 LockError, naming the
//   URL; retries exhausted raise Error naming the URL and the last cause.
// - One copy per node: a shard is fetched under an exclusive flock of its
//   `.fetch.lock` (one process fetches, the others wait and find it staged).
//   A process reading a shard holds a shared flock on its `.use.lock`
//   (acquire() to release()); the kernel drops it when the process dies, so
//   a killed process holds nothing. Eviction takes that lock exclusively
//   without waiting: a shard some process reads is never evicted.
// - cache_limit (0: none) bounds the bytes of staged and downloading shards
//   of every dataset in cache_dir: space is reserved (the temporary file is
//   allocated at its full size) under cache_dir/.space.lock, evicting the
//   least recently used shards that no process reads; its rename into place
//   happens under the same lock, so a walk of the cache under it never misses
//   a shard nor counts an evicted one with the download that replaced it. A shard larger than
//   cache_limit is refused at construction (ValueError naming both sizes);
//   an acquire() that finds no evictable space waits for a reader to
//   release one, and raises Error naming the limit after `stall_seconds`
//   x 10. prefetch() never waits for space and never evicts a shard another
//   prefetch staged that nobody has read since: a shard that does not fit
//   is skipped (its acquire() fetches it).
// - Thread safety: every member function may be called from any thread.
//   After fork(), the child uses its own transfer threads (started lazily);
//   leases taken in the parent stay the parent's.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace torch_lmdb {
namespace detail {

/// http://, https:// or s3:// (what ShardCache fetches over the network).
bool is_url(const std::string& path);

/// Bytes from an int or a size text: "20GB", "300 MiB", "1.5G", "4096" (k, M,
/// G, T: powers of 1000 with B or alone; KiB, MiB...: powers of 1024).
/// ValueError for anything else.
uint64_t parse_bytes(const std::string& text);

/// xxh3-64 of a file's bytes as 16 lowercase hex digits (the manifest's
/// `data_xxh3_64`). NotFoundError for a file that cannot be read.
std::string file_xxh3(const std::string& path);

struct StageOptions {
  std::string cache_dir;
  uint64_t cache_limit = 0;  ///< bytes; 0: no limit
  unsigned transfers = 4;    ///< requests in flight at most (shards, or parts of one)
  unsigned retries = 6;      ///< retries of one request
  unsigned hash_retries = 2; ///< refetches of a shard whose hash differs
  double stall_seconds = 30; ///< a transfer that moves no byte this long is retried
  double manifest_ttl = 60;  ///< seconds a node's copy of the manifest is reused
};

struct StagedShard {
  std::string path;  ///< relative to the dataset, as the manifest lists it
  uint64_t num_samples = 0;
  uint64_t size = 0;
  std::string hash;
};

class ShardCache {
 public:
  ShardCache(std::string source, StageOptions options);
  ~ShardCache();
  ShardCache(const ShardCache&) = delete;
  ShardCache& operator=(const ShardCache&) = delete;

  const std::string& source() const { return source_; }
  /// The local mirror: manifest.json and the staged shards.
  const std::string& local_dir() const { return local_dir_; }
  const std::vector<StagedShard>& shards() const { return shards_; }
  const StageOptions& options() const { return options_; }
  uint64_t total_bytes() const;
  /// The manifest's text (as fetched).
  const std::string& manifest_json() const { return manifest_json_; }

  /// Stages shard k (fetching it unless a verified copy is cached) and holds
  /// it (a lease) until release(k); returns its local database directory.
  /// Leases count: acquire twice, release twice.
  std::string acquire(size_t k);
  /// `unread`: the shard was only looked at (its schema), and is kept as a
  /// shard fetched ahead of its reading is (see prefetch()).
  void release(size_t k, bool unread = false);
  /// Stages and holds every shard, `transfers` at a time.
  void acquire_all();
  /// Fetches these shards in the background, in order, without holding them.
  void prefetch(const std::vector<size_t>& shards);
  /// Bytes of staged and downloading shards in cache_dir (every dataset), at
  /// one moment: walked under the space lock, under which every download's
  /// reservation, its rename into place and every eviction happen.
  uint64_t cached_bytes() const;

  struct Stats {
    uint64_t bytes_fetched = 0;
    uint64_t shards_fetched = 0;
    double fetch_seconds = 0;
    uint64_t cache_hits = 0;
    uint64_t evictions = 0;
    uint64_t retries = 0;
    uint64_t hash_failures = 0;
    uint64_t prefetch_skipped = 0;
    // Walks of cache_dir to count its bytes: at most one per kRescanSeconds
    // while the node's running count (in .space.lock) shows room.
    uint64_t cache_scans = 0;
  };
  Stats stats() const;

 private:
  struct Lease {
    int fd = -1;
    int count = 0;
  };
  void load_manifest();
  std::string shard_dir(size_t k) const;
  std::string shard_url(size_t k) const;
  bool staged(size_t k) const;
  void stage(size_t k, bool wait_for_space);
  bool download(size_t k, int fd, const std::string& tmp, unsigned attempt, bool ahead);
  int reserve(uint64_t bytes, const std::string& tmp, bool wait);
  // One of the `transfers` connections of this cache, held for a request.
  struct Connection {
    explicit Connection(ShardCache& c);
    ~Connection();
    ShardCache& cache;
  };
  bool fetch_parts(const std::string& url, int fd, uint64_t size, unsigned parts, std::atomic<uint64_t>& retries);
  void prefetch_loop();
  void start_threads();

  std::string source_;
  StageOptions options_;
  std::string local_dir_;
  std::string manifest_json_;
  std::vector<StagedShard> shards_;

  mutable std::mutex mutex_;  // leases_, queue_, counters
  std::map<size_t, Lease> leases_;
  std::deque<size_t> queue_;
  std::condition_variable queue_cv_;
  std::vector<std::thread> threads_;
  int threads_pid_ = 0;
  unsigned connections_ = 0;  // requests in flight (at most options_.transfers)
  std::condition_variable connections_cv_;
  bool stopping_ = false;
  Stats stats_;
  std::atomic<bool> walked_{false};  // this object walked cache_dir once (reserve(): its temporaries of dead processes go)
};

}  // namespace detail
}  // namespace torch_lmdb
