// The writer's batches compressed on several threads (write_batch.h).
#include "torch_lmdb/detail/write_batch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <system_error>
#include <thread>

#include "torch_lmdb/detail/record_format.h"

namespace torch_lmdb::detail {

namespace {

// Records [begin, end) of raw batch `b` encoded with the codecs into `p`.
void compress_range(const WriteBatch& b, const BatchEncoding& e, size_t begin, size_t end,
                    WriteBatchPart& p) noexcept {
  p.bytes.clear();
  p.ends.clear();
  p.stored.assign(b.fields.size(), 0);
  p.error = nullptr;
  try {
    std::vector<FieldView> views;
    std::vector<Field> fields(b.fields.size());
    for (size_t f = 0; f < b.fields.size(); ++f) {
      fields[f].name = b.fields[f].name;
      fields[f].kind = b.fields[f].kind;
    }
    EncodeOptions eo;
    eo.checksum = e.checksum;
    eo.version = e.version;
    eo.compression = e.codecs;
    eo.stored_bytes = &p.stored;
    for (size_t i = begin; i < end; ++i) {
      const size_t start = i == 0 ? 0 : b.ends[i - 1];
      const RecordContext ctx{e.path, b.first + i};
      parse_record(b.bytes.data() + start, b.ends[i] - start, /*verify_checksum=*/false, ctx, views, &b.fields);
      TORCH_CHECK(views.size() == fields.size(), "record ", b.first + i, " has ", views.size(),
                  " fields, the schema ", fields.size());
      for (size_t f = 0; f < views.size(); ++f)
        fields[f].tensor = at::from_blob(const_cast<char*>(views[f].data), views[f].shape(),
                                         at::TensorOptions().dtype(views[f].dtype));
      append_record(fields, eo, p.bytes);
      p.ends.push_back(p.bytes.size());
    }
  } catch (...) {
    p.error = std::current_exception();
  }
}

}  // namespace

// The raw records no longer needed, the parts are joined in the batch's own
// buffer: a buffer swapped in instead would leave the next batch a smaller
// one to grow, and fresh pages cost more than this copy.
void compress_batch(WriteBatch& b, const BatchEncoding& e) {
  const size_t n = b.size();
  b.stored.assign(b.fields.size(), 0);
  if (n == 0) return;
  const size_t threads = std::clamp<size_t>(e.threads, 1, n);
  b.parts.resize(threads);
  std::vector<size_t> bounds(threads + 1, n);
  bounds[0] = 0;
  const size_t total = b.bytes.size();
  for (size_t t = 1, i = 0; t < threads; ++t) {
    const size_t target = total / threads * t;
    while (i < n && b.ends[i] <= target) ++i;
    bounds[t] = std::max(i, bounds[t - 1]);
  }
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  try {
    for (size_t t = 1; t < threads; ++t)
      helpers.emplace_back([&b, &e, &bounds, t] { compress_range(b, e, bounds[t], bounds[t + 1], b.parts[t]); });
  } catch (const std::system_error&) {
    // No more threads (a process limit): this one compresses the ranges left.
  }
  compress_range(b, e, bounds[0], bounds[1], b.parts[0]);
  for (size_t t = helpers.size() + 1; t < threads; ++t) compress_range(b, e, bounds[t], bounds[t + 1], b.parts[t]);
  for (auto& h : helpers) h.join();
  for (size_t t = 0; t < threads; ++t)
    if (b.parts[t].error) std::rethrow_exception(b.parts[t].error);
  b.bytes.clear();
  size_t k = 0;
  for (size_t t = 0; t < threads; ++t) {
    const size_t offset = b.bytes.size();
    b.bytes.append(b.parts[t].bytes);
    for (const size_t end : b.parts[t].ends) b.ends[k++] = offset + end;
    for (size_t f = 0; f < b.fields.size(); ++f) b.stored[f] += b.parts[t].stored[f];
  }
}

// Compressing a batch on threads costs a pass more over the samples (stored
// raw, then read back from memory: a 16 MiB batch leaves the cache), and LZ4
// compresses at about the speed of that pass. On 2 cores, where the caller
// and the committer already take about a core each, LZ4 on 2 threads wrote
// 0.60-0.63x the uncompressed writer's MB/s against 0.64-0.69x on the calling
// thread, while Zstd wrote 1.7-1.9x faster on 2 threads than on one
// (benchmarks/bench_writer.py on tmpfs, docs/benchmarks/notes.md).
size_t automatic_compress_threads(const std::vector<Compression>& codecs) {
  const size_t cores = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, kAutoCompressThreads);
  const bool zstd =
      std::any_of(codecs.begin(), codecs.end(), [](const Compression& c) { return c.codec == Codec::BloscZstd; });
  return cores > 2 || zstd ? cores : 1;
}

}  // namespace torch_lmdb::detail
