// torch_lmdb/detail/write_batch.h -- the writer's batches of encoded records,
// and their compression on several threads (WriterOptions::compress_threads).
//
// Contract
// - compress_batch() re-encodes the records of a raw batch (encoded without
//   codecs or checksum) with the codecs, on `threads` threads (the calling
//   one among them), each a run of records of about equal bytes, and joins
//   them in order in the batch's own buffer: the records are byte for byte
//   those append_record() with the codecs writes, and `stored` counts their
//   stored payload bytes per field. An error (out of memory) is thrown on the
//   calling thread and leaves the batch raw; threads that cannot be started
//   leave their records to the calling thread.
// - A batch is compressed by one call at a time; different batches may be
//   compressed at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/record.h"

namespace torch_lmdb::detail {

/// WriterOptions::compress_threads: the most the automatic choice takes
/// (the most allowed: kMaxCompressThreads, writer.h).
constexpr size_t kAutoCompressThreads = 8;

/// One thread's share of a batch compressed on several threads.
struct WriteBatchPart {
  std::string bytes;
  std::vector<size_t> ends;
  std::vector<uint64_t> stored;  // per schema field
  std::exception_ptr error;
};

/// Encoded records waiting for their transaction: one buffer (capacity kept
/// from batch to batch, so steady-state writes touch no fresh pages) and the
/// end offset of each record. (Not named Batch: torch_lmdb::Batch is the
/// reader's collated batch, and two classes of one name in one program made
/// the linker give the writer the reader's inline move constructor; make
/// test-odr fails the link on that.)
struct WriteBatch {
  std::string bytes;
  std::vector<size_t> ends;
  size_t first = 0;       // index of the first record
  bool complete = false;  // mark the database complete in this commit
  Json schema, user, compression, shard;  // metadata committed with these samples
  // Compression on several threads: `raw` records are encoded with the
  // codecs by their committer thread, which reads what the caller's thread
  // goes on changing as it was at the hand-over: the schema, and the decoded
  // bytes per field so far (for metadata `compression`).
  bool raw = false;
  std::vector<FieldSchema> fields;  // also set (with `codecs`) when values get columns (detail/columns.h)
  std::vector<Compression> codecs;
  std::vector<uint64_t> raw_bytes, stored;  // per field; `stored`: this batch's compressed payloads
  std::vector<WriteBatchPart> parts;
  size_t size() const noexcept { return ends.size(); }
  void clear() noexcept {
    bytes.clear();
    ends.clear();
    raw = false;
    stored.clear();
    raw_bytes.clear();
  }
};

/// How the records of a raw batch are encoded for good.
struct BatchEncoding {
  const std::string* path = nullptr;  // the database (for error messages)
  uint16_t version = kFormatVersion;
  bool checksum = true;
  const std::vector<Compression>* codecs = nullptr;  // per schema field
  size_t threads = 1;
};

/// See the Contract.
void compress_batch(WriteBatch& batch, const BatchEncoding& encoding);

/// WriterOptions::compress_threads 0: the cores (at most kAutoCompressThreads),
/// except for LZ4 alone on a machine of 2 cores or fewer (write_batch.cpp says why).
size_t automatic_compress_threads(const std::vector<Compression>& codecs);

}  // namespace torch_lmdb::detail
