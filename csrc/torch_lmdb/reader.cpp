#include "torch_lmdb/reader.h"

#include <c10/util/Exception.h>
#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_sfence
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "torch_lmdb/detail/decode.h"
#include "torch_lmdb/detail/fault_guard.h"
#include "torch_lmdb/detail/lookup.h"
#include "torch_lmdb/detail/manifest.h"
#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/reader_state.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/detail/stage.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {

using detail::BufferPool;
using detail::check_intact;
using detail::cold_state;
using detail::ColdBatch;
using detail::DecodePool;
using detail::decode_threads;
using detail::decode_to_slot;
using detail::BatchLookup;
using detail::lookup;
using detail::parse;
using detail::request_pages;
using detail::value_pages;

namespace {

// Copies a row-major block of shape `src_shape` into a larger row-major
// block of shape `dst_shape` (padding), last dimension at a time.
void copy_padded(char* dst, const int64_t* dst_shape, const char* src, const int64_t* src_shape,
                 int ndim, size_t itemsize) {
  if (ndim == 0) {
    std::memcpy(dst, src, itemsize);
    return;
  }
  if (ndim == 1) {
    std::memcpy(dst, src, static_cast<size_t>(src_shape[0]) * itemsize);
    return;
  }
  size_t dst_inner = itemsize, src_inner = itemsize;
  for (int d = 1; d < ndim; ++d) {
    dst_inner *= static_cast<size_t>(dst_shape[d]);
    src_inner *= static_cast<size_t>(src_shape[d]);
  }
  for (int64_t i = 0; i < src_shape[0]; ++i)
    copy_padded(dst + i * dst_inner, dst_shape + 1, src + i * src_inner, src_shape + 1, ndim - 1,
                itemsize);
}


}  // namespace

namespace {

// ReaderOptions::cache_dir: a URL (or, with cache_dir, a local shard
// directory) becomes the local mirror of its staged shards, held by the State.
std::vector<std::string> stage_remote(std::vector<std::string> paths, Reader::State& s) {
  ReaderOptions& o = s.options;
  bool any = !o.cache_dir.empty();
  for (const auto& p : paths) any = any || detail::is_url(p);
  if (!any) return paths;
  for (auto& p : paths) {
    if (!detail::is_url(p) && o.cache_dir.empty()) continue;
    TORCH_CHECK_VALUE(!o.cache_dir.empty(), "'", p, "' is read through a local cache: set ReaderOptions::cache_dir");
    detail::StageOptions so;
    so.cache_dir = o.cache_dir;
    so.cache_limit = o.cache_limit;
    auto cache = std::make_shared<detail::ShardCache>(p, so);
    TORCH_CHECK_VALUE(o.cache_limit == 0 || cache->total_bytes() <= o.cache_limit, "cache_limit ", o.cache_limit,
                      " bytes is below the ", cache->total_bytes(), " bytes of '", p,
                      "', which a Reader stages whole: raise it, or read it with Python's LMDBDataset, whose "
                      "shard window needs less");
    cache->acquire_all();
    p = cache->local_dir();
    s.staged.push_back(std::move(cache));
  }
  o.cache_dir.clear();  // the paths are local now (refreshed() reopens them as they are)
  o.lock = 0;           // staged copies: read-only, no lock file
  return paths;
}

}  // namespace

