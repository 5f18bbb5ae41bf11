// torch_lmdb/detail/lookup.h -- internal: finding and parsing the records of a
// batch (Reader::read_batch, get, request_pages). Not installed.
//
// Contract
// - lookup() returns the record of one sample, bounds-checked against the
//   map; a missing sample, a damaged packed value or a failed LMDB call
//   raises CorruptedError naming the file and the index (read_failed first
//   asks the environment whether its file changed under the map).
// - parse() parses a record against the reader's schema (a record whose
//   fields differ raises CorruptedError naming the file and the index).
// - BatchLookup finds a batch's records two ahead of their parse, or all of
//   them first on a cold thread (ColdBatch), requesting their missing pages
//   with one madvise per merged range (request_pages); the uncached records
//   on pages of their own are read through io_uring instead (O_DIRECT with
//   keep_cache = false; detail/direct_io.h), checked as any record is.
// - read_window() reads the uncached records of a stream's coming window (a
//   block shuffle's) into one buffer with a few long reads; BatchLookups made
//   while a WindowReadScope of it lives take those records from the buffer
//   (checked as any record) when their transaction sees the snapshot the
//   window read looked them up in, and read every other record as before.
// - Thread safety: the functions may be called from any thread; a
//   BatchLookup and a ColdBatch belong to the thread that made them (the cold
//   state is per thread). A WindowRead is read-only once made: any number of
//   threads take records from it.
#pragma once

#include <lmdb.h>
#include <sys/resource.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/reader_state.h"
#include "torch_lmdb/detail/record_format.h"

namespace torch_lmdb {
namespace detail {

/// Throws CorruptedError when a fault was contained on one of `envs`' maps
/// (fault_guard.h): what was read may hold its zeros.
void check_intact(const std::vector<std::shared_ptr<Env>>& envs);

/// The record of sample `local` of `env`, looked up inside `txn` (`whole`, when
/// given, gets the LMDB value holding it).
MDB_val lookup(const Env& env, MDB_txn* txn, uint64_t local, uint32_t per_value, MDB_val* whole = nullptr);

/// Parses the record `v` of sample `local` of `env` and checks its layout
/// against the reader's schema; fields in a column of `whole` (the value
/// holding the record, `per_value` records a value) are resolved
/// (detail/columns.h), their section's checksum checked when the reader verifies.
void parse(const Env& env, const MDB_val& v, uint64_t local, const Reader::State& s, std::vector<FieldView>& views,
           bool verify, const MDB_val& whole, uint32_t per_value);

/// The page range of the map holding a value; for a value on overflow pages
/// (it starts right after the 16-byte page header) the whole run of pages.
std::pair<uintptr_t, uintptr_t> value_pages(const MDB_val& v);

/// Whether `v` lies on overflow pages of its own (16 bytes past the start of
/// value_pages(v)): its pages hold nothing else (evicted, or read directly, whole).
inline bool owns_its_pages(const MDB_val& v) {
  return reinterpret_cast<uintptr_t>(v.mv_data) - value_pages(v).first == 16;
}

/// The descriptor a cold read of record `v` of `env` (`per_value` records a
/// value) goes through io_uring with (ReaderOptions::direct_reads: O_DIRECT
/// with keep_cache = false, buffered otherwise), or -1 when it is read
/// through the map (direct reads off, a packed value, a record sharing its
/// pages, one over 1 GiB, a file without the descriptor). The one rule of
/// BatchLookup's direct reads and of the page requests that leave them out.
int direct_read_fd(const Env& env, const MDB_val& v, uint32_t per_value, const ReaderOptions& o);

/// Requests the pages of `values` (at most `budget` bytes of them, in batch
/// order) that are not in the page cache: the ranges are merged in address
/// order (across gaps of up to `gap` bytes), mincore() tells which hold a
/// missing page, and one madvise (MADV_WILLNEED: asynchronous reads) goes out
/// per such range. Returns the number of missing pages.
size_t request_pages(const std::vector<MDB_val>& values, size_t budget, uintptr_t gap = 0);

/// A window's records read whole ahead of the batches that need them: runs of their files
/// (records at most kGap apart merged, with what lies between) read
/// into one buffer in requests of up to kRequest bytes.
struct WindowRead {
  static constexpr uint64_t kGap = uint64_t{64} << 10;
  static constexpr uint32_t kRequest = uint32_t{1} << 20;
  struct Run {
    uint64_t offset = 0;  // in the file
    uint64_t length = 0;
    const char* data = nullptr;  // null: a read of it failed or fell short
  };
  struct File {
    const Env* env = nullptr;
    uint64_t txn_id = 0;    // the snapshot its records were looked up in
    uint64_t version = 0;   // the file then (Env::file_version)
    std::vector<Run> runs;  // by offset
  };
  std::vector<std::shared_ptr<Env>> envs;  // (open while the buffer is used)
  std::vector<File> files;
  char* buffer = nullptr;  // 2 MiB-aligned (transparent huge pages)
  size_t capacity = 0;
  size_t records = 0;  // records read ahead
  uint64_t bytes = 0;  // bytes read

