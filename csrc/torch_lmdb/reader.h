// torch_lmdb/reader.h -- random access to one or several torch_lmdb files.
//
// Contract
// - A Reader is a cheap handle (one shared_ptr): copy it freely; all copies
//   share the opened environments. Every member function is thread-safe.
// - Fork safety: the Reader notices that it runs in a forked child
//   (a pthread_atfork handler marks it) and reopens its environments there lazily; the
//   parent's handles are never used or closed by the child.
// - Several paths form one dataset, concatenated in the order given. The
//   sample count of each file is read once, at open (a consistent prefix even
//   while a writer appends); refreshed() gives a Reader of the current counts.
// - Damaged files: every value LMDB returns is checked to lie inside the data
//   file (CorruptedError otherwise, never SIGBUS); a file shorter than its
//   meta page claims is refused at open. A record whose payload bytes were
//   altered in place is caught by its checksum (`verify`, on by default);
//   with verify off it is returned as stored.
// - Batched reads (read_batch, and so every batched path) keep the values
//   they find in the file's value index (one per file and process, see
//   ReaderOptions::value_index_bytes): a sample read again in the same
//   snapshot skips the B-tree search. A value is used only in the snapshot
//   it was found in (any commit, of this process or another, starts a new
//   index) and never after the map moved, and is checked like any value
//   LMDB returns.
// - Returned tensors own their memory (copied out of the map before the read
//   transaction ends).
// - Errors: index out of range -> c10::IndexError; corrupted records ->
//   CorruptedError naming the path and index; a shape mismatch in a batch
//   without padding -> c10::ValueError naming the field.
#pragma once

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "torch_lmdb/record.h"