Reader::Reader(std::vector<std::string> paths, ReaderOptions options)
    : state_(std::make_shared<State>()) {
  TORCH_CHECK_VALUE(!paths.empty(), "Reader needs at least one path");
  State& s = *state_;
  s.options = std::move(options);
  paths = stage_remote(std::move(paths), s);
  std::vector<detail::ShardExpectation> expect;
  s.paths = detail::expand_paths(paths, expect);
  s.offsets.push_back(0);
  const auto warn = s.options.warn ? s.options.warn
                                   : [](const std::string& m) { TORCH_WARN(m); };
  for (size_t i = 0; i < s.paths.size(); ++i) {
    const std::string& path = s.paths[i];
    auto env = Env::open(path, s.env_options());
    detail::Json meta;
    {
      ReadTxn txn = env->read_txn();
      meta = detail::read_meta(*env, txn.get());
    }
    detail::check_layout(meta, path);  // damage or an edit first: then what the keys say
    const auto info = detail::validate_meta(meta, path);  // every key and its JSON type, before the uses below
    auto invalid = [&](const std::string& why) {
      throw InvalidDatabaseError("'" + path + "' is not a readable torch_lmdb database: " + why, 0, path);
    };
    if (meta.value("format", std::string()) != "torch_lmdb") invalid("metadata 'format' is not \"torch_lmdb\"");
    if (!meta.contains("format_version") || !meta["format_version"].is_number_integer()) invalid("no 'format_version'");
    const int64_t version = meta["format_version"].get<int64_t>();
    if (version < kMinFormatVersion || version > kMaxFormatVersion)
      invalid("format version " + std::to_string(version) + " (this torch_lmdb reads versions " +
              std::to_string(kMinFormatVersion) + " to " + std::to_string(kMaxFormatVersion) + ")");
    if (meta.value("byte_order", std::string("little")) != "little") invalid("byte order is not little-endian");
    if (!meta.contains("num_samples") || !meta["num_samples"].is_number_unsigned()) invalid("no 'num_samples'");
    const size_t n = meta["num_samples"].get<size_t>();
    auto schema = detail::schema_from_json(meta.value("schema", detail::Json::array()), path);
    detail::check_shard(path, meta, n, schema, expect[i]);
    if (!meta.value("complete", false)) {
      s.complete = false;
      // A live writer's database is incomplete until it closes: nothing to report.
      if (!detail::writer_alive(path, *env) && detail::first_report(path))
        warn("torch_lmdb: '" + path + "' is incomplete (its writer did not close cleanly); reading its " +
             std::to_string(n) + " committed samples");
    }
    if (i == 0 || s.stored.empty()) {
      s.stored = schema;
    } else if (n > 0) {
      bool same = schema.size() == s.stored.size();
      for (size_t f = 0; same && f < schema.size(); ++f) {
        same = schema[f].name == s.stored[f].name && schema[f].kind == s.stored[f].kind &&
               schema[f].dtype == s.stored[f].dtype && schema[f].shape.size() == s.stored[f].shape.size();
        for (size_t d = 0; same && d < schema[f].shape.size(); ++d)
          if (schema[f].shape[d] != s.stored[f].shape[d]) s.stored[f].shape[d] = -1;
      }
      if (!same)
        throw InvalidDatabaseError("'" + path + "' has other fields or dtypes than '" + s.paths[0] +
                                       "'; files of one dataset must share a schema",
                                   0, path);
    }
    s.offsets.push_back(s.offsets.back() + n);
    s.meta_json.push_back(meta.dump());
    s.per_value.push_back(static_cast<uint32_t>(info.samples_per_value));
    s.envs.push_back(std::move(env));
  }
  s.generation.store(fork_generation());
  s.buffers = std::make_shared<BufferPool>(s.options.batch_cache_bytes);
  s.keep.assign(s.stored.size(), s.options.fields.empty() ? 1 : 0);
  for (const auto& name : s.options.fields) {
    auto it = std::find_if(s.stored.begin(), s.stored.end(), [&](const FieldSchema& f) { return f.name == name; });
    if (it == s.stored.end()) {
      std::string names;
      for (const auto& f : s.stored) names += (names.empty() ? "" : ", ") + f.name;
      TORCH_CHECK_VALUE(false, "unknown field '", name, "' in '", s.paths[0], "'; available: ", names);
    }
    s.keep[static_cast<size_t>(it - s.stored.begin())] = 1;
  }
  for (size_t f = 0; f < s.stored.size(); ++f)
    if (s.keep[f]) s.schema.push_back(s.stored[f]);
}

size_t Reader::size() const { return state_->offsets.back(); }

