// torch_lmdb/writer.h -- creating and appending torch_lmdb databases.
//
// Contract
// - Crash consistency: samples are committed in batches (every
//   `commit_every` samples or `commit_bytes` bytes); `num_samples` and the
//   schema are updated in the same transaction as the samples they count, so
//   a reader always sees a consistent prefix, even after SIGKILL. The
//   `complete` flag is false from the moment a writer opens the database and
//   becomes true only in close().
// - Map size: the writer grows the map itself (doubling) on MDB_MAP_FULL and
//   replays the batch; `map_size` is only the initial size.
// - One writer per database: a second Writer on the same path (in this or
//   another process) raises LockError. A Writer must not be used in a forked
//   child (raises c10::Error there).
// - Schema: the first sample fixes the field names, kinds, dtypes and ndims;
//   later samples must match (ValueError/TypeError naming the field and the
//   index); dimensions that differ are recorded as -1.
// - Commits run on a background thread: write() encodes the sample (copying
//   every value, so the caller may reuse its buffers at once) into a batch
//   buffer; a full batch goes to a committer thread (mdb_put, write(2),
//   fdatasync, with the disk's writeback started while write(2) still runs)
//   while write() goes on encoding the next one. Without compression on
//   threads (below), at most one batch is in flight, so memory stays
//   bounded by two batch buffers of about `commit_bytes` each, kept for the
//   Writer's lifetime.
// - Compression on several threads (`compress_threads` above 1 when some
//   field has a codec; by default for Zstd, and on more than 2 cores): write()
//   stores each sample raw in the batch buffer; a full batch's committer
//   thread compresses it on `compress_threads` threads (itself among them)
//   while the previous batch is committed and write() goes on encoding the
//   next one, then commits it after the previous one. Two batches may be in
//   flight: memory holds three batch buffers of about `commit_bytes` (raw
//   bytes, in this mode) and up to three compressed copies, kept for the
//   Writer's lifetime. The records are byte for byte those that
//   compress_threads = 1 writes. An error compressing a batch (out of
//   memory) is then an error of its commit (below); a batch's error never
//   keeps the batch before it from committing.
// - Errors of a commit (MapFullError without auto_grow, a full disk, ...)
//   surface at the next write(), flush() or close(), and every later call
//   raises them again: the samples committed before stay readable; reopen in
//   append mode to continue.
// - Thread safety: a Writer is not thread-safe; use it from one thread.
// - The destructor commits pending samples but does not mark the database
//   complete (call close()); it never throws.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "torch_lmdb/record.h"

namespace torch_lmdb {

struct WriterOptions {
  /// false: create (refuses a database that already holds samples);
  /// true: append to an existing database, or create it.
  bool append = false;
  /// Initial map size in bytes (0: 64 MiB, or the existing file's size).
  size_t map_size = 0;
  /// Commit after this many samples (0: default 4096) ...
  size_t commit_every = 0;
  /// ... or this many encoded bytes (0: default 16 MiB; raw bytes when
  /// compression runs on threads), whichever comes first.
  size_t commit_bytes = 0;
  /// Append an xxh3-64 checksum to every record.
  bool checksum = true;
  /// Grow the map on MDB_MAP_FULL (otherwise MapFullError is raised).
  bool auto_grow = true;
  /// Free JSON object text stored as metadata `user` (merged into existing
  /// user metadata when appending). Empty = none.
  std::string user_json;
  /// Codec of every tensor field: "none", "lz4", "zstd" (Blosc with byte
  /// shuffle), optionally with a Blosc level 1-9: "zstd:5" (default 5); ""
  /// (default): none in a new database, and when appending, with no
  /// field_compression either, each field keeps the codec the database's
  /// metadata names (a database whose records use several codecs lists them
  /// all in its metadata: `compression.<field>.codecs`).
  /// str/bytes fields are always stored raw, and so is a payload below
  /// kMinCompressBytes or one that Blosc does not make smaller (per record:
  /// each record names its fields' codecs). A bad spec raises
  /// c10::ValueError in the constructor.
  std::string compression;
  /// Per-field codecs (field name -> spec as above), overriding
  /// `compression`. A name that is not a field of the samples raises
  /// c10::ValueError naming it (at the first sample, or in the constructor
  /// when appending).
  std::map<std::string, std::string> field_compression;
  /// Format version of a new database: 0 = automatic (kColumnarFormatVersion
  /// = 5 when a codec is set, kCompactFormatVersion = 4 when only
  /// samples_per_value > 1, else kFormatVersion = 2), 5 (compact records in
  /// packed values whose small fields may be in columns: kColumnGroupBytes;
  /// not with samples_per_value 1, and a database whose first sample fills a
  /// value alone is version 4),
  /// 4 (compact records: fields named by their schema position, about 20
  /// bytes of header per field less; no columns), 2, or 1 (readable by
  /// torch_lmdb before compression; no codec may be set). Appending keeps the
  /// database's version, unless a codec is set on a version 1 database: it
  /// then becomes version 2.
  int format_version = 0;
  /// Samples per LMDB value of a new database (docs/FORMAT.md "Packed
  /// values"): 1 = one record per value; K > 1 = values of K records
  /// (format version 3: LMDB gives every value above ~2 KiB whole 4 KiB
  /// pages of its own, so small compressed records waste up to half their
  /// space alone); 0 = automatic: 1 without compression, else enough
  /// records for kPackedValueBytes (from the first sample's size). At most
  /// kMaxSamplesPerValue. Appending keeps the database's (another explicit
  /// value raises c10::ValueError). Reads decode one record either way.
  size_t samples_per_value = 0;
  /// Threads that compress a batch when some field has a codec (see the
  /// Contract): 0 = automatic (the machine's cores, at most 8; 1 when LZ4
  /// is the only codec and the machine has 2 cores or fewer); 1 = each
  /// sample is compressed on the calling thread in write(). Without a codec
  /// nothing is compressed and no thread is started.
  size_t compress_threads = 0;
};

/// The value size automatic packing aims at (WriterOptions::samples_per_value).
constexpr size_t kPackedValueBytes = size_t{128} << 10;
/// The most WriterOptions::compress_threads allows (more raises c10::ValueError).
constexpr size_t kMaxCompressThreads = 256;

class Writer {
 public:
  Writer(const std::string& path, WriterOptions options = {});
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  Writer(Writer&&) noexcept;
  Writer& operator=(Writer&&) noexcept;

  /// Appends a sample; returns its index.
  size_t write(const std::vector<Field>& fields);
  size_t write(const Sample& sample);
  /// Commits the pending samples and waits for every commit.
  void flush();
  /// Flushes, marks the database complete, syncs it to disk. Idempotent.
  void close();
  /// Replaces (merges) the user metadata; committed with the next flush.
  void set_user_metadata(const std::string& json_object);
  /// Marks the database as shard `index` of the `count` shards of the shard
  /// directory `dataset_id` (metadata `shard`, committed with the next
  /// flush; what the manifest's checks compare with: docs/FORMAT.md).
  /// c10::ValueError unless index < count and the id is not empty.
  void set_shard(const std::string& dataset_id, size_t index, size_t count);

  /// Samples in the database, including pending ones.
  size_t size() const;
  /// Samples committed so far (lags size() by the batches not yet committed).
  size_t committed() const;
  size_t map_size() const;
  const std::string& path() const;
  bool closed() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace torch_lmdb