  WindowRead() = default;
  WindowRead(const WindowRead&) = delete;
  WindowRead& operator=(const WindowRead&) = delete;
  ~WindowRead();
  /// The bytes [at, at + size) of env's file as read in snapshot `txn_id`
  /// of the file at `version`, or null (not read, another snapshot or file,
  /// a failed read).
  const char* find(const Env* env, uint64_t txn_id, uint64_t version, uint64_t at, uint64_t size) const;
};

/// Reads `want` (records' [begin, end) ranges in file `file` of `envs`,
/// looked up in the snapshots `txn_ids` of the files at `versions`) through
/// this thread's io_uring: O_DIRECT at the file's alignment, or buffered with
/// `keep_cache`. Records less than kGap apart, and less than their own size,
/// share a run (what lies between is read too: at most as much as the
/// records); the runs' bytes stay within `budget` (the records past it are
/// left out). `reuse`, when no one else holds it, lends its buffer. Null
/// when nothing is wanted or this thread has no ring.
struct WindowRange {
  size_t file = 0;
  uint64_t begin = 0, end = 0;
};
std::shared_ptr<const WindowRead> read_window(const std::vector<std::shared_ptr<Env>>& envs,
                                              const std::vector<uint64_t>& txn_ids,
                                              const std::vector<uint64_t>& versions, std::vector<WindowRange>& want,
                                              bool keep_cache, size_t budget,
                                              std::shared_ptr<const WindowRead> reuse);

/// Reader::read_window: the uncached records of `indices` that direct_read_fd()
/// takes, looked up and read by the function above.
std::shared_ptr<const WindowRead> read_window(Reader::State& s, at::ArrayRef<size_t> indices,
                                              std::shared_ptr<const WindowRead> reuse);

/// While it lives, BatchLookups made on this thread take records from `window`.
class WindowReadScope {
 public:
  explicit WindowReadScope(const WindowRead* window);
  ~WindowReadScope();
  WindowReadScope(const WindowReadScope&) = delete;
  WindowReadScope& operator=(const WindowReadScope&) = delete;

 private:
  const WindowRead* previous_;
};

/// Work a stream gives its batch for the time the batch's reads are on their
/// way (BatchStream: the lookups of the batches ahead). While the scope lives,
/// the first copy of a BatchLookup made on this thread runs it, once, after
/// the batch's io_uring reads are submitted; run() runs it if nothing did.
class WhileReadingScope {
 public:
  explicit WhileReadingScope(std::function<void()> work);
  ~WhileReadingScope();
  WhileReadingScope(const WhileReadingScope&) = delete;
  WhileReadingScope& operator=(const WhileReadingScope&) = delete;
  /// The work of this thread's innermost scope, unless it ran already.
  static void run();