std::vector<Field> Reader::get_fields(size_t index) const {
  State& s = *state_;
  const auto loc = s.locate(index);
  const Env& env = *s.current_envs()[loc.first];
  thread_local std::vector<FieldView> views;
  std::vector<Field> out;
  ReadTxn txn = env.read_txn();
  MDB_val whole{0, nullptr};
  const MDB_val record = lookup(env, txn.get(), loc.second, s.per_value[loc.first], &whole);
  parse(env, record, loc.second, s, views, s.options.verify, whole, s.per_value[loc.first]);
  out.reserve(s.schema.size());
  for (size_t f = 0; f < views.size(); ++f)
    if (s.keep[f]) out.push_back(Field{views[f].name_str(), views[f].kind, to_tensor(views[f])});
  env.check_intact();  // a fault contained while reading (detail/fault_guard.h): nothing read is returned
  return out;
}

std::vector<Sample> Reader::get_many(at::ArrayRef<size_t> indices) const {
  State& s = *state_;
  const auto& envs = s.current_envs();
  std::vector<ReadTxn> txns(envs.size());
  thread_local std::vector<FieldView> views;
  std::vector<Sample> out;
  out.reserve(indices.size());
  BatchLookup samples(s, envs, indices, txns);
  for (size_t i = 0; i < indices.size(); ++i) {
    samples.parse_next(i, views);
    Sample sample;
    sample.reserve(s.schema.size());
    for (size_t f = 0; f < views.size(); ++f)
      if (s.keep[f]) sample.insert(views[f].name_str(), to_tensor(views[f]));
    out.push_back(std::move(sample));
  }
  check_intact(envs);
  return out;
}

