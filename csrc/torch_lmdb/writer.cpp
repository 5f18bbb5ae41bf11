#include "torch_lmdb/writer.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <torch/csrc/api/include/torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <system_error>
#include <thread>

#include "torch_lmdb/detail/conform.h"
#include "torch_lmdb/detail/env_files.h"
#include "torch_lmdb/detail/field_codecs.h"
#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/packer.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/detail/write_batch.h"
#include "torch_lmdb/detail/writeback.h"
#include "torch_lmdb/errors.h"
#include "torch_lmdb/version.h"

namespace torch_lmdb {

namespace {
// Chosen by measurement (benchmarks/commit_size.py). Samples: 4096 per
// commit was the fastest count. Bytes (16 KiB samples, with the committer
// thread, min of 4 runs, us/sample on ext4 / tmpfs): 4 MiB 19.3 / 12.0,
// 8 MiB 18.1 / 13.1, 16 MiB 18.1 / 12.4, 32 MiB 19.3 / 14.1, 64 MiB
// 21.7 / 19.0: a batch that stays in cache and in one malloc heap is cheaper
// to commit, and the pipeline fills and drains sooner. 16 MiB also bounds
// the memory of the two batch buffers.
constexpr size_t kDefaultCommitEvery = 4096;
constexpr size_t kDefaultCommitBytes = size_t{16} << 20;
// The batch buffer is reserved up front up to this size (then grows).
constexpr size_t kMaxReserve = size_t{256} << 20;
#define TORCH_LMDB_STR_(x) #x
#define TORCH_LMDB_STR(x) TORCH_LMDB_STR_(x)
constexpr const char* kTorchVersion = TORCH_LMDB_STR(TORCH_VERSION_MAJOR) "." TORCH_LMDB_STR(
    TORCH_VERSION_MINOR) "." TORCH_LMDB_STR(TORCH_VERSION_PATCH);

using Batch = detail::WriteBatch;

// A batch buffer's capacity, reserved once and kept (spares): its whole
// 2 MiB pieces are backed by transparent huge pages where the kernel offers
// them (MADV_HUGEPAGE), so a fresh 16 MiB buffer takes 8 page faults rather
// than 4096 (on a virtual machine, a fault costs microseconds).
void reserve_batch(std::string& s, size_t bytes) {
  s.reserve(bytes);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(s.data()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(s.data()) + s.capacity()) & ~(kHuge - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// At least the bytes a record of `fields` encodes to (payloads, the names
// and headers, what a codec may add to data it cannot compress).
size_t record_bound(const std::vector<Field>& fields) {
  size_t n = 1024;
  for (const Field& f : fields)
    n += static_cast<size_t>(f.tensor.numel()) * f.tensor.element_size() + f.name.size() + 128;
  return n + n / 64;
}

// A batch handed to its committer thread; `done` is ready when the thread
// has committed it (or given up).
struct Flight {
  std::unique_ptr<Batch> batch;
  std::thread thread;
  std::shared_future<void> done;
};
}  // namespace

struct Writer::Impl {
  std::string path;
  WriterOptions options;
  std::shared_ptr<Env> env;
  uint64_t generation = 0;
  int lock_fd = -1;
  bool claimed = false;  // env->claim_writer() succeeded
  std::atomic<size_t> committed{0};
  // Double buffering: the caller's thread encodes into `pending` while a
  // committer thread writes the batch in flight (mdb_put copies, write(2)
  // and the fdatasync of the commit overlap the encoding of the next batch).
  // A committer is a thread per batch: a transaction is begun and committed
  // on one thread (lmdb.h: a write txn belongs to its thread) and no thread
  // outlives its batch. Raw batches (compression on several threads) have
  // up to two in flight: a thread compresses its batch while the one before
  // commits, then waits for it (`done`), so commits keep the batches' order.
  Batch pending;
  std::deque<Flight> flights;                   // oldest first
  std::vector<std::unique_ptr<Batch>> spares;   // batch buffers kept for their capacity
  std::mutex failure_mutex;
  std::exception_ptr failure;       // a failed commit: sticky (see writer.h); the first one
  std::atomic<bool> failed{false};  // set by a committer after `failure`
  std::vector<FieldSchema> schema;
  detail::Json user = detail::Json::object();
  detail::Json shard;  // metadata `shard` (null: none)
  bool meta_dirty = false;
  bool closed = false;
  std::vector<Field> ordered;
  uint16_t version = kFormatVersion;      // of the records written
  detail::FieldCodecs coding;              // each field's codec and payload byte counts
  Compression default_codec;
  bool compresses = false;                 // some field has a codec
  // Packed values (samples_per_value > 1; detail/packer.h): `per_value`
  // records a value, 0 until the first sample of a new database chooses it;
  // `columns` in a format version 5 database. The committer thread alone
  // uses the packer's tail.
  detail::Packer packer{path};
  uint32_t& per_value = packer.per_value;
  bool& columns = packer.columns;
  // Compression on several threads (writer.h): `pending` holds raw records
  // (`pending_raw`), which its committer re-encodes with the codecs on
  // `compress_threads` threads (compress_batch).
  size_t compress_threads = 1;
  bool pending_raw = false;
  bool defers_compression() const noexcept { return compresses && compress_threads > 1; }

  // Codecs per schema field, once the schema is known; checks that every
  // field named in options.field_compression exists.
  void resolve_codecs() {
    coding.resolve(schema, default_codec, options.field_compression, path);
    if (options.compress_threads == 0) compress_threads = detail::automatic_compress_threads(coding.codecs);
  }

  // Appending: without a codec given (WriterOptions::compression "" and no
  // field_compression), each field keeps the codec the database's metadata
  // names; the codecs of the records already written are remembered when
  // this writer's differ (metadata `codecs`, so info() reports them all).
  void adopt_codecs(const detail::Json& old, size_t counted) {
    coding.adopt(old, counted, schema, options.compression.empty() && options.field_compression.empty(), path);
    compresses = compresses || coding.any();
    if (options.compress_threads == 0) compress_threads = detail::automatic_compress_threads(coding.codecs);
  }

  // Metadata `compression`: per field its codec and the stored vs decoded payload bytes.
  detail::Json compression_json() const { return coding.json(schema, coding.raw_bytes); }

  ~Impl() {
    if (fork_generation() == generation) {
      for (auto& f : flights)
        if (f.thread.joinable()) f.thread.join();
    } else if (!flights.empty()) {
      // In a forked child the handles name threads of the parent: never
      // join or destroy them there.
      (void)new std::deque<Flight>(std::move(flights));
    }
    release_files();
  }

  // Drops the writer's lock and its hold on the env (idempotent).
  void release_files() noexcept {
    if (fork_generation() != generation) return;  // a forked child holds none of them
    if (lock_fd >= 0) ::close(lock_fd);  // releases the fcntl lock
    lock_fd = -1;
    if (claimed && env) env->release_writer();
    claimed = false;
    env.reset();
  }

  void check_process() const {
    TORCH_CHECK(fork_generation() == generation, "the Writer of '", path,
                "' was created in another process (before fork()); create a new Writer in this process");
    TORCH_CHECK(!closed, "the Writer of '", path, "' is closed");
  }

  size_t size() const noexcept { return pending.first + pending.size(); }

  void put_common_meta(MDB_txn* txn, size_t num_samples, const detail::Json& schema_json,
                       const detail::Json& user_json, bool complete, const detail::Json& compression,
                       const detail::Json& shard_json) {
    if (!shard_json.is_null()) detail::put_meta(*env, txn, "shard", shard_json);
    if (version != kMinFormatVersion) detail::put_meta(*env, txn, "compression", compression);
    if (per_value > 1) {
      detail::put_meta(*env, txn, "format_version",
                       version != kCompactFormatVersion ? kPackedFormatVersion
                       : columns                        ? kColumnarFormatVersion
                                                        : kCompactFormatVersion);
      detail::put_meta(*env, txn, "samples_per_value", per_value);
    }
    detail::put_meta(*env, txn, "num_samples", num_samples);
    detail::put_meta(*env, txn, "schema", schema_json);
    detail::put_meta(*env, txn, "complete", complete);
    detail::put_meta(*env, txn, "user", user_json);
    // Last: the checksum of the keys that decide how records are read, as this txn holds them.
    detail::put_meta(*env, txn, detail::kLayoutChecksumKey, detail::layout_checksum(detail::read_meta(*env, txn)));
  }

  void grow(size_t needed) {
    const size_t current = env->map_size();
    const size_t target = std::max(current * 2, current + 2 * needed);
    env->set_map_size(target);
  }

  // Appending to a packed database whose last value holds fewer than
  // per_value records: they become the packer's tail (checked, so that a
  // damaged value is not carried on).
  void load_tail(size_t counted) {
    WriteTxn txn(*env);
    const uint64_t first = (counted - 1) / per_value * per_value;
    unsigned char kbuf[8];
    encode_key(first / per_value, kbuf);
    MDB_val k{8, kbuf}, v{0, nullptr};
    const int rc = mdb_get(txn.get(), env->samples_dbi(), &k, &v);
    if (rc == MDB_NOTFOUND)
      throw CorruptedError("cannot append to '" + path + "': the value of samples " + std::to_string(first) + " to " +
                               std::to_string(counted - 1) + " is missing; run `torch-lmdb verify`",
                           0, path);
    detail::check_mdb(rc, "mdb_get", path, "index " + std::to_string(first));
    env->check_value(v, "the value of samples from index " + std::to_string(first));
    packer.load_tail(v, counted, schema);
  }

  // Writes a batch (and its metadata) in one transaction; on MDB_MAP_FULL
  // grows the map and replays the whole batch. Runs on the committer thread.
  void write_batch(const Batch& b) {
    for (;;) {
      try {
        WriteTxn txn(*env);
        unsigned char kbuf[8];
        size_t start = 0;
        if (per_value > 1) {
          packer.put(*env, txn.get(), b);
        } else {
          for (size_t i = 0; i < b.size(); ++i) {
          encode_key(b.first + i, kbuf);
          MDB_val k{8, kbuf};
          MDB_val v{b.ends[i] - start, const_cast<char*>(b.bytes.data() + start)};
          detail::check_mdb(mdb_put(txn.get(), env->samples_dbi(), &k, &v, MDB_APPEND), "mdb_put",
                            path, "index " + std::to_string(b.first + i));
          start = b.ends[i];
          }
        }
        put_common_meta(txn.get(), b.first + b.size(), b.schema, b.user, b.complete, packer.with_columns(b), b.shard);
        detail::EarlyWriteback writeback(env->handle());
        txn.commit();
        if (per_value > 1) packer.commit();
        break;
      } catch (const MapFullError&) {
        if (!options.auto_grow) throw;
        grow(b.bytes.size() + (size_t{1} << 20));
      }
    }
    committed.store(b.first + b.size(), std::memory_order_release);
  }

  // Waits for the batches in flight; rethrows a failure (and keeps
  // rethrowing it: the writer is unusable after a failed commit).
  void wait() {
    while (!flights.empty()) retire_oldest();
    if (failure) std::rethrow_exception(failure);
  }

  void retire_oldest() {
    Flight& f = flights.front();
    if (f.thread.joinable()) f.thread.join();
    f.batch->clear();
    spares.push_back(std::move(f.batch));
    flights.pop_front();
  }

  void record_failure(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(failure_mutex);
    if (!failure) failure = std::move(e);
    failed.store(true, std::memory_order_release);
  }

  detail::BatchEncoding batch_encoding() const {
    detail::BatchEncoding e;
    e.path = &path;
    e.version = version;
    e.checksum = options.checksum;
    e.codecs = &coding.codecs;
    e.threads = compress_threads;
    return e;
  }

  // A compressed raw batch whose turn to commit has come (the batches before
  // it are committed): the totals and the metadata that depend on them.
  void account_compressed(Batch& b) {
    for (size_t f = 0; f < b.stored.size() && f < coding.stored_bytes.size(); ++f) coding.stored_bytes[f] += b.stored[f];
    b.compression = coding.json(b.fields, b.raw_bytes);
    if (per_value == 0 && b.size() > 0) choose_per_value(b.ends[0]);
    b.raw = false;
  }

  // A new database: its first (encoded) record decides how many share an LMDB value.
  void choose_per_value(size_t record) {
    size_t chosen = options.samples_per_value;
    if (chosen == 0)
      chosen = compresses ? std::clamp<size_t>(kPackedValueBytes / std::max<size_t>(record, 1), 1, kMaxSamplesPerValue)
                          : 1;
    per_value = static_cast<uint32_t>(chosen);
  }

  // Hands the pending samples (and the metadata) to a committer thread;
  // with `sync`, waits for the commit. Raw batches may leave one batch
  // before them in flight, others none.
  void commit(bool complete, bool sync) {
    const bool raw = pending_raw;
    while (flights.size() > (raw ? 1u : 0u)) retire_oldest();
    if (failed.load(std::memory_order_acquire)) wait();  // rethrows
    pending.complete = complete;
    pending.schema = detail::schema_to_json(schema);
    pending.user = user;
    pending.shard = shard;
    pending.raw = raw;
    if (raw) {
      pending.fields = schema;
      pending.raw_bytes = coding.raw_bytes;
    } else {
      pending.compression = compression_json();
      if (columns) pending.fields = schema;
    }
    if (columns) pending.codecs = coding.codecs;
    std::unique_ptr<Batch> batch;
    if (spares.empty()) {
      batch = std::make_unique<Batch>();
    } else {
      batch = std::move(spares.back());
      spares.pop_back();
    }
    std::swap(*batch, pending);
    pending.clear();
    pending.first = batch->first + batch->size();
    pending_raw = false;
    meta_dirty = false;
    try {
      launch(std::move(batch));
    } catch (...) {
      record_failure(std::current_exception());  // the batch is lost: nothing after it may commit
      throw;
    }
    if (sync) wait();
  }

  // Starts the committer thread of `batch`: it compresses a raw batch, waits
  // for the batch before it to be committed, then commits its own.
  // A failure is recorded in the batches' order (a batch's own after the
  // previous batch is done): a later batch's failure never keeps an earlier
  // one from committing. Without a thread, the batch is lost and the writer
  // fails (sticky, like a failed commit).
  void launch(std::unique_ptr<Batch> batch) {
    std::shared_future<void> previous;
    if (!flights.empty()) previous = flights.back().done;
    auto promise = std::make_shared<std::promise<void>>();
    flights.push_back(Flight{std::move(batch), std::thread(), promise->get_future().share()});
    Batch* b = flights.back().batch.get();
    try {
      flights.back().thread = std::thread([this, b, previous, promise] {
        std::exception_ptr error;
        try {
          if (b->raw) detail::compress_batch(*b, batch_encoding());  // alongside the previous batch's commit
        } catch (...) {
          error = std::current_exception();
        }
        if (previous.valid()) previous.wait();
        try {
          if (error) std::rethrow_exception(error);
          if (!failed.load(std::memory_order_acquire)) {
            if (b->raw) account_compressed(*b);
            write_batch(*b);
          }
        } catch (...) {
          record_failure(std::current_exception());
        }
        promise->set_value();
      });
    } catch (...) {
      if (previous.valid()) previous.wait();
      record_failure(std::current_exception());
      promise->set_value();
      throw;
    }
  }

  // Orders `fields` like the schema (fixing the schema on the first sample).
  const std::vector<Field>& conform(const std::vector<Field>& fields, size_t index) {
    if (schema.empty()) {
      schema = detail::schema_of_first(fields, index);
      resolve_codecs();  // ValueError for a codec naming no field
      meta_dirty = true;
      return fields;
    }
    detail::conform_fields(schema, fields, index, path, ordered, &meta_dirty);
    return ordered;
  }
  // ---- the steps of Writer::Writer ----

  // The options checked; the records' version chosen (format_version 0:
  // the compact format when compressing or packing, else the default).
  void choose_version() {
    if (options.commit_every == 0) options.commit_every = kDefaultCommitEvery;
    if (options.commit_bytes == 0) options.commit_bytes = kDefaultCommitBytes;
    TORCH_CHECK_VALUE(options.compress_threads <= kMaxCompressThreads, "WriterOptions::compress_threads is ",
                      options.compress_threads, "; at most ", kMaxCompressThreads, " (0: automatic)");
    compress_threads = options.compress_threads != 0 ? options.compress_threads : 1;  // automatic: resolve_codecs
    const int asked = options.format_version;
    TORCH_CHECK_VALUE(asked == 0 || asked == kFormatVersion || asked == kMinFormatVersion ||
                          asked == kCompactFormatVersion || asked == kColumnarFormatVersion,
                      "WriterOptions::format_version ", asked, " cannot be written; this torch_lmdb writes ",
                      kMinFormatVersion, ", ", kFormatVersion, ", ", kCompactFormatVersion, " or ",
                      kColumnarFormatVersion, " (0: automatic)");
    default_codec = parse_compression(options.compression, "every field (WriterOptions::compression)");
    compresses = default_codec.codec != Codec::None;
    for (const auto& [name, spec] : options.field_compression)
      compresses = parse_compression(spec, "field '" + name + "'").codec != Codec::None || compresses;
    TORCH_CHECK_VALUE(!compresses || asked != kMinFormatVersion,
                      "format version 1 records cannot be compressed; drop the compression or write version 2");
    version = static_cast<uint16_t>(asked == kColumnarFormatVersion ? kCompactFormatVersion : asked);
    if (asked == 0) version = compresses || options.samples_per_value > 1 ? kCompactFormatVersion : kFormatVersion;
    columns = asked == kColumnarFormatVersion || (asked == 0 && compresses);
    TORCH_CHECK_VALUE(asked != kColumnarFormatVersion || options.samples_per_value != 1,
                      "format version 5 keeps small fields in columns of packed values; samples_per_value 1 "
                      "packs none (write version 4, or samples_per_value 0 or above 1)");
    TORCH_CHECK_VALUE(options.samples_per_value <= kMaxSamplesPerValue, "WriterOptions::samples_per_value is ",
                      options.samples_per_value, "; at most ", kMaxSamplesPerValue, " (0: automatic)");
    TORCH_CHECK_VALUE(options.samples_per_value <= 1 || asked != kMinFormatVersion,
                      "a format version 1 database holds one sample per value; drop samples_per_value or write version 2");
  }

  // The database's env, opened for writing. One writer per database: in this
  // process, a claim on the shared env; across processes, the lock on
  // writer.lock (detail/env_files.h).
  void open_and_claim() {
    EnvOptions eo;
    eo.readonly = false;
    eo.lock = 1;
    eo.map_size = options.map_size;
    env = Env::open(path, eo);
    generation = fork_generation();
    if (!env->claim_writer()) {
      throw LockError("another Writer of this process has '" + path + "' open; one writer at a time", EAGAIN, path);
    }
    claimed = true;
    lock_fd = detail::lock_writer_file(path);
  }

  // The database's metadata and how many LMDB values it holds.
  std::pair<detail::Json, size_t> read_existing() {
    WriteTxn txn(*env);
    detail::Json meta = detail::read_meta(*env, txn.get());
    MDB_stat st{};
    detail::check_mdb(mdb_stat(txn.get(), env->samples_dbi(), &st), "mdb_stat", path);
    return {std::move(meta), st.ms_entries};
  }

  // Appending: the records' version of the database (`meta`). A database
  // keeps its records' version (a version 1 database stays readable by older
  // torch_lmdb) unless this writer compresses into a version 1 database: it
  // then becomes version 2.
  void adopt_version(const detail::Json& meta) {
    int64_t stored = meta.value("format_version", int64_t{0});
    if (stored == kPackedFormatVersion) stored = kFormatVersion;  // its records
    columns = stored == kColumnarFormatVersion;
    if (columns) stored = kCompactFormatVersion;
    if (stored != kFormatVersion && stored != kMinFormatVersion && stored != kCompactFormatVersion)
      throw InvalidDatabaseError("cannot append to '" + path + "': format version " + std::to_string(stored) +
                                     ", this torch_lmdb writes versions " + std::to_string(kMinFormatVersion) +
                                     ", " + std::to_string(kFormatVersion) + " and " +
                                     std::to_string(kCompactFormatVersion),
                                 0, path);
    version = compresses && stored == kMinFormatVersion ? kFormatVersion : static_cast<uint16_t>(stored);
  }

  // Appending: samples per value (an empty database takes this writer's
  // choice; a database with samples keeps its own), checked against the
  // values the database holds; a partly filled last value becomes the tail.
  void adopt_packing(size_t counted, size_t samples_per_value, size_t existing_values) {
    if (counted > 0 || samples_per_value > 1) {
      TORCH_CHECK_VALUE(options.samples_per_value == 0 || options.samples_per_value == samples_per_value,
                        "'", path, "' holds ", samples_per_value, " sample(s) per value; cannot append with "
                        "samples_per_value ", options.samples_per_value, " (pass 0: keep the database's)");
      per_value = static_cast<uint32_t>(samples_per_value);
    }
    const uint32_t per = std::max<uint32_t>(per_value, 1);
    const size_t expected_values = counted / per + (counted % per != 0);
    if (expected_values != existing_values)
      throw CorruptedError("'" + path + "' counts " + std::to_string(counted) + " samples but holds " +
                               std::to_string(existing_values) + (per > 1 ? " values of up to " +
                               std::to_string(per) + " samples" : std::string(" samples")) +
                               "; run `torch-lmdb verify`",
                           0, path);
    if (per > 1 && counted % per != 0) load_tail(counted);
  }



  // Appending to the database of `meta` (an edited schema is not appended
  // to): its version, packing, schema, user metadata, shard and codecs.
  void continue_database(const detail::Json& meta, size_t existing_values) {
    detail::check_layout(meta, path);
    const auto info = detail::validate_meta(meta, path);  // each key and its JSON type, naming the path
    adopt_version(meta);
    const size_t counted = meta.value("num_samples", size_t{0});
    schema = detail::schema_from_json(meta.value("schema", detail::Json::array()), path);  // (the tail is parsed with it)
    adopt_packing(counted, info.samples_per_value, existing_values);
    user = meta.value("user", detail::Json::object());
    shard = meta.value("shard", detail::Json());
    committed = counted;
    pending.first = counted;
    if (schema.empty()) return;
    const detail::Json old = meta.value("compression", detail::Json());
    resolve_codecs();  // ValueError for a codec naming no field
    adopt_codecs(old, counted);
    coding.adopt_byte_counts(old, counted, schema);
  }

  // Marks the database incomplete before the first sample is written; a new
  // database (or one rewritten) gets its fixed metadata.
  void mark_incomplete(bool fresh, bool has_meta) {
    for (;;) {
      try {
        WriteTxn txn(*env);
        if (fresh) {
          detail::put_meta(*env, txn.get(), "format", "torch_lmdb");
          detail::put_meta(*env, txn.get(), "format_version", version);
          detail::put_meta(*env, txn.get(), "checksum", options.checksum ? "xxh3_64" : "none");
          detail::put_meta(*env, txn.get(), "byte_order", "little");
          detail::put_meta(*env, txn.get(), "created_with",
                           detail::Json{{"torch_lmdb", TORCH_LMDB_VERSION}, {"torch", kTorchVersion}});
        }
        if (has_meta && options.append) detail::put_meta(*env, txn.get(), "format_version", version);
        put_common_meta(txn.get(), committed, detail::schema_to_json(schema), user, false, compression_json(), shard);
        txn.commit();
        return;
      } catch (const MapFullError&) {
        if (!options.auto_grow) throw;
        grow(size_t{1} << 20);
      }
    }
  }
};

Writer::Writer(const std::string& path, WriterOptions options) : impl_(new Impl()) {
  Impl& w = *impl_;
  w.path = path;
  w.options = std::move(options);
  w.choose_version();
  w.open_and_claim();
  const auto [meta, existing_values] = w.read_existing();
  const bool has_meta = meta.contains("format");
  if (has_meta && meta["format"] != "torch_lmdb") {
    throw InvalidDatabaseError("'" + path + "' holds an LMDB database of another format", 0, path);
  }
  if (!w.options.append) {
    if (existing_values > 0) {
      const size_t n = has_meta ? meta.value("num_samples", existing_values) : existing_values;
      throw InvalidDatabaseError("'" + path + "' already holds " + std::to_string(n) +
                                     " samples; open it in append mode (mode=\"a\") or remove it first",
                                 0, path);
    }
  } else if (has_meta) {
    w.continue_database(meta, existing_values);
  }
  if (!w.options.user_json.empty()) set_user_metadata(w.options.user_json);
  w.mark_incomplete(!has_meta || !w.options.append, has_meta);
}

Writer::~Writer() {
  if (!impl_ || impl_->closed) return;
  try {
    // Keep what was written, but do not claim completeness (close() does).
    if (fork_generation() == impl_->generation) {
      impl_->wait();
      if (impl_->pending.size() > 0 || impl_->meta_dirty) impl_->commit(false, /*sync=*/true);
    }
  } catch (...) {
    // Destructors never throw; the committed prefix stays consistent.
  }
}

Writer::Writer(Writer&&) noexcept = default;
Writer& Writer::operator=(Writer&&) noexcept = default;

size_t Writer::write(const std::vector<Field>& fields) {
  Impl& w = *impl_;
  w.check_process();
  if (w.failed.load(std::memory_order_acquire)) w.wait();  // rethrows the commit's error
  const size_t index = w.size();
  const bool first = w.schema.empty();
  Batch& b = w.pending;
  try {
    const std::vector<Field>& ordered = w.conform(fields, index);
    // A batch the record may not fit in is committed first: the buffer never
    // grows (a copy of the whole batch into fresh memory).
    const size_t bound = record_bound(ordered);
    if (b.size() > 0 && b.bytes.size() + bound > b.bytes.capacity()) w.commit(false, /*sync=*/false);
    const size_t want = std::min(w.options.commit_bytes, kMaxReserve) + 4096;
    if (b.bytes.capacity() < want && b.size() == 0) reserve_batch(b.bytes, want);
    EncodeOptions eo;
    eo.version = w.version;
    if (w.defers_compression()) {
      eo.checksum = false;  // raw until its committer encodes it for good (compress_batch)
    } else {
      eo.checksum = w.options.checksum;
      eo.compression = &w.coding.codecs;
      eo.stored_bytes = &w.coding.stored_bytes;
    }
    append_record(ordered, eo, b.bytes);
    if (w.defers_compression()) w.pending_raw = true;
    for (size_t f = 0; f < ordered.size(); ++f)
      w.coding.raw_bytes[f] += static_cast<uint64_t>(ordered[f].tensor.numel()) * ordered[f].tensor.element_size();
  } catch (c10::Error& e) {
    if (first) w.schema.clear();  // a rejected first sample defines no schema
    e.add_context("while writing sample " + std::to_string(index) + " to '" + w.path + "'");
    throw;
  } catch (...) {
    if (first) w.schema.clear();
    throw;
  }
  b.ends.push_back(b.bytes.size());
  // (Raw records: their committer chooses, account_compressed.)
  if (!w.defers_compression() && w.per_value == 0) w.choose_per_value(b.bytes.size() - (b.size() > 1 ? b.ends[b.size() - 2] : 0));
  if (b.size() >= w.options.commit_every || b.bytes.size() >= w.options.commit_bytes)
    w.commit(false, /*sync=*/false);
  return index;
}

size_t Writer::write(const Sample& sample) {
  std::vector<Field> fields;
  fields.reserve(sample.size());
  for (const auto& item : sample) fields.push_back(Field{item.key(), FieldKind::Tensor, item.value()});
  return write(fields);
}

void Writer::flush() {
  impl_->check_process();
  impl_->wait();
  if (impl_->pending.size() > 0 || impl_->meta_dirty) impl_->commit(false, /*sync=*/true);
}

void Writer::close() {
  Impl& w = *impl_;
  if (w.closed) return;
  w.check_process();
  try {
    w.commit(true, /*sync=*/true);
    w.env->sync();
  } catch (...) {
    // Closed either way: the files are released (once no committer uses
    // them), the committed prefix stays.
    w.closed = true;
    while (!w.flights.empty()) w.retire_oldest();
    w.release_files();
    throw;
  }
  w.closed = true;
  w.release_files();
}

void Writer::set_shard(const std::string& dataset_id, size_t index, size_t count) {
  TORCH_CHECK_VALUE(!dataset_id.empty() && index < count, "set_shard: shard ", index, " of ", count,
                    " of dataset '", dataset_id, "' is not a shard");
  impl_->shard = detail::Json{{"dataset_id", dataset_id}, {"index", index}, {"count", count}};
  impl_->meta_dirty = true;
}

void Writer::set_user_metadata(const std::string& json_object) {
  auto parsed = detail::parse_user_json(json_object);  // ValueError: not an object, or too deep
  impl_->user.update(parsed);
  impl_->meta_dirty = true;
}

size_t Writer::size() const { return impl_->size(); }
size_t Writer::committed() const { return impl_->committed.load(std::memory_order_acquire); }
size_t Writer::map_size() const { return impl_->env ? impl_->env->map_size() : 0; }
const std::string& Writer::path() const { return impl_->path; }
bool Writer::closed() const { return impl_->closed; }

}  // namespace torch_lmdb