namespace torch_lmdb {
namespace detail {
struct WindowRead;  // detail/lookup.h
}  // namespace detail

/// When read_batch requests a batch's pages: it looks the batch's samples
/// up before copying them and requests their uncached pages at once (see
/// ReaderOptions::page_request_bytes).
enum class PageRequests {
  Auto,    ///< once a batch of the thread had to wait for the disk
  Always,  ///< every batch (data known to be cold)
  Never,
};
/// The old name of PageRequests (ReaderOptions::lookahead became page_requests).
using LookaheadMode [[deprecated("renamed PageRequests")]] = PageRequests;

struct ReaderOptions {
  /// Check each record's xxh3 checksum on read (batched reads hash a record
  /// while copying it: docs/benchmarks/notes.md gives the cost). false
  /// returns a record whose payload bytes were altered in place as stored.
  bool verify = true;
  /// 1 lock, 0 MDB_NOLOCK, -1 automatic fallback on read-only storage.
  int lock = -1;
  /// The operating system's readahead of the data file (MDB_NORDAHEAD when
  /// false); off by default (random access). Not page_requests, which asks
  /// for exactly the pages a batch needs.
  bool os_readahead = false;
  unsigned max_readers = 1024;
  /// Subset of fields to return (empty = all), in the stored order.
  std::vector<std::string> fields;
  /// Receives warnings (lock fallback, incomplete database); default TORCH_WARN.
  std::function<void(const std::string&)> warn;
  /// Bytes of freed batch buffers (>= 64 KiB each) kept for reuse by
  /// read_batch: a recycled buffer is already paged in, a fresh one costs a
  /// page fault per 4 KiB. 0 disables the cache.
  size_t batch_cache_bytes = size_t{256} << 20;
  /// Cold reads (read_batch, and so every batched path). With page requests,
  /// a batch first looks every sample up, then asks the kernel for all
  /// their pages that are not in the page cache at once (mincore, then
  /// madvise MADV_WILLNEED: asynchronous reads, a deep queue for the
  /// device), then copies while the reads complete. Auto: a thread's
  /// batches request their pages once one of its batches had a major page fault,
  /// and stop after 4 batches in a row found every page cached (warm reads
  /// pay one getrusage() a batch).
  PageRequests page_requests = PageRequests::Auto;
  /// Bytes of a batch whose pages are requested at once, in batch order
  /// (the bound of the reads in flight per reading thread; 0: no page requests).
  /// BatchStream (and so iter_batches and the C++ make_loader) also
  /// requests the coming batches' pages while it reads, a chunk at a time:
  /// one shuffle window of a block shuffle when its pages fit in this many
  /// bytes (its samples then go out as a few long sequential reads), else
  /// half this many bytes. At most two chunks lie ahead of the batch being
  /// read: at most 2 x page_request_bytes (see request_pages()).
  size_t page_request_bytes = size_t{128} << 20;
  /// false: once a batch is copied, its samples' pages are dropped from the
  /// page cache (and from this process's map), so an epoch over data much
  /// larger than RAM does not evict the rest of the machine's cache. It
  /// drops them for every process: use it for data nobody else reads hot.
  bool keep_cache = true;
  /// A cold batch (one that requests its pages) reads its records that are
  /// not in the page cache through io_uring, many reads in flight, into this
  /// thread's buffer instead of faulting them into the map: with keep_cache
  /// = false with O_DIRECT (no page-cache insertion, nothing to drop
  /// afterwards), with keep_cache = true buffered (the pages stay cached for
  /// the next epoch), at most page_request_bytes of them a batch (the rest
  /// go through the map). IoStats::direct_records counts them. Records that
  /// share a page with others (small or packed values), cached records and
  /// file systems without O_DIRECT are read through the map as before.
  bool direct_reads = true;
  /// Threads that decode a batch's compressed payloads (read_batch, and so
  /// get_batch): the calling thread and up to decode_threads - 1 helpers of
  /// a process-wide pool (each payload is decompressed alone, straight into
  /// its batch slot). 0: automatic (the machine's cores, at most 4); 1: on
  /// the calling thread only. Batches whose compressed payloads total less
  /// than 256 KiB decode on the calling thread. BatchStream's reading
  /// threads always decode on their own thread (they already run side by
  /// side), and so do batches that pad a compressed field or take their
  /// tensors from BatchOptions::allocate.
  unsigned decode_threads = 0;
  /// Bytes of the lookup table of a file's values that batched reads
  /// (read_batch, and so every batched path) fill as they go: a sample read
  /// again in the same snapshot of the file (the next epoch, when nothing
  /// was committed since) skips LMDB's B-tree search. 16 bytes per LMDB
  /// value, one table per file and process (shared by its Readers, made
  /// anew after a commit); a file with more values than fit gets none.
  /// 0 disables it.
  size_t value_index_bytes = size_t{64} << 20;
  /// A path that is an http:// or https:// URL of a shard directory, or
  /// s3://bucket/prefix (credentials and endpoint from the AWS environment
  /// variables), is read from copies staged in this node-local directory;
  /// so is a local shard directory (e.g. on a shared file system) when
  /// cache_dir is set. Every shard is fetched (several at a time), checked
  /// against the manifest's size and xxh3, and held by this Reader and its
  /// copies; the staged copies open read-only without a lock file. README
  /// "Remote and shared storage".
  std::string cache_dir;
  /// Bytes the cache directory may hold (0: no limit). A Reader stages the
  /// whole dataset, so a limit below the dataset's size is a ValueError
  /// naming both (make_loader, and Python's LMDBDataset, read such a dataset
  /// in shard windows instead: LoaderOptions::shard_window).
  uint64_t cache_limit = 0;
};

/// How read_batch collates variable-shape fields.
struct BatchOptions {
  /// Pad every tensor field whose shape varies within the batch.
  bool pad = false;
  /// Or only these fields.
  std::vector<std::string> pad_fields;
  /// Fill value of padding.
  double pad_value = 0;
  /// Optional allocator of the output tensors (e.g. shared memory in a Python
  /// DataLoader worker); called once per field and batch.
  std::function<at::Tensor(at::IntArrayRef, at::ScalarType)> allocate;
  /// Decoding threads of this batch (0: ReaderOptions::decode_threads).
  unsigned decode_threads = 0;
  /// Raw payloads of 4 KiB or more are copied into the batch with
  /// non-temporal stores (x86), which do not first read its lines into the
  /// cache: for a batch that waits before its use (BatchStream sets it).
  bool nontemporal_stores = false;
};

/// A collated batch. Tensor fields are stacked to [B, ...]; a padded field
/// `x` also gets `x_lengths`, int64 [B, ndim], each sample's own shape.
/// str/bytes fields are returned as lists of strings in `blobs`.
struct Batch {
  struct Blobs {
    std::string name;
    FieldKind kind = FieldKind::Bytes;
    std::vector<std::string> values;
  };
  Sample tensors;
  std::vector<Blobs> blobs;
  /// Field names in stored order (tensors and blobs interleaved).
  std::vector<std::string> order;
};

/// xxh3-64 of a file's metadata (Reader::metadata_json) in canonical form
/// (keys sorted at every depth, no whitespace: docs/FORMAT.md) as 16
/// lowercase hex digits: the per-shard checksum a shard manifest stores.
/// c10::ValueError when the text is not JSON.
std::string metadata_checksum(const std::string& meta_json);

class Reader {
 public:
  /// Opens every path (directories written by Writer). A path that is a
  /// directory holding `manifest.json` (format "torch_lmdb.manifest",
  /// version 1) stands for the shards it lists, in its order; each shard must
  /// have the sample count, metadata checksum and schema the manifest gives
  /// (InvalidDatabaseError naming the shard and the manifest otherwise;
  /// NotFoundError for a listed shard that is missing). A directory of shard
  /// databases without a manifest is an unfinished write: InvalidDatabaseError
  /// naming the directory. paths() returns the expanded shard paths.
  /// Throws NotFoundError, InvalidDatabaseError (not torch_lmdb, other format
  /// version, schemas of the files differ), LockError.
  /// `Reader({"a.lmdb", "b.lmdb"})`, `Reader({path})`, `Reader("a.lmdb")` and
  /// `Reader(paths_vector)` all compile and mean what they say (the
  /// initializer_list overload wins every braced list).
  Reader(std::vector<std::string> paths, ReaderOptions options = {});
  Reader(std::initializer_list<std::string> paths, ReaderOptions options = {})
      : Reader(std::vector<std::string>(paths), std::move(options)) {}
  explicit Reader(const std::string& path, ReaderOptions options = {})
      : Reader(std::vector<std::string>{path}, std::move(options)) {}