namespace {

// A compressed payload for the decode helpers, and where it goes.
struct Decode {
  FieldView view;
  char* dst;
};

// One output of read_batch_fixed: a tensor field's batch tensor (`dst`,
// `slot` bytes a sample) or a str/bytes field's values (`blobs`).
struct Out {
  size_t field;
  char* dst = nullptr;
  size_t slot = 0;
  Batch::Blobs* blobs = nullptr;
};

// The outputs of a batch of B samples, shaped from sample 0's views `v`.
void allocate_outputs(const Reader::State& s, const std::vector<FieldView>& v, size_t B, Batch& batch,
                      std::vector<at::Tensor>& tensors, std::vector<Out>& outs) {
  for (size_t f = 0; f < s.stored.size(); ++f) {
    if (!s.keep[f]) continue;
    const FieldSchema& field = s.stored[f];
    Out o{f};
    if (field.kind != FieldKind::Tensor) {
      batch.blobs.push_back(Batch::Blobs{field.name, field.kind, {}});
      batch.blobs.back().values.reserve(B);
      o.blobs = &batch.blobs.back();
    } else {
      std::vector<int64_t> shape{static_cast<int64_t>(B)};
      shape.insert(shape.end(), v[f].sizes, v[f].sizes + v[f].ndim);
      tensors.push_back(s.buffers->empty(shape, field.dtype, v[f].data));
      o.dst = static_cast<char*>(tensors.back().data_ptr());
      o.slot = v[f].nbytes;
    }
    outs.push_back(o);
  }
}

// Helpers when the batch's compressed payloads, estimated from sample 0's
// (`v`), come to kParallelBytes (fewer helpers for smaller batches); null:
// this thread decodes them all. The helpers take the items of `decodes`
// (reserved here, never reallocated while they read it) as they are published.
std::unique_ptr<DecodePool::Job> start_decode_helpers(const std::vector<Out>& outs, const std::vector<FieldView>& v,
                                                      size_t B, unsigned threads, std::vector<Decode>& decodes) {
  constexpr size_t kParallelBytes = size_t{256} << 10;
  size_t compressed = 0;
  for (const Out& o : outs)
    if (o.blobs == nullptr && o.slot && v[o.field].codec != Codec::None)  // a column: about its share of the frame
      compressed += v[o.field].column_bytes != 0 ? v[o.field].nbytes : v[o.field].stored;
  const size_t estimate = compressed * B;
  if (threads <= 1 || estimate < kParallelBytes) return nullptr;
  decodes.reserve(B * outs.size());
  const Decode* items = decodes.data();
  return std::make_unique<DecodePool::Job>(
      static_cast<unsigned>(std::min<size_t>(threads - 1, estimate / (kParallelBytes / 2))),
      [items](size_t k) { decode_payload(items[k].view, items[k].dst); });
}

// Whether sample i's tensor fields (views `v`) keep sample 0's shapes (`first`).
bool same_shapes(size_t i, const std::vector<FieldView>& v, const std::vector<FieldView>& first,
                 const std::vector<Out>& outs) {
  if (i == 0) return true;
  for (const Out& o : outs) {
    if (o.blobs != nullptr) continue;
    const FieldView& fv = v[o.field];
    const FieldView& f0 = first[o.field];
    if (fv.ndim != f0.ndim || !std::equal(fv.sizes, fv.sizes + fv.ndim, f0.sizes)) return false;
  }
  return true;
}

// A reader with verify, on a CPU where hashing while copying takes one pass:
// the record is hashed while its raw tensor payloads are copied into their
// slots (`place`; otherwise hashed only, in the same prefetching pass, and
// copied after by copy_sample), and the hash is compared before anything else
// of the sample is used (a Blosc payload is decoded only from a record that
// passed). Throws the checksum's CorruptedError naming the file and index.
// Returns whether the raw payloads were copied (false for a record that
// carries no checksum: nothing was checked either, as parse_record does).
bool copy_checked(size_t i, const BatchLookup& samples, const std::vector<FieldView>& v, const std::vector<Out>& outs,
                  bool place) {
  const MDB_val& record = samples.record();
  const char* base = static_cast<const char*>(record.mv_data);
  uint16_t flags = 0;
  std::memcpy(&flags, base + 6, 2);  // (the record parsed: its header is there)
  if ((flags & 1) == 0) return false;
  const size_t body = record.mv_size - 8;
  thread_local std::vector<detail::CopySpan> spans;
  spans.clear();
  for (const Out& o : outs) {
    const FieldView& fv = v[o.field];
    if (place && o.blobs == nullptr && o.slot != 0 && fv.codec == Codec::None && !fv.in_column && fv.nbytes != 0)
      spans.push_back(detail::CopySpan{fv.data, fv.nbytes, o.dst + i * o.slot});
  }
  std::sort(spans.begin(), spans.end(),
            [](const detail::CopySpan& a, const detail::CopySpan& b) { return a.src < b.src; });
  uint64_t stored;
  std::memcpy(&stored, base + body, 8);
  if (detail::hash_and_copy(base, body, spans.data(), spans.size()) != stored) {
    samples.check_record_file();
    throw_checksum_mismatch(samples.record_context());
  }
  return place;
}

// Sample i's fields (views `v`) into their slots: copied or decoded here, or
// handed to the helpers (`copied`: the raw tensor payloads are in place).
// False at the first tensor whose shape differs from sample 0's (`first`).
bool copy_sample(size_t i, const std::vector<FieldView>& v, const std::vector<FieldView>& first,
                 std::vector<Out>& outs, DecodePool::Job* job, std::vector<Decode>& decodes, bool around_cache,
                 bool copied) {
  constexpr size_t kPublishEvery = 4;  // items published at a time
  if (!copied && !same_shapes(i, v, first, outs)) return false;
  for (Out& o : outs) {
    const FieldView& fv = v[o.field];
    if (o.blobs != nullptr) {
      o.blobs->values.emplace_back(fv.data, fv.nbytes);
      continue;
    }
    if (o.slot == 0 || (copied && fv.codec == Codec::None)) continue;
    if (job && fv.codec != Codec::None && decodes.size() < decodes.capacity()) {
      decodes.push_back(Decode{fv, o.dst + i * o.slot});
      if (decodes.size() % kPublishEvery == 0) job->publish(decodes.size());
    } else {
      decode_to_slot(fv, o.dst + i * o.slot, around_cache);  // a copy, or Blosc straight into the batch
    }
  }
  return true;
}

// read_batch for batches whose tensor fields all keep the first sample's
// shape (the common case): the outputs are allocated from sample 0, then each
// sample is fetched and copied at once, so the views of one sample stay in
// cache (collecting every sample's views first cost 10-30 % on tiny samples).
// Returns false, having returned nothing, at the first shape that differs:
// the caller then takes the general path (padding, errors).
bool read_batch_fixed(const Reader::State& s, const std::vector<std::shared_ptr<Env>>& envs,
                      at::ArrayRef<size_t> indices, std::vector<ReadTxn>& txns, Batch& batch,
                      ColdBatch& cold, unsigned threads, bool around_cache) {
  const size_t B = indices.size();
  // Compressed payloads decoded on `threads` threads: helpers take them as
  // soon as their records are parsed (their views stay valid: the txns are
  // open until the caller returns), this thread takes the rest at the end.
  thread_local std::vector<Decode> decodes;
  decodes.clear();
  thread_local std::vector<FieldView> first, cur;
  thread_local std::vector<Out> outs;
  outs.clear();
  std::vector<at::Tensor> tensors;
  // Declared after the tensors: on an early return or an exception, its
  // destructor waits for the helpers before the tensors go.
  std::unique_ptr<DecodePool::Job> job;
  batch.blobs.reserve(s.stored.size());
  BatchLookup samples(s, envs, indices, txns, cold.ahead(), cold.probe());
  if (samples.probed()) cold.engaged();
  // verify: each record hashed while it is copied (copy_checked), one pass;
  // around the cache, hashed in that pass, then copied with non-temporal
  // stores (which need aligned destinations).
  const bool one_pass = s.options.verify && detail::hash_and_copy_is_one_pass();
  for (size_t i = 0; i < B; ++i) {
    std::vector<FieldView>& v = i == 0 ? first : cur;
    samples.parse_next(i, v, one_pass);
    if (i == 0) {
      allocate_outputs(s, v, B, batch, tensors, outs);
      job = start_decode_helpers(outs, v, B, threads, decodes);
    }
    bool copied = false;
    if (one_pass) {
      if (!same_shapes(i, v, first, outs)) {
        batch = Batch();
        return false;
      }
      copied = copy_checked(i, samples, v, outs, /*place=*/!around_cache);
    }
    if (!copy_sample(i, v, first, outs, job.get(), decodes, around_cache, copied)) {
      batch = Batch();
      return false;  // (the general path reads the batch again: nothing is evicted yet)
    }
  }
#if defined(__SSE2__)
  if (around_cache) _mm_sfence();  // non-temporal stores are ordered before the batch is handed over
#endif
  if (job) {
    job->publish(decodes.size());
    job->finish();
  }
  size_t t = 0;
  for (const Out& o : outs) {
    const std::string& name = s.stored[o.field].name;
    batch.order.push_back(name);
    if (o.blobs == nullptr) batch.tensors.insert(name, std::move(tensors[t++]));
  }
  samples.evict();
  cold.done(samples.missing(), s);
  return true;
}

using Views = std::vector<std::vector<FieldView>>;  // per sample, per stored field

// The largest size of field f in each dimension over the batch (`shape`,
// from sample 0's on entry); true when some sample's shape differs, `odd`
// the first such.
bool common_shape(const FieldSchema& field, size_t f, const Views& views, at::ArrayRef<size_t> indices,
                  std::vector<int64_t>& shape, size_t* odd) {
  const FieldView& first = views[0][f];
  const int ndim = first.ndim;
  bool varies = false;
  for (size_t i = 1; i < indices.size(); ++i) {
    const FieldView& v = views[i][f];
    bool same = v.ndim == ndim;
    for (int d = 0; same && d < ndim; ++d) same = v.sizes[d] == first.sizes[d];
    if (!same) {
      if (!varies) *odd = i;
      varies = true;
      TORCH_CHECK_VALUE(v.ndim == ndim, "field '", field.name, "' has ", v.ndim, " dims at index ",
                        indices[i], " but ", ndim, " at index ", indices[0]);
      for (int d = 0; d < ndim; ++d) shape[d] = std::max(shape[d], v.sizes[d]);
    }
  }
  return varies;
}

// The batch tensor of a field, [B, shape...]: from the caller's allocator
// (checked) or the buffer pool.
at::Tensor allocate_output(const Reader::State& s, const FieldSchema& field, size_t B,
                           const std::vector<int64_t>& shape, const BatchOptions& options, const void* first_data) {
  std::vector<int64_t> out_shape{static_cast<int64_t>(B)};
  out_shape.insert(out_shape.end(), shape.begin(), shape.end());
  at::Tensor out = options.allocate ? options.allocate(out_shape, field.dtype)
                                    : s.buffers->empty(out_shape, field.dtype, first_data);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == field.dtype &&
                  out.sizes() == at::IntArrayRef(out_shape),
              "the batch allocator returned a tensor of the wrong shape or dtype for field '",
              field.name, "'");
  return out;
}