 private:
  std::function<void()> work_;
  WhileReadingScope* previous_;
};

/// The first call for `env` (in this process) asks the disk for every leaf of
/// its samples table at once (detail/tree_pages.h); later calls do nothing.
void request_leaves_once(const Env& env, MDB_txn* txn);

/// Whether the record `v`'s pages are in the page cache (mincore; of a record
/// of more than 64 pages, its first and last).
bool record_cached(const MDB_val& v);

/// This thread's major page faults so far (-1 when unknown).
long major_faults();

// Whether this thread's reads miss the page cache, from batch to batch.
struct ColdState {
  bool cold = false;
  int warm_batches = 0;  // batches in a row whose pages were all cached
  long majflt = -1;      // the thread's major faults after its last batch
};
extern thread_local ColdState cold_state;  // (lookup.cpp)

// One batch's decision and bookkeeping. Without lookups ahead, a major fault
// since the thread's last batch makes the next batches request their pages; with
// them, 4 batches in a row whose pages were all cached end it (the faults
// themselves do not tell: pages requested ahead fault as minor).
class ColdBatch {
 public:
  explicit ColdBatch(const ReaderOptions& o)
      : enabled_(o.page_requests == PageRequests::Auto && o.page_request_bytes > 0), budget_(o.page_request_bytes) {
    if (o.page_requests == PageRequests::Always) ahead_ = o.page_request_bytes;
    if (!enabled_) return;
    if (cold_state.majflt < 0) cold_state.majflt = major_faults();
    if (cold_state.cold) ahead_ = o.page_request_bytes;
  }
  /// Bytes of the batch to request ahead (0: plain reads).
  size_t ahead() const { return ahead_; }
  /// Auto, not requesting pages: the bytes to request should the batch's
  /// first sample turn out not to be cached (see BatchLookup).
  size_t probe() const { return enabled_ && ahead_ == 0 ? budget_ : 0; }
  /// The probe found the first sample uncached: this batch requested its pages.
  void engaged() {
    ahead_ = budget_;
    cold_state.cold = true;
    cold_state.warm_batches = 0;
  }
  /// After the copies; `missing`: pages that were requested (not cached).
  void done(size_t missing, const Reader::State& s) {
    s.io_batches.fetch_add(1, std::memory_order_relaxed);
    if (ahead_ > 0) {
      s.io_page_request_batches.fetch_add(1, std::memory_order_relaxed);
      s.io_pages.fetch_add(missing, std::memory_order_relaxed);
    }
    if (!enabled_) return;
    const long now = major_faults();
    if (ahead_ == 0) {
      if (now > cold_state.majflt) {
        cold_state.cold = true;
        cold_state.warm_batches = 0;
      }
    } else if (missing == 0) {
      if (++cold_state.warm_batches >= 4) cold_state.cold = false;
    } else {
      cold_state.warm_batches = 0;
    }
    cold_state.majflt = now;
  }

 private:
  bool enabled_;
  size_t budget_;
  size_t ahead_ = 0;
};

// The samples of a batch, looked up two ahead of their parse: the first
// bytes of each value are prefetched as soon as it is found, so that their
// cache misses overlap with the B-tree searches and copies of the samples
// before it instead of stalling the parse (tiny random reads: a sixth of the
// time went to the first touch of the record; 16 KiB samples on 2 threads:
// two ahead read +2 % over one ahead in 14 paired rounds).
//
// Runs of consecutive indices (sequential batches) are walked with a cursor
// per file: the first sample of a run is searched with MDB_SET_KEY, each
// next one is the cursor's next entry (MDB_NEXT: no descent from the root;
// tiny sequential reads 1.3-1.5x raw mdb_get). Other samples are searched
// with mdb_get, and so is a next entry with another key (a gap), which then
// gets lookup()'s error.
class BatchLookup {
 public:
  // `ahead` > 0 (a cold thread, see ColdBatch): every sample is looked up
  // first and the pages of up to `ahead` bytes of them are requested at once.
  // `probe` > 0: the same with `probe` bytes if the first sample's first
  // page is not in the page cache (one mincore; probed() tells).
  BatchLookup(const Reader::State& s, const std::vector<std::shared_ptr<Env>>& envs,
            at::ArrayRef<size_t> indices, std::vector<ReadTxn>& txns, size_t ahead = 0, size_t probe = 0);
  // Waits for its reads still in flight (read_direct_records).
  ~BatchLookup();
  BatchLookup(const BatchLookup&) = delete;
  BatchLookup& operator=(const BatchLookup&) = delete;

  // The batch requested its pages because its first sample was not cached.
  bool probed() const { return probed_; }