  /// Total number of samples.
  size_t size() const;
  /// Sample `index` with field kinds. Negative indices are not accepted here.
  std::vector<Field> get_fields(size_t index) const;
  /// Sample `index` (str/bytes as uint8 tensors).
  Sample get(size_t index) const { return to_sample(get_fields(index)); }
  /// Several samples, one read transaction per file for the whole call.
  std::vector<Sample> get_many(at::ArrayRef<size_t> indices) const;
  /// Reads and collates a batch: one read txn, one allocation per field, one
  /// copy per sample and field straight into the batch tensor.
  Batch read_batch(at::ArrayRef<size_t> indices, const BatchOptions& options = {}) const;
  /// The same, taking the records `window` holds (read_window()) from its buffer.
  Batch read_batch(at::ArrayRef<size_t> indices, const BatchOptions& options, const detail::WindowRead* window) const;

  /// Reads the records of these samples that are not in the page cache and
  /// that a batch would read through io_uring (direct_reads: records on pages
  /// of their own) into one buffer, at most page_request_bytes of them in the
  /// given order: their file ranges are merged (across gaps of up to 64 KiB)
  /// and read in requests of up to 1 MiB, so a block-shuffled window goes out
  /// as a few long sequential reads (O_DIRECT with keep_cache = false). For a
  /// caller that knows which samples come next: BatchStream reads each window
  /// of a block shuffle ahead this way when its first records are not cached.
  /// A batch read with the result takes those records from the buffer
  /// (checked as any record) as long as no writer committed since; a read
  /// that failed or fell short leaves its records to the batch. Null when
  /// nothing is to be read (direct_reads off, PageRequests::Never,
  /// page_request_bytes 0, or the first 32 such records cached). `reuse`: a
  /// result no one else holds lends its buffer.
  std::shared_ptr<const detail::WindowRead> read_window(at::ArrayRef<size_t> indices,
                                                      std::shared_ptr<const detail::WindowRead> reuse = nullptr) const;