// Each sample's field f padded into its slot of `out` (filled with the pad
// value first); returns `<name>_lengths`, each sample's sizes.
at::Tensor pad_into(at::Tensor& out, size_t f, const Views& views, size_t B, const std::vector<int64_t>& shape,
                    size_t slot, double pad_value) {
  const int ndim = static_cast<int>(shape.size());
  const size_t itemsize = out.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  out.fill_(pad_value);
  at::Tensor lengths = at::empty({static_cast<int64_t>(B), ndim}, at::kLong);
  int64_t* len = lengths.data_ptr<int64_t>();
  for (size_t i = 0; i < B; ++i) {
    const FieldView& v = views[i][f];
    std::copy(v.sizes, v.sizes + ndim, len + i * ndim);
    if (v.nbytes == 0) continue;
    const char* src = v.data;
    if (v.codec != Codec::None) {  // decompressed beside, then padded into its slot
      thread_local std::vector<char> decoded;
      decoded.resize(v.nbytes);
      decode_payload(v, decoded.data());
      src = decoded.data();
    }
    copy_padded(dst + i * slot, shape.data(), src, v.sizes, ndim, itemsize);
  }
  return lengths;
}

// Field f of every sample into one batch tensor (padded on request, with
// `<name>_lengths`), added to `batch`.
void collate_field(const Reader::State& s, const FieldSchema& field, size_t f, const Views& views,
                   at::ArrayRef<size_t> indices, const BatchOptions& options, Batch& batch) {
  const size_t B = indices.size();
  const FieldView& first = views[0][f];
  std::vector<int64_t> shape(first.sizes, first.sizes + first.ndim);
  size_t odd = 0;
  const bool varies = common_shape(field, f, views, indices, shape, &odd);
  const bool pad = options.pad || std::find(options.pad_fields.begin(), options.pad_fields.end(),
                                            field.name) != options.pad_fields.end();
  TORCH_CHECK_VALUE(!varies || pad, "field '", field.name, "' has shape ", views[odd][f].shape(),
                    " at index ", indices[odd], " but ", first.shape(), " at index ", indices[0],
                    "; set BatchOptions::pad (or name it in BatchOptions::pad_fields) to pad it");
  at::Tensor out = allocate_output(s, field, B, shape, options, first.data);
  size_t slot = c10::elementSize(field.dtype);
  for (int64_t d : shape) slot *= static_cast<size_t>(d);
  if (!varies) {
    char* dst = static_cast<char*>(out.data_ptr());
    for (size_t i = 0; i < B; ++i)
      if (slot) decode_payload(views[i][f], dst + i * slot);
    batch.tensors.insert(field.name, std::move(out));
    return;
  }
  at::Tensor lengths = pad_into(out, f, views, B, shape, slot, options.pad_value);
  batch.tensors.insert(field.name, std::move(out));
  batch.tensors.insert(field.name + "_lengths", std::move(lengths));
}