  // Parses sample i (called for i = 0, 1, ... in order) into `views`.
  // `defer_checksum` (a reader with verify): the record's checksum is left to
  // the caller (check_copied); a record that does not parse is checked here
  // first, so that a damaged record reports its checksum as with verify.
  void parse_next(size_t i, std::vector<FieldView>& views, bool defer_checksum = false);

  // The record parsed last, and its index in its file.
  const MDB_val& record() const { return record_; }
  RecordContext record_context() const { return RecordContext{&record_env_->path(), record_local_}; }
  // Throws the file's own error when the record's file changed under its map
  // (its faulted pages read as zeros: a checksum would report them as damage).
  void check_record_file() const { record_env_->check_intact(); }

  // Pages requested ahead that were not cached.
  size_t missing() const { return missing_; }

  // keep_cache = false: drops the pages of the parsed samples (call once
  // their copies are done, while the transactions live).
  void evict();

 private:
  struct Found {
    const Env* env = nullptr;
    uint64_t local = 0;
    MDB_val value{0, nullptr};  // the record (null: a packed value's slot not yet found)
    MDB_val whole{0, nullptr};  // the LMDB value holding it
    uint32_t per_value = 1;
    bool direct = false;  // read through io_uring into this thread's buffer (read_direct_records()) or read ahead
    int32_t read = -1;    // its read still to wait for (an index of this thread's requests), or -1
  };
  // Read-only cursors are closed explicitly, here before their txns end
  // (the callers' txns outlive this object).
  struct CursorCloser {
    void operator()(MDB_cursor* c) const noexcept { mdb_cursor_close(c); }
  };
  struct Cursor {
    std::unique_ptr<MDB_cursor, CursorCloser> cursor;
    uint64_t at = 0;            // the key it points at
    MDB_val value{0, nullptr};  // its value
    bool positioned = false;
  };

  // Sample i's value; with `slice` (or one record per value) also its record.
  Found find(size_t i, bool slice = true);

  // f's record taken from the window read when it holds it.
  void take_from_window(Found& f, size_t file);

  // Cold: the records of found_ that direct_read_fd() takes and are not
  // cached, read through io_uring, as many as this thread's buffer holds in
  // `budget` bytes (page_request_bytes: the buffer never grows past it). The reads are submitted and
  // left in flight: parse_next() waits for each record's own (settle()), so
  // the first samples are copied while the later ones are read. Returns
  // their pages.
  size_t read_direct_records(size_t budget);

  // f's read done: it then points into the buffer (or, its read short or
  // failed, into the map, which reads it or raises the file's error).
  void settle(Found& f);

  // The value holding `local` in `file` (key local / per_value); `run`: the
  // next sample follows it.
  MDB_val seek(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run);

  // seek() in the B-tree.
  MDB_val search(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run);

  static constexpr uint64_t kUnknownVersion = ~uint64_t{0};
  static constexpr size_t kPrefetchBytes = 256;
  static constexpr size_t kPrefetchPages = 16;
  const Reader::State& s_;
  const std::vector<std::shared_ptr<Env>>& envs_;
  at::ArrayRef<size_t> indices_;
  std::vector<ReadTxn>& txns_;
  std::vector<Cursor> cursors_;
  std::vector<std::shared_ptr<ValueIndex>> index_;  // per file: its snapshot's values (or none)
  Found next_, after_;  // samples i + 1 and i + 2 while sample i is parsed
  bool keep_;
  std::vector<Found> found_;   // every sample, when requesting pages
  std::vector<Found> parsed_;  // keep_cache = false: what to evict
  size_t missing_ = 0;
  size_t direct_records_ = 0;  // settled through io_uring (io_stats' direct_records)
  size_t window_records_ = 0;   // taken from the window read (io_stats' window_records)
  const WindowRead* window_;     // this thread's WindowReadScope's, or null
  std::vector<uint64_t> versions_;  // per file: Env::file_version() once asked (take_from_window)
  bool reading_ = false;       // reads submitted (read_direct_records)
  bool probed_ = false;
  bool cold_ = false;  // the batch requests its pages (asked to, or its first sample was not cached)
  MDB_val record_{0, nullptr};
  const Env* record_env_ = nullptr;
  uint64_t record_local_ = 0;

  static bool cached(const MDB_val& v) { return record_cached(v); }
};

}  // namespace detail
}  // namespace torch_lmdb