  /// Requests the pages of these samples that are not in the page cache
  /// (madvise MADV_WILLNEED: asynchronous reads), at most page_request_bytes of
  /// them in the given order. Their page ranges are merged in address order
  /// (across gaps of up to 16 KiB), so samples that lie together (a
  /// block-shuffled window) go out as long sequential reads. For a caller
  /// that knows which samples come next: BatchStream asks for the coming
  /// batches while it reads. Only a hint: an index out of range or a record
  /// that cannot be found is skipped (its read raises the error). Returns
  /// the bytes of the samples' pages and how many of those pages were not
  /// cached; nothing with PageRequests::Never or page_request_bytes 0. With
  /// direct_reads, records on pages of their own are left out: their batches
  /// read them through io_uring.
  struct PagesRequested {
    size_t bytes = 0;
    size_t missing_pages = 0;
  };
  PagesRequested request_pages(at::ArrayRef<size_t> indices) const;
  [[deprecated("renamed request_pages")]] PagesRequested prefetch(at::ArrayRef<size_t> indices) const {
    return request_pages(indices);
  }
  /// Whether this thread's batches request their pages now: Always, or Auto
  /// once one of the thread's batches met the disk (until 4 batches in a row
  /// find every page cached); never with PageRequests::Never.
  bool requesting_pages() const;
  [[deprecated("renamed requesting_pages")]] bool looking_ahead() const { return requesting_pages(); }
  const ReaderOptions& options() const;

  /// Stored fields (after the `fields` subset), with -1 for varying dims.
  const std::vector<FieldSchema>& schema() const;
  /// The `meta` table of file `file` as one JSON object text.
  std::string metadata_json(size_t file = 0) const;
  const std::vector<std::string>& paths() const;
  /// Samples in each file.
  std::vector<size_t> file_sizes() const;
  /// Reader-table slots in use in file `file` (-1 without locking).
  int reader_count(size_t file = 0) const;
  /// Map size in bytes of file `file`.
  size_t map_size(size_t file = 0) const;
  /// True if every file was closed cleanly by its writer.
  bool complete() const;
  /// A Reader of the same files and options that sees their samples as they
  /// are now (sample counts, completeness and schema re-read; the
  /// environments are shared). This Reader and its copies are unchanged, so
  /// a thread still reading through them is safe.
  Reader refreshed() const;

  /// Counters of this Reader and its copies (all threads), for tests and
  /// benchmarks: batches read, batches that requested their pages, the
  /// uncached pages they requested, and the uncached pages and the calls of
  /// request_pages() (a stream's requests for its coming batches).
  struct IoStats {
    uint64_t batches = 0;
    uint64_t page_request_batches = 0;
    uint64_t pages_requested = 0;
    uint64_t pages_requested_ahead = 0;
    uint64_t request_pages_calls = 0;
    uint64_t direct_records = 0;  ///< records read with O_DIRECT (direct_reads)
    uint64_t window_records = 0;  ///< records batches took from read_window()'s buffers
    uint64_t window_bytes = 0;    ///< bytes read_window() read
  };
  IoStats io_stats() const;

  struct State;  // shared by copies; defined in reader.cpp

 private:
  std::shared_ptr<State> state_;
};

}  // namespace torch_lmdb