// A str/bytes field's values, one a sample.
Batch::Blobs collect_blobs(const FieldSchema& field, size_t f, const Views& views, size_t B) {
  Batch::Blobs blobs{field.name, field.kind, {}};
  blobs.values.reserve(B);
  for (size_t i = 0; i < B; ++i) blobs.values.emplace_back(views[i][f].data, views[i][f].nbytes);
  return blobs;
}

}  // namespace

Batch Reader::read_batch(at::ArrayRef<size_t> indices, const BatchOptions& options) const {
  State& s = *state_;
  const auto& envs = s.current_envs();
  const size_t B = indices.size();
  TORCH_CHECK_VALUE(B > 0, "read_batch needs at least one index");
  ColdBatch cold(s.options);
  if (!options.allocate) {  // (a caller's allocator is only asked for the outputs it gets)
    std::vector<ReadTxn> txns(envs.size());
    Batch batch;
    if (read_batch_fixed(s, envs, indices, txns, batch, cold, decode_threads(s.options, options),
                         options.nontemporal_stores)) {
      check_intact(envs);
      return batch;
    }
  }
  // Views point into the map: every txn stays open until the copies are done.
  std::vector<ReadTxn> txns(envs.size());
  thread_local Views views;
  if (views.size() < B) views.resize(B);
  BatchLookup samples(s, envs, indices, txns, cold.ahead(), cold.probe());
  if (samples.probed()) cold.engaged();
  for (size_t i = 0; i < B; ++i) samples.parse_next(i, views[i]);

  Batch batch;
  for (size_t f = 0; f < s.stored.size(); ++f) {
    if (!s.keep[f]) continue;
    const FieldSchema& field = s.stored[f];
    batch.order.push_back(field.name);
    if (field.kind != FieldKind::Tensor) {
      batch.blobs.push_back(collect_blobs(field, f, views, B));
    } else {
      collate_field(s, field, f, views, indices, options, batch);
    }
  }
  samples.evict();
  cold.done(samples.missing(), s);
  check_intact(envs);
  return batch;
}

