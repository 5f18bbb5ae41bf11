// Columnar packed values (columns.h).
#include "torch_lmdb/detail/columns.h"

#include <blosc.h>

#include <algorithm>
#include <cstring>

#include "torch_lmdb/detail/blosc_codec.h"

namespace torch_lmdb {
namespace detail {
namespace {

constexpr size_t kEntryHeader = 22;  // u32 field, u32 first, u32 count, u8 codec, u8 flags, u32 raw, u32 stored
constexpr size_t kSectionOverhead = 16;  // u32 section size, u32 count, u64 xxh3

struct Column {
  uint32_t field = 0;
  uint32_t first = 0;  // slots [first, first + count) of the value
  uint32_t count = 0;
  uint8_t codec = 0;
  uint8_t flags = 0;
  uint32_t raw = 0;
  uint32_t stored = 0;
  const char* frame = nullptr;
};

template <typename T>
T load(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void store(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// The columns of a section, checked against its size, `fields` and the value's `n` records.
void read_section(const PackedColumns& c, size_t fields, bool verify, const RecordContext& ctx,
                  std::vector<Column>& out) {
  auto bad = [&](const std::string& what) { throw_corrupted_record(ctx, "its value's column section " + what); };
  out.clear();
  if (c.data == nullptr) throw_corrupted_record(ctx, "a field is in a column but its value holds no columns");
  if (c.size < 12) bad("is truncated");
  const size_t body = c.size - 8;
  if (verify && record_checksum(c.data, body) != load<uint64_t>(c.data + body)) bad("fails its checksum");
  const uint32_t count = load<uint32_t>(c.data);
  if (count == 0 || count > uint64_t{fields} * c.n) bad("counts " + std::to_string(count) + " columns");
  size_t at = 4;
  for (uint32_t i = 0; i < count; ++i) {
    if (body - at < kEntryHeader) bad("is truncated");
    const char* e = c.data + at;
    Column col{load<uint32_t>(e), load<uint32_t>(e + 4), load<uint32_t>(e + 8), load<uint8_t>(e + 12),
               load<uint8_t>(e + 13), load<uint32_t>(e + 14), load<uint32_t>(e + 18), e + kEntryHeader};
    at += kEntryHeader;
    const Column* prev = out.empty() ? nullptr : &out.back();
    if (col.field >= fields || col.count == 0 || col.first >= c.n || col.count > c.n - col.first ||
        (prev && (col.field < prev->field || (col.field == prev->field && col.first < prev->first + prev->count))))
      bad("has a column of field " + std::to_string(col.field) + " for slots " + std::to_string(col.first) + "+" +
          std::to_string(col.count) + " out of order or outside the schema or the value");
    if ((col.codec != 1 && col.codec != 2) || col.flags > 1 || col.raw == 0 || col.raw > kMaxColumnBytes)
      bad("has a column of field " + std::to_string(col.field) + " with codec " + std::to_string(col.codec) +
          ", flags " + std::to_string(col.flags) + " and " + std::to_string(col.raw) + " bytes");
    if (col.stored > body - at) bad("has a column running past its end");
    at += col.stored;
    out.push_back(col);
  }
  if (at != body) bad("has " + std::to_string(body - at) + " unexpected bytes");
}

}  // namespace

void resolve_columns(const PackedColumns& columns, std::vector<FieldView>& views, bool verify,
                     const RecordContext& ctx) {
  thread_local std::vector<Column> cols;
  read_section(columns, views.size(), verify, ctx, cols);
  size_t next = 0;
  for (size_t f = 0; f < views.size(); ++f) {
    FieldView& v = views[f];
    if (!v.in_column) continue;
    while (next < cols.size() && (cols[next].field < f || (cols[next].field == f &&
                                                            cols[next].first + cols[next].count <= columns.slot)))
      ++next;
    if (next == cols.size() || cols[next].field != f || cols[next].first > columns.slot)
      throw_corrupted_record(ctx, "field '" + v.printable_name() + "' is in a column its value does not hold");
    const Column& c = cols[next];
    if (v.nbytes > c.raw)
      throw_corrupted_record(ctx, "field '" + v.printable_name() + "' has " + std::to_string(v.nbytes) +
                                      " bytes, more than its column's " + std::to_string(c.raw));
    v.codec = static_cast<Codec>(c.codec);
    v.data = c.frame;
    v.stored = c.stored;
    v.column_bytes = c.raw;
    v.column_slot = columns.slot - c.first;
    v.column_n = c.count;
    v.column_ends = (c.flags & 1) != 0;
    const std::string problem = blosc_problem(v);
    if (!problem.empty()) throw_corrupted_record(ctx, "field '" + v.printable_name() + "': " + problem);
  }
}

namespace {

// The columns this thread decoded last: a column is decoded once for the
// samples read after each other from it (sequential and block-shuffled reads).
// An entry is used only for the same bytes: its frame is kept and compared.
struct DecodedColumn {
  const char* at = nullptr;
  std::string frame;
  std::vector<char> bytes;
};
constexpr size_t kDecodedColumns = 64;  // more than the column fields of a sample, as a rule

const std::vector<char>* decoded_column(const FieldView& view, std::string& problem) {
  thread_local DecodedColumn cache[kDecodedColumns];
  thread_local size_t next = 0;
  for (DecodedColumn& c : cache)
    if (c.at == view.data && c.frame.size() == view.stored && c.bytes.size() == view.column_bytes &&
        std::memcmp(c.frame.data(), view.data, view.stored) == 0)
      return &c.bytes;
  DecodedColumn& c = cache[next];
  next = (next + 1) % kDecodedColumns;
  c.at = nullptr;
  c.bytes.resize(view.column_bytes);
  const int n = blosc_decompress_ctx(view.data, c.bytes.data(), c.bytes.size(), 1);
  if (n < 0 || static_cast<uint64_t>(n) != view.column_bytes) {
    problem = std::string("Blosc (") + codec_name(view.codec) + ") failed to decompress its column (code " +
              std::to_string(n) + ")";
    return nullptr;
  }
  c.frame.assign(view.data, view.stored);
  c.at = view.data;
  return &c.bytes;
}

}  // namespace

// (resolve_columns() checked the frame's header: a view is decoded in the
// transaction that resolved it, from the same bytes.)
void decode_column(const FieldView& view, void* dst) {
  std::string problem;
  const std::vector<char>* decoded = decoded_column(view, problem);
  static const std::vector<char> none;
  const std::vector<char>& column = decoded ? *decoded : none;
  uint64_t begin = 0, end = 0;
  if (problem.empty() && view.column_ends) {  // u32 ends[n], then the bytes
    const uint64_t table = uint64_t{4} * view.column_n;
    uint32_t b = 0, e = 0;
    if (table <= column.size()) {
      if (view.column_slot > 0) b = load<uint32_t>(column.data() + 4 * (view.column_slot - 1));
      e = load<uint32_t>(column.data() + 4 * view.column_slot);
    }
    begin = table + b;
    end = table + e;
    if (table > column.size() || e < b || end > column.size() || e - b != view.nbytes)
      problem = "its column's slot " + std::to_string(view.column_slot) + " does not hold its " +
                std::to_string(view.nbytes) + " bytes";
  } else if (problem.empty()) {
    begin = uint64_t{view.column_slot} * view.nbytes;
    end = begin + view.nbytes;
    if (uint64_t{view.column_n} * view.nbytes != column.size())
      problem = "its column holds " + std::to_string(column.size()) + " bytes, not " +
                std::to_string(view.column_n) + " samples of " + std::to_string(view.nbytes);
  }
  if (!problem.empty()) throw_corrupted_record(view.ctx, "field '" + view.printable_name() + "': " + problem);
  if (end > begin) std::memcpy(dst, column.data() + begin, end - begin);
}

size_t append_compact_views(const std::vector<FieldView>& views, const std::vector<bool>& to_column, bool checksum,
                            std::string& out) {
  const size_t start = out.size();
  put_compact_header(out, views.size(), checksum);
  thread_local std::string decoded;
  for (size_t f = 0; f < views.size(); ++f) {
    const FieldView& v = views[f];
    const bool column = f < to_column.size() && to_column[f];
    const bool raw = !column && (v.codec == Codec::None || v.in_column);
    out.push_back(static_cast<char>(column ? kColumnCodecByte : raw ? uint8_t{0} : static_cast<uint8_t>(v.codec)));
    for (int d = 0; d < v.ndim; ++d) put_varint(out, static_cast<uint64_t>(v.sizes[d]));
    if (column) continue;
    if (v.in_column) {  // decoded from its column, stored raw
      decoded.resize(v.nbytes);
      decode_payload(v, &decoded[0]);
      out.append(decoded.data(), v.nbytes);
      continue;
    }
    if (!raw) put_varint(out, v.stored);
    if (v.stored) out.append(v.data, v.stored);
  }
  if (checksum) store(out, record_checksum(out.data() + start, out.size() - start));
  return out.size() - start;
}

namespace {

bool has_checksum(const char* record) { return (load<uint16_t>(record + 6) & 1) != 0; }

// Writes the columns of field f (`fs`, `codec`) of the n records `views` to
// `section`, in groups of consecutive slots of at most `group_bytes` each (with
// u32 ends when the field's shape varies); a group that Blosc does not make
// smaller (with its entry) is left in the records. Marks the slots moved in
// `moved` (per record), returns the columns written and adds the stored bytes
// minus the records' payload bytes to `delta`.
uint32_t write_columns(const std::vector<std::vector<FieldView>>& views, size_t n, size_t f, const FieldSchema& fs,
                       const Compression& codec, size_t group_bytes, std::string& section,
                       std::vector<std::vector<bool>>& moved, int64_t& delta) {
  if (fs.kind != FieldKind::Tensor || codec.codec == Codec::None) return 0;
  for (size_t i = 0; i < n; ++i)
    if (views[i][f].codec != Codec::None || views[i][f].in_column || views[i][f].nbytes >= kMinCompressBytes) return 0;
  const bool variable = std::find(fs.shape.begin(), fs.shape.end(), -1) != fs.shape.end();
  thread_local std::string block, frame;
  uint32_t written = 0;
  for (size_t first = 0; first < n;) {
    size_t last = first, raw = 0;  // the group: slots [first, last)
    while (last < n && (last == first || raw + views[last][f].nbytes + (variable ? 4 : 0) <= group_bytes))
      raw += views[last++][f].nbytes + (variable ? 4 : 0);
    block.clear();
    uint32_t end = 0;
    for (size_t i = first; variable && i < last; ++i) store(block, end += static_cast<uint32_t>(views[i][f].nbytes));
    for (size_t i = first; i < last; ++i) block.append(views[i][f].data, views[i][f].nbytes);
    const uint64_t payloads = block.size() - (variable ? 4 * (last - first) : 0);
    const int csize = block.size() <= kMaxColumnBytes
                          ? compress_block(block.data(), block.size(), fs.dtype, codec, frame)
                          : 0;
    if (csize > 0 && kEntryHeader + static_cast<uint64_t>(csize) < payloads) {
      store(section, static_cast<uint32_t>(f));
      store(section, static_cast<uint32_t>(first));
      store(section, static_cast<uint32_t>(last - first));
      store(section, static_cast<uint8_t>(codec.codec));
      store(section, static_cast<uint8_t>(variable ? 1 : 0));
      store(section, static_cast<uint32_t>(block.size()));
      store(section, static_cast<uint32_t>(csize));
      section.append(frame.data(), static_cast<size_t>(csize));
      for (size_t i = first; i < last; ++i) moved[i][f] = true;
      delta += csize - static_cast<int64_t>(payloads);
      ++written;
    }
    first = last;
  }
  return written;
}

}  // namespace

void append_columnar(const char* records, const std::vector<size_t>& ends, const std::vector<FieldSchema>& schema,
                     const std::vector<Compression>& codecs, const std::string& path, uint64_t first,
                     std::string& out, std::vector<int64_t>& delta) {
  delta.assign(schema.size(), 0);
  const size_t n = ends.size();
  thread_local std::vector<std::vector<FieldView>> views;
  if (views.size() < n) views.resize(n);
  bool compact = n >= 2 && codecs.size() == schema.size();
  for (size_t i = 0; compact && i < n; ++i) {
    const size_t begin = i ? ends[i - 1] : 0;
    compact = record_version(records + begin, ends[i] - begin) == kCompactFormatVersion;
    if (compact)
      parse_record(records + begin, ends[i] - begin, false, RecordContext{&path, first + i}, views[i], &schema);
  }
  thread_local std::string section;
  thread_local std::vector<std::vector<bool>> moved;
  section.clear();
  moved.assign(n, std::vector<bool>(schema.size(), false));
  uint32_t count = 0;
  for (size_t f = 0; compact && f < schema.size(); ++f)
    count += write_columns(views, n, f, schema[f], codecs[f], kColumnGroupBytes, section, moved, delta[f]);
  int64_t saved = -static_cast<int64_t>(kSectionOverhead);  // the bytes the columns save, with the section's own
  for (int64_t d : delta) saved -= d;
  if (count == 0 || saved - static_cast<int64_t>(kEntryHeader * count) <= 0) {
    delta.assign(schema.size(), 0);
    return append_packed(records, ends, out);
  }
  section.insert(0, reinterpret_cast<const char*>(&count), 4);
  store(section, record_checksum(section.data(), section.size()));
  thread_local std::string rebuilt;
  thread_local std::vector<size_t> rebuilt_ends;
  rebuilt.clear();
  rebuilt_ends.clear();
  for (size_t i = 0; i < n; ++i) {
    append_compact_views(views[i], moved[i], has_checksum(records + (i ? ends[i - 1] : 0)), rebuilt);
    rebuilt_ends.push_back(rebuilt.size());
  }
  TORCH_CHECK(rebuilt.size() <= UINT32_MAX && section.size() <= UINT32_MAX, "a columnar value of ",
              rebuilt.size() + section.size(), " bytes");
  const size_t at = out.size();
  append_packed(rebuilt.data(), rebuilt_ends, out);  // "TLMP", n, ends, records
  std::memcpy(&out[at], &kColumnPackMagic, 4);
  const uint32_t section_size = static_cast<uint32_t>(section.size());
  std::string middle(reinterpret_cast<const char*>(&section_size), 4);
  middle += section;
  out.insert(at + packed_header_bytes(n), middle);
}

bool expand_records(const char* data, size_t size, size_t n, size_t max_records,
                    const std::vector<FieldSchema>& schema, const RecordContext& ctx, std::string& out,
                    std::vector<size_t>& ends, std::vector<int64_t>& delta) {
  delta.assign(schema.size(), 0);
  thread_local std::vector<FieldView> views;
  thread_local std::vector<Column> cols;
  for (size_t slot = 0; slot < n; ++slot) {
    const char* record = nullptr;
    size_t record_size = 0;
    PackedColumns columns;
    if (!packed_record(data, size, slot, max_records, &record, &record_size, &columns)) return false;
    if (columns.data == nullptr) {  // a "TLMP" value: its records as they are
      out.append(record, record_size);
      ends.push_back(out.size());
      continue;
    }
    RecordContext at{ctx.path, ctx.index + slot};
    parse_record(record, record_size, true, at, views, &schema);
    if (any_in_column(views)) resolve_columns(columns, views, true, at);
    append_compact_views(views, {}, has_checksum(record), out);
    ends.push_back(out.size());
    if (slot + 1 < n) continue;
    read_section(columns, schema.size(), false, at, cols);  // the value's delta, once
    for (const Column& c : cols)
      delta[c.field] += static_cast<int64_t>(c.stored) -
                        (static_cast<int64_t>(c.raw) - (c.flags & 1 ? 4 * int64_t{c.count} : 0));
  }
  return true;
}

}  // namespace detail
}  // namespace torch_lmdb
