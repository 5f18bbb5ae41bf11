#include "torch_lmdb/detail/lookup.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "torch_lmdb/detail/columns.h"
#include "torch_lmdb/detail/direct_io.h"
#include "torch_lmdb/detail/fault_guard.h"
#include "torch_lmdb/detail/tree_pages.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace detail {

namespace {

void check_layout(const std::vector<FieldView>& views, const std::vector<FieldSchema>& stored,
                  const std::string& path, uint64_t local) {
  bool ok = views.size() == stored.size();
  for (size_t f = 0; ok && f < views.size(); ++f)
    ok = views[f].name_equals(stored[f].name) && views[f].kind == stored[f].kind &&
         views[f].dtype == stored[f].dtype;
  if (!ok) {
    std::string got;
    for (const auto& v : views) got += (got.empty() ? "" : ", ") + v.printable_name() + ":" + dtype_name(v.dtype);
    throw CorruptedError("record at '" + path + "' index " + std::to_string(local) +
                             " does not match the schema in the metadata (fields: " + got + ")",
                         0, path);
  }
}

[[noreturn]] void missing_sample(const Env& env, uint64_t local) {
  throw CorruptedError("sample index " + std::to_string(local) + " is missing from '" + env.path() +
                           "' although its metadata counts it; run `torch-lmdb verify`",
                       MDB_NOTFOUND, env.path());
}

// The record of sample `local` in `v`, the value of its key (local /
// per_value): `v` itself, or its slot of a packed value.
MDB_val record_in(const Env& env, const MDB_val& v, uint64_t local, uint32_t per_value) {
  if (per_value <= 1) return v;
  const char* record = nullptr;
  size_t size = 0;
  if (!packed_record(v.mv_data, v.mv_size, local % per_value, per_value, &record, &size))
    throw CorruptedError("the value holding sample index " + std::to_string(local) + " of '" + env.path() +
                             "' (samples " + std::to_string(local / per_value * per_value) + " to " +
                             std::to_string(local / per_value * per_value + per_value - 1) +
                             ") is damaged or does not hold it; run `torch-lmdb verify`",
                         0, env.path());
  return MDB_val{size, const_cast<char*>(record)};
}

// An LMDB call reading sample `local` returned `rc`: throws what it means.
[[noreturn]] void read_failed(const Env& env, int rc, const char* what, uint64_t local) {
  env.check_intact();  // the file changed under the map: say so
  if (rc == MDB_NOTFOUND) missing_sample(env, local);
  // MDB_BAD_TXN: an earlier lookup in this transaction met damage
  // (a batch that requests its pages skips their failures; LMDB then
  // refuses the transaction).
  detail::check_mdb(rc == MDB_BAD_TXN ? MDB_CORRUPTED : rc, what, env.path(), "index " + std::to_string(local));
  throw CorruptedError(std::string(what) + " failed at '" + env.path() + "'", rc, env.path());  // (unreached)
}



// The LMDB value holding sample `local` of `env` (key local / per_value),
// looked up inside `txn`, bounds-checked.
MDB_val lookup_value(const Env& env, MDB_txn* txn, uint64_t local, uint32_t per_value) {
  unsigned char kbuf[8];
  encode_key(local / per_value, kbuf);
  MDB_val k{8, kbuf}, v{0, nullptr};
  const int rc = detail::guarded_get(txn, env.samples_dbi(), &k, &v);
  if (rc != MDB_SUCCESS) read_failed(env, rc, "mdb_get", local);
  env.check_sample_value(v, local);
  return v;
}

uintptr_t page_bytes() {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

void check_intact(const std::vector<std::shared_ptr<Env>>& envs) {
  for (const auto& env : envs) env->check_intact();
}

MDB_val lookup(const Env& env, MDB_txn* txn, uint64_t local, uint32_t per_value, MDB_val* whole) {
  const MDB_val value = lookup_value(env, txn, local, per_value);
  if (whole != nullptr) *whole = value;
  return record_in(env, value, local, per_value);
}

namespace {

// A compact record's fields in its value's columns (detail/columns.h).
void resolve(const Env& env, const MDB_val& whole, uint64_t local, uint32_t per_value, std::vector<FieldView>& views,
             bool verify) {
  RecordContext ctx{&env.path(), local};
  PackedColumns columns;
  const char* record = nullptr;
  size_t size = 0;
  if (per_value > 1)
    packed_record(whole.mv_data, whole.mv_size, local % per_value, per_value, &record, &size, &columns);
  try {
    resolve_columns(columns, views, verify, ctx);
  } catch (const CorruptedError&) {
    env.check_intact();
    throw;
  }
}

}  // namespace

void parse(const Env& env, const MDB_val& v, uint64_t local, const Reader::State& s,
           std::vector<FieldView>& views, bool verify, const MDB_val& whole, uint32_t per_value) {
  RecordContext ctx{&env.path(), local};
  // Records of a dataset usually share one layout: a record matching the
  // template needs neither parsing nor a schema check, once the template's
  // layout has passed the check for this reader.
  thread_local RecordTemplate layout;
  thread_local uint64_t layout_checked_for = 0;  // Reader::State::id, 0 = none
  // (A compact record is parsed against the schema: never a template hit.)
  bool hit;
  try {
    hit = parse_record_cached(v.mv_data, v.mv_size, verify, ctx, views, layout, &s.stored);
  } catch (const CorruptedError&) {
    env.check_intact();  // the file changed under the map (its lost pages read as zeros): say so
    throw;
  }
  if (hit && layout_checked_for == s.id) return;
  // A compact record's views name the schema's own fields (their names
  // point into it): nothing to check, and the template is not this record's.
  if (!views.empty() && !s.stored.empty() && views[0].name == s.stored[0].name.data()) {
    if (any_in_column(views)) resolve(env, whole, local, per_value, views, s.options.verify);
    return;
  }
  layout_checked_for = 0;
  check_layout(views, s.stored, env.path(), local);
  if (layout.size != 0) layout_checked_for = s.id;  // the template now holds this record's layout
  if (any_in_column(views)) resolve(env, whole, local, per_value, views, s.options.verify);
}

// ---- cold reads (ReaderOptions::page_request_bytes, keep_cache) -------------


long major_faults() {
  struct rusage u {};
  return ::getrusage(RUSAGE_THREAD, &u) == 0 ? u.ru_majflt : -1;
}

thread_local ColdState cold_state;

namespace {
// This thread's io_uring requests of its batch (BatchLookup::read_direct_records).
thread_local std::vector<DirectRead> direct_reads;
}  // namespace


std::pair<uintptr_t, uintptr_t> value_pages(const MDB_val& v) {
  const uintptr_t page = page_bytes();
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.mv_data);
  return {p & ~(page - 1), (p + v.mv_size + page - 1) & ~(page - 1)};
}

int direct_read_fd(const Env& env, const MDB_val& v, uint32_t per_value, const ReaderOptions& o) {
  if (!o.direct_reads || per_value > 1 || !owns_its_pages(v) || v.mv_size > (size_t{1} << 30)) return -1;
  return o.keep_cache ? env.buffered_fd() : env.direct_fd();
}

size_t request_pages(const std::vector<MDB_val>& values, size_t budget, uintptr_t gap) {
  thread_local std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  thread_local std::vector<unsigned char> resident;
  ranges.clear();
  size_t bytes = 0;
  for (const MDB_val& v : values) {
    if (bytes >= budget) break;
    const auto r = value_pages(v);
    if (r.second <= r.first) continue;
    ranges.push_back(r);
    bytes += r.second - r.first;
  }
  std::sort(ranges.begin(), ranges.end());
  size_t merged = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (merged > 0 && ranges[i].first <= ranges[merged - 1].second + gap) {
      ranges[merged - 1].second = std::max(ranges[merged - 1].second, ranges[i].second);
    } else {
      ranges[merged++] = ranges[i];
    }
  }
  const uintptr_t page = page_bytes();
  size_t missing = 0;
  for (size_t i = 0; i < merged; ++i) {
    const auto [begin, end] = ranges[i];
    resident.resize((end - begin) / page);
    size_t absent = resident.size();
    if (::mincore(reinterpret_cast<void*>(begin), end - begin, resident.data()) == 0)
      absent = static_cast<size_t>(std::count_if(resident.begin(), resident.end(),
                                                  [](unsigned char r) { return (r & 1) == 0; }));
    if (absent == 0) continue;
    // The kernel reads at most max(window read window, largest request) of one
    // MADV_WILLNEED call and drops the rest (a 16 MiB call read 2-4 MiB):
    // pieces of 128 KiB (the default window), which the block layer merges
    // back into large requests.
    constexpr uintptr_t kPiece = uintptr_t{128} << 10;
    for (uintptr_t at = begin; at < end; at += kPiece)
      ::madvise(reinterpret_cast<void*>(at), std::min(kPiece, end - at), MADV_WILLNEED);
    missing += absent;
  }
  return missing;
}