Batch Reader::read_batch(at::ArrayRef<size_t> indices, const BatchOptions& options,
                         const detail::WindowRead* window) const {
  detail::WindowReadScope scope(window);
  return read_batch(indices, options);
}

std::shared_ptr<const detail::WindowRead> Reader::read_window(at::ArrayRef<size_t> indices,
                                                            std::shared_ptr<const detail::WindowRead> reuse) const {
  return detail::read_window(*state_, indices, std::move(reuse));
}

const std::vector<FieldSchema>& Reader::schema() const { return state_->schema; }

std::string Reader::metadata_json(size_t file) const {
  TORCH_CHECK_INDEX(file < state_->meta_json.size(), "file ", file, " out of range for ",
                    state_->meta_json.size(), " files");
  return state_->meta_json[file];
}

const std::vector<std::string>& Reader::paths() const { return state_->paths; }

std::vector<size_t> Reader::file_sizes() const {
  std::vector<size_t> out;
  for (size_t i = 0; i + 1 < state_->offsets.size(); ++i)
    out.push_back(state_->offsets[i + 1] - state_->offsets[i]);
  return out;
}

int Reader::reader_count(size_t file) const {
  const auto& envs = state_->current_envs();
  TORCH_CHECK_INDEX(file < envs.size(), "file ", file, " out of range for ", envs.size(), " files");
  return envs[file]->reader_count();
}

size_t Reader::map_size(size_t file) const {
  const auto& envs = state_->current_envs();
  TORCH_CHECK_INDEX(file < envs.size(), "file ", file, " out of range for ", envs.size(), " files");
  return envs[file]->map_size();
}

bool Reader::complete() const { return state_->complete; }

Reader::IoStats Reader::io_stats() const {
  const State& s = *state_;
  return IoStats{s.io_batches.load(), s.io_page_request_batches.load(), s.io_pages.load(), s.io_pages_ahead.load(),
                 s.io_request_pages_calls.load(), s.io_direct_records.load(), s.io_window_records.load(),
                 s.io_window_bytes.load()};
}

const ReaderOptions& Reader::options() const { return state_->options; }

bool Reader::requesting_pages() const {
  const ReaderOptions& o = state_->options;
  if (o.page_request_bytes == 0 || o.page_requests == PageRequests::Never) return false;
  return o.page_requests == PageRequests::Always || cold_state.cold;
}

Reader::PagesRequested Reader::request_pages(at::ArrayRef<size_t> indices) const {
  State& s = *state_;
  const size_t budget = s.options.page_request_bytes;
  if (budget == 0 || s.options.page_requests == PageRequests::Never || indices.empty()) return {};
  const auto& envs = s.current_envs();
  const size_t n = s.offsets.back();
  std::vector<ReadTxn> txns(envs.size());
  std::vector<std::shared_ptr<ValueIndex>> index(envs.size());
  thread_local std::vector<MDB_val> values;
  values.clear();
  size_t bytes = 0;
  uint64_t last_key = 0;
  size_t last_file = 0;
  // A record its batch reads through io_uring (detail::direct_read_fd) is
  // not requested here: its pages would be read twice (keep_cache = false:
  // into the page cache the batch then bypasses). Its lookup is kept in the
  // value index, so the batch finds its value there without a search.
  for (const size_t index_at : indices) {
    if (bytes >= budget) break;
    if (index_at >= n) continue;
    const auto [file, local] = s.locate(index_at);
    const Env& env = *envs[file];
    if (txns[file].get() == nullptr) {
      txns[file] = env.read_txn();
      index[file] = env.value_index(txns[file].get(), s.options.value_index_bytes / ValueIndex::kSlotBytes);
      detail::request_leaves_once(env, txns[file].get());  // (lookups ahead fault the leaves in one at a time)
    }
    // A packed value is requested whole (a stream's chunk of samples is
    // mostly runs of the file: the value's other samples come next).
    const uint32_t per_value = s.per_value[file];
    const uint64_t key = local / per_value;
    if (!values.empty() && per_value > 1 && key == last_key && file == last_file) continue;
    MDB_val v = index[file] ? index[file]->find(key) : MDB_val{0, nullptr};
    if (v.mv_data == nullptr) {
      unsigned char kbuf[8];
      encode_key(key, kbuf);
      MDB_val k{8, kbuf};
      if (detail::guarded_get(txns[file].get(), env.samples_dbi(), &k, &v) != MDB_SUCCESS) continue;
      if (!env.value_inside(v)) continue;  // the read of this sample raises it
      if (index[file]) index[file]->store(key, v);  // (checked again where a batch takes it)
    } else if (!env.value_inside(v)) {
      continue;
    }
    const auto [begin, end] = value_pages(v);
    if (detail::direct_read_fd(env, v, per_value, s.options) >= 0) continue;
    last_key = key;
    last_file = file;
    values.push_back(v);
    bytes += end - begin;
  }
  // Samples at most 16 KiB apart (B-tree pages between runs of values): one
  // read for them and what lies between.
  const size_t missing = detail::request_pages(values, budget, uintptr_t{16} << 10);
  s.io_request_pages_calls.fetch_add(1, std::memory_order_relaxed);
  s.io_pages_ahead.fetch_add(missing, std::memory_order_relaxed);
  // Uncached pages ahead: this thread still reads from the disk (its own
  // batches find the pages requested here cached, which alone would end it).
  if (missing > 0) cold_state.warm_batches = 0;
  return {bytes, missing};
}

Reader Reader::refreshed() const {
  Reader fresh(state_->paths, state_->options);
  fresh.state_->staged = state_->staged;  // the same leases
  return fresh;
}

}  // namespace torch_lmdb