// ---- WindowRead ----------------------------------------------------------------

namespace {
thread_local const WindowRead* current_window = nullptr;
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

bool record_cached(const MDB_val& v) {
  if (v.mv_size == 0) return true;
  const uintptr_t page = page_bytes();
  const uintptr_t first = reinterpret_cast<uintptr_t>(v.mv_data) & ~(page - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(v.mv_data) + v.mv_size - 1) & ~(page - 1);
  // Every page of the record (its first and last of a longer one): a record
  // partly in the page cache (another reader's read-ahead) is read whole
  // from the disk rather than faulted in a page at a time.
  constexpr size_t kMost = 64;
  unsigned char in[kMost];
  const size_t pages = (last - first) / page + 1;
  if (pages <= kMost) {
    if (::mincore(reinterpret_cast<void*>(first), pages * page, in) != 0) return true;
    return std::all_of(in, in + pages, [](unsigned char c) { return (c & 1) != 0; });
  }
  if (::mincore(reinterpret_cast<void*>(first), page, in) != 0 ||
      ::mincore(reinterpret_cast<void*>(last), page, in + 1) != 0)
    return true;
  return (in[0] & in[1] & 1) != 0;
}

WindowReadScope::WindowReadScope(const WindowRead* window) : previous_(current_window) { current_window = window; }
WindowReadScope::~WindowReadScope() { current_window = previous_; }

namespace {
thread_local WhileReadingScope* current_while_reading = nullptr;
}  // namespace

WhileReadingScope::WhileReadingScope(std::function<void()> work)
    : work_(std::move(work)), previous_(current_while_reading) {
  current_while_reading = this;
}
WhileReadingScope::~WhileReadingScope() { current_while_reading = previous_; }

void WhileReadingScope::run() {
  WhileReadingScope* scope = current_while_reading;
  if (scope == nullptr || !scope->work_) return;
  const std::function<void()> work = std::move(scope->work_);
  scope->work_ = nullptr;
  work();
}

WindowRead::~WindowRead() { std::free(buffer); }

const char* WindowRead::find(const Env* env, uint64_t txn_id, uint64_t version, uint64_t at, uint64_t size) const {
  for (const File& f : files) {
    if (f.env != env) continue;
    if (f.txn_id != txn_id || f.version != version || version == 0) return nullptr;
    auto it = std::upper_bound(f.runs.begin(), f.runs.end(), at,
                               [](uint64_t x, const Run& r) { return x < r.offset; });
    if (it == f.runs.begin()) return nullptr;
    --it;
    if (it->data == nullptr || at + size > it->offset + it->length) return nullptr;
    return it->data + (at - it->offset);
  }
  return nullptr;
}

std::shared_ptr<const WindowRead> read_window(const std::vector<std::shared_ptr<Env>>& envs,
                                              const std::vector<uint64_t>& txn_ids,
                                              const std::vector<uint64_t>& versions, std::vector<WindowRange>& want,
                                              bool keep_cache, size_t budget,
                                              std::shared_ptr<const WindowRead> reuse) {
  if (want.empty()) return nullptr;
  std::sort(want.begin(), want.end(), [](const WindowRange& a, const WindowRange& b) {
    return a.file != b.file ? a.file < b.file : a.begin < b.begin;
  });
  // The runs, aligned as O_DIRECT needs (buffered: as they are).
  std::vector<WindowRange> runs;
  uint64_t run_bytes = 0;
  size_t records = 0;
  for (const WindowRange& w : want) {
    const uint64_t align = keep_cache ? 1 : envs[w.file]->direct_align();
    const uint64_t b = w.begin / align * align, e = (w.end + align - 1) / align * align;
    // Merged across a gap no longer than kGap nor than the record itself:
    // what is read between records never exceeds the records.
    const bool merge = !runs.empty() && runs.back().file == w.file &&
                       b <= runs.back().end + std::min<uint64_t>(WindowRead::kGap, e - b);
    const uint64_t grows = merge ? std::max(runs.back().end, e) - runs.back().end : e - b;
    if (run_bytes + grows > budget) break;  // (sorted by offset: the rest of the window is read by its batches)
    run_bytes += grows;
    ++records;
    if (merge) {
      runs.back().end = std::max(runs.back().end, e);
    } else {
      runs.push_back({w.file, b, e});
    }
  }
  if (runs.empty()) return nullptr;
  // Each run in the buffer at the same place in its page as in its file (as
  // aligned as the device needs).
  size_t total = 0;
  for (const WindowRange& r : runs)
    total += (r.begin % kDirectAlign + (r.end - r.begin) + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  auto out = std::make_shared<WindowRead>();
  if (reuse && reuse.use_count() == 1 && reuse->capacity >= total) {
    // Nobody else holds it: its buffer (pages already faulted in) is lent.
    WindowRead& old = const_cast<WindowRead&>(*reuse);
    out->buffer = old.buffer;
    out->capacity = old.capacity;
    old.buffer = nullptr;
    old.capacity = 0;
  } else {
    void* p = nullptr;
    const size_t size = (total + kHugePage - 1) / kHugePage * kHugePage;
    if (::posix_memalign(&p, kHugePage, size) != 0) throw std::bad_alloc();
    ::madvise(p, size, MADV_HUGEPAGE);  // (a 4 KiB page fault for every 4 KiB the device writes, otherwise)
    out->buffer = static_cast<char*>(p);
    out->capacity = size;
  }
  reuse.reset();
  out->envs = envs;
  thread_local std::vector<DirectRead> reads;
  thread_local std::vector<size_t> run_of;
  reads.clear();
  run_of.clear();
  std::vector<WindowRead::Run> placed(runs.size());
  char* at = out->buffer;
  for (size_t r = 0; r < runs.size(); ++r) {
    const WindowRange& run = runs[r];
    char* dst = at + run.begin % kDirectAlign;
    at += (run.begin % kDirectAlign + (run.end - run.begin) + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    placed[r] = WindowRead::Run{run.begin, run.end - run.begin, dst};
    const Env& env = *envs[run.file];
    const int fd = keep_cache ? env.buffered_fd() : env.direct_fd();
    if (fd < 0) {
      placed[r].data = nullptr;
      continue;
    }
    for (uint64_t off = run.begin; off < run.end; off += WindowRead::kRequest) {
      DirectRead d;
      d.fd = fd;
      d.offset = off;
      d.length = static_cast<uint32_t>(std::min<uint64_t>(WindowRead::kRequest, run.end - off));
      d.dst = dst + (off - run.begin);
      reads.push_back(d);
      run_of.push_back(r);
    }
  }
  if (!start_direct_reads(reads)) return nullptr;  // (nothing submitted)
  for (size_t j = 0; j < reads.size(); ++j) {
    const int64_t got = wait_direct_read(j);
    if (got != static_cast<int64_t>(reads[j].length)) placed[run_of[j]].data = nullptr;  // (its records: the map)
    else out->bytes += reads[j].length;
  }
  finish_direct_reads();
  if (direct_ring_failed()) {
    // Reads may still land in the buffer: it is leaked, never freed nor lent.
    out->buffer = nullptr;
    out->capacity = 0;
    return nullptr;
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    const size_t file = runs[r].file;
    if (out->files.empty() || out->files.back().env != envs[file].get())
      out->files.push_back(WindowRead::File{envs[file].get(), txn_ids[file], versions[file], {}});
    out->files.back().runs.push_back(placed[r]);
  }
  out->records = records;
  return out;
}

std::shared_ptr<const WindowRead> read_window(Reader::State& s, at::ArrayRef<size_t> indices,
                                              std::shared_ptr<const WindowRead> reuse) {
  const ReaderOptions& o = s.options;
  if (!o.direct_reads || o.page_request_bytes == 0 || o.page_requests == PageRequests::Never || indices.empty())
    return nullptr;
  const auto& envs = s.current_envs();
  const size_t n = s.offsets.back();
  // Open until the reads are done: the records' pages stay theirs.
  std::vector<ReadTxn> txns(envs.size());
  std::vector<uint64_t> ids(envs.size(), 0), versions(envs.size(), 0);
  std::vector<WindowRange> want;
  uint64_t bytes = 0;
  size_t looked = 0;
  for (const size_t index : indices) {
    if (bytes >= o.page_request_bytes) break;
    if (index >= n) continue;
    const auto [file, local] = s.locate(index);
    const uint32_t per_value = s.per_value[file];
    if (per_value > 1) continue;
    const Env& env = *envs[file];
    if (txns[file].get() == nullptr) {
      txns[file] = env.read_txn();
      ids[file] = mdb_txn_id(txns[file].get());
      versions[file] = env.file_version();
    }
    unsigned char kbuf[8];
    encode_key(local, kbuf);
    MDB_val k{8, kbuf}, v{0, nullptr};
    if (guarded_get(txns[file].get(), env.samples_dbi(), &k, &v) != MDB_SUCCESS) continue;
    if (!env.value_inside(v) || direct_read_fd(env, v, per_value, o) < 0) continue;
    if (record_cached(v)) {
      if (++looked >= 32 && want.empty()) return nullptr;  // a window in the page cache already
      continue;
    }
    ++looked;
    const uint64_t at = env.file_offset(v.mv_data);
    want.push_back({file, at, at + v.mv_size});
    bytes += v.mv_size;
  }
  auto out = read_window(envs, ids, versions, want, o.keep_cache, o.page_request_bytes, std::move(reuse));
  if (out) s.io_window_bytes.fetch_add(out->bytes, std::memory_order_relaxed);
  return out;
}

// ---- BatchLookup ----------------------------------------------------------------

BatchLookup::BatchLookup(const Reader::State& s, const std::vector<std::shared_ptr<Env>>& envs,
                     at::ArrayRef<size_t> indices, std::vector<ReadTxn>& txns, size_t ahead, size_t probe)
    : s_(s), envs_(envs), indices_(indices), txns_(txns), cursors_(envs.size()), index_(envs.size()),
      keep_(s.options.keep_cache), window_(current_window) {
  if (indices.empty()) return;
  if (ahead == 0) {
    next_ = find(0);
    if (probe == 0 || cached(next_.value)) {
      if (indices.size() > 1) after_ = find(1);
      return;
    }
    probed_ = true;
    ahead = probe;
  }
  cold_ = true;  // the leaves asked for before the lookups fault them in
  for (size_t file = 0; file < txns_.size(); ++file)
    if (txns_[file].get() != nullptr) request_leaves_once(*envs_[file], txns_[file].get());
  found_.reserve(indices.size());
  thread_local std::vector<MDB_val> values;
  values.clear();
  bool packed = false;
  for (size_t i = 0; i < indices.size(); ++i) {
    found_.push_back(i == 0 && probed_ ? next_ : find(i, /*slice=*/false));
    const Found& f = found_.back();
    if (f.per_value > 1 && f.value.mv_data == nullptr) {
      // A packed value: where its record lies is in the value's header.
      packed = true;
      values.push_back(MDB_val{std::min(f.whole.mv_size, packed_header_bytes(f.per_value)), f.whole.mv_data});
    }
  }
  // Headers of packed values first (their reads overlap), then the records.
  if (packed) missing_ += request_pages(values, ahead);
  values.clear();
  for (Found& f : found_)
    if (f.value.mv_data == nullptr) f.value = record_in(*f.env, f.whole, f.local, f.per_value);
  if (s.options.direct_reads) missing_ += read_direct_records(ahead);
  for (const Found& f : found_)
    if (f.read < 0 && !f.direct) values.push_back(f.value);
  missing_ += request_pages(values, ahead);
}

BatchLookup::~BatchLookup() {
  if (reading_) detail::finish_direct_reads();  // (no read lands in the buffer once it is reused)
  if (direct_records_ > 0) s_.io_direct_records.fetch_add(direct_records_, std::memory_order_relaxed);
  if (window_records_ > 0) s_.io_window_records.fetch_add(window_records_, std::memory_order_relaxed);
}

size_t BatchLookup::read_direct_records(size_t budget) {
  std::vector<DirectRead>& reads = direct_reads;
  thread_local std::vector<size_t> which;
  detail::finish_direct_reads();  // (the thread's requests of a batch before: none should be left)
  reads.clear();
  which.clear();
  size_t bytes = 0, room = 0;
  for (size_t i = 0; i < found_.size(); ++i) {
    const Found& f = found_[i];
    if (f.per_value > 1 || f.direct) continue;  // (a packed value: its header first; read ahead: in memory)
    const int fd = direct_read_fd(*f.env, f.value, f.per_value, s_.options);
    if (fd < 0 || cached(f.value)) continue;
    // O_DIRECT reads whole blocks of the device (512 bytes, often): only the
    // blocks the record lies on. A buffered read is read as it is asked.
    const uint64_t align = keep_ ? 1 : f.env->direct_align();
    const uint64_t at = f.env->file_offset(f.value.mv_data);
    DirectRead d;
    d.fd = fd;
    d.offset = at / align * align;
    d.length = static_cast<uint32_t>((at + f.value.mv_size + align - 1) / align * align - d.offset);
    // In the buffer at the same place in its page as in the file (and so as
    // aligned as the device needs): the buffer holds whole pages.
    const size_t pages = (d.offset % kDirectAlign + d.length + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    if (room + pages > budget) break;  // the rest through the map (page requests)
    reads.push_back(d);
    which.push_back(i);
    bytes += d.length;
    room += pages;
  }
  if (reads.empty()) return 0;
  char* buffer = direct_buffer(room);
  for (DirectRead& d : reads) {
    d.dst = buffer + d.offset % kDirectAlign;
    buffer += (d.offset % kDirectAlign + d.length + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  }
  if (!detail::start_direct_reads(reads)) return 0;
  reading_ = true;
  for (size_t j = 0; j < reads.size(); ++j) found_[which[j]].read = static_cast<int32_t>(j);
  return (bytes + page_bytes() - 1) / page_bytes();
}

void request_leaves_once(const Env& env, MDB_txn* txn) {
  if (env.claim_leaf_request())
    request_leaf_pages(txn, env.samples_dbi(), "samples", env.buffered_fd(), kLeafRequestBytes);
}

void BatchLookup::settle(Found& f) {
  const int64_t got = detail::wait_direct_read(static_cast<size_t>(f.read));
  const DirectRead& d = direct_reads[static_cast<size_t>(f.read)];
  f.read = -1;
  if (got != static_cast<int64_t>(d.length)) return;  // read through the map (its errors there)
  f.value.mv_data = d.dst + (f.env->file_offset(f.value.mv_data) - d.offset);
  f.whole = f.value;
  f.direct = true;
  ++direct_records_;
}

void BatchLookup::parse_next(size_t i, std::vector<FieldView>& views, bool defer_checksum) {
  if (i == 0) WhileReadingScope::run();  // (the batch's reads were submitted by the constructor)
  Found cur;
  if (!found_.empty()) {
    if (found_[i].read >= 0) settle(found_[i]);
    cur = found_[i];
  } else {
    cur = next_;
    next_ = after_;
    if (i + 2 < indices_.size()) after_ = find(i + 2);
  }
  if (!keep_) parsed_.push_back(cur);
  record_ = cur.value;
  record_env_ = cur.env;
  record_local_ = cur.local;
  if (!defer_checksum)
    return parse(*cur.env, cur.value, cur.local, s_, views, s_.options.verify, cur.whole, cur.per_value);
  try {
    parse(*cur.env, cur.value, cur.local, s_, views, false, cur.whole, cur.per_value);
  } catch (...) {
    parse(*cur.env, cur.value, cur.local, s_, views, true, cur.whole, cur.per_value);  // a checksum mismatch comes first
    throw;
  }
}

void BatchLookup::evict() {
  for (const Found& f : parsed_) {
    if (f.direct) continue;  // its pages never entered the page cache
    const auto [begin, end] = value_pages(f.value);
    // A value on overflow pages owns its whole run; another shares its page.
    if (owns_its_pages(f.value)) {
      f.env->evict(reinterpret_cast<const void*>(begin), end - begin);
    } else {
      f.env->evict(f.value.mv_data, f.value.mv_size);
    }
  }
  parsed_.clear();
}

BatchLookup::Found BatchLookup::find(size_t i, bool slice) {
  const auto loc = s_.locate(indices_[i]);
  const Env& env = *envs_[loc.first];
  if (txns_[loc.first].get() == nullptr) {
    txns_[loc.first] = env.read_txn();
    index_[loc.first] = env.value_index(txns_[loc.first].get(), s_.options.value_index_bytes / ValueIndex::kSlotBytes);
    if (cold_) request_leaves_once(env, txns_[loc.first].get());
  }
  const bool run = i + 1 < indices_.size() && indices_[i + 1] == indices_[i] + 1;
  Found f{&env, loc.second, {0, nullptr}, {0, nullptr}, s_.per_value[loc.first]};
  f.whole = seek(env, loc.first, loc.second, f.per_value, run);
  if (f.per_value <= 1) {
    f.value = f.whole;
    if (window_ != nullptr) {
      take_from_window(f, loc.first);
      if (f.direct) return f;
    }
  } else if (slice) {
    f.value = record_in(env, f.whole, f.local, f.per_value);
  } else {
    return f;  // the header's pages are requested first (the page requests)
  }
  // Every cache line of the record's first kPrefetchBytes (all of a small
  // record), then the first line of each further page of a large record
  // (up to kPrefetchPages) and its last line (where its last field and
  // checksum lie): each page's first touch (a TLB miss, and the hardware
  // prefetcher stops at page boundaries) then overlaps the copy of the
  // sample before it (16 KiB samples, 2 threads: +8 to +10 %).
  const uintptr_t begin = reinterpret_cast<uintptr_t>(f.value.mv_data);
  const uintptr_t end = begin + std::min<size_t>(f.value.mv_size, kPrefetchBytes);
  for (uintptr_t line = begin & ~uintptr_t{63}; line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line));
  if (f.value.mv_size > kPrefetchBytes) {
    const uintptr_t last = begin + f.value.mv_size - 1;
    const uintptr_t page = page_bytes();
    const uintptr_t stop = std::min(last, begin + kPrefetchPages * page);
    for (uintptr_t at = (begin | (page - 1)) + 1; at <= stop; at += page)
      __builtin_prefetch(reinterpret_cast<const void*>(at));
    __builtin_prefetch(reinterpret_cast<const void*>(last));
  }
  return f;
}

MDB_val BatchLookup::seek(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run) {
  Cursor& c = cursors_[file];
  const uint64_t key = local / per_value;
  if (c.positioned && key == c.at) return c.value;  // the next record of a packed value
  ValueIndex* index = index_[file].get();
  if (index != nullptr) {
    const MDB_val known = index->find(key);
    if (known.mv_data != nullptr) {
      env.check_sample_value(known, local);  // (as every value LMDB returns)
      return known;
    }
  }
  const MDB_val v = search(env, file, local, per_value, run);
  if (index != nullptr) index->store(key, v);
  return v;
}

MDB_val BatchLookup::search(const Env& env, size_t file, uint64_t local, uint32_t per_value, bool run) {
  Cursor& c = cursors_[file];
  MDB_txn* txn = txns_[file].get();
  const uint64_t key = local / per_value;
  MDB_val k{0, nullptr}, v{0, nullptr};
  if (c.positioned && key == c.at + 1 && detail::guarded_cursor_get(c.cursor.get(), &k, &v, MDB_NEXT) == MDB_SUCCESS &&
      k.mv_size == 8 && decode_key(static_cast<const unsigned char*>(k.mv_data)) == key) {
    env.check_sample_value(v, local);
    c.at = key;
    c.value = v;
    return v;
  }
  c.positioned = false;
  // A search through a positioned cursor is ~10 % slower than mdb_get
  // (tiny random reads): the cursor is only positioned for a run.
  if (run) {
    if (c.cursor == nullptr) {
      MDB_cursor* opened = nullptr;
      const int rc = mdb_cursor_open(txn, env.samples_dbi(), &opened);
      if (rc != MDB_SUCCESS) read_failed(env, rc, "mdb_cursor_open", local);
      c.cursor.reset(opened);
    }
    unsigned char kbuf[8];
    encode_key(key, kbuf);
    k = MDB_val{8, kbuf};
    if (detail::guarded_cursor_get(c.cursor.get(), &k, &v, MDB_SET_KEY) == MDB_SUCCESS) {
      env.check_sample_value(v, local);
      c.at = key;
      c.value = v;
      c.positioned = true;
      return v;
    }
  }
  return lookup_value(env, txn, local, per_value);  // (on a failed search: throws the error of this index)
}

void BatchLookup::take_from_window(Found& f, size_t file) {
  if (!owns_its_pages(f.value)) return;  // (read_window() reads only what direct_read_fd() takes)
  if (versions_.empty()) versions_.assign(envs_.size(), kUnknownVersion);
  if (versions_[file] == kUnknownVersion) versions_[file] = f.env->file_version();
  const char* p = window_->find(f.env, mdb_txn_id(txns_[file].get()), versions_[file],
                                f.env->file_offset(f.value.mv_data), f.value.mv_size);
  if (p == nullptr) return;
  f.value.mv_data = const_cast<char*>(p);
  f.whole = f.value;
  f.direct = true;
  ++window_records_;
}

}  // namespace detail
}  // namespace torch_lmdb
