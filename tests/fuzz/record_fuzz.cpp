// libFuzzer target: the record parser (detail/record_format.h) on arbitrary LMDB values.
// A record either parses -- then every view lies inside the input and
// to_tensor() copies it -- or raises a torch_lmdb::Error naming the path and
// index (CorruptedError; InvalidDatabaseError for another record version);
// anything else (another
// exception, a sanitizer report, an allocation beyond -malloc_limit_mb) is a
// finding. parse_record_cached() must agree with parse_record() on every
// input, with a template left over from the inputs before. The input is also
// read as a packed value (packed_record): what it finds lies inside it, and
// against a fixed schema (a compact record, format version 4): its views lie
// inside the input and decode within their payloads; as a columnar packed
// value (format version 5), its records' column fields resolve inside it.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "torch_lmdb/detail/columns.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/errors.h"

using namespace torch_lmdb;

namespace {

bool same_views(const std::vector<FieldView>& a, const std::vector<FieldView>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].name_size != b[i].name_size || a[i].kind != b[i].kind ||
        a[i].dtype != b[i].dtype || a[i].ndim != b[i].ndim || a[i].data != b[i].data || a[i].nbytes != b[i].nbytes ||
        a[i].stored != b[i].stored || a[i].codec != b[i].codec)
      return false;
    for (int d = 0; d < a[i].ndim; ++d)
      if (a[i].sizes[d] != b[i].sizes[d]) return false;
  }
  return true;
}

// An error of a record must name the input's path and index.
void expect_named(const Error& e) {
  if (std::string(e.what()).find("'fuzz'") == std::string::npos ||
      std::string(e.what()).find("index 7") == std::string::npos) {
    std::fprintf(stderr, "error without the path or index: %s\n", e.what());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A copy of exactly `size` bytes on the heap: ASan sees any read past it.
  std::vector<char> value(data, data + size);
  const std::string path = "fuzz";
  const RecordContext ctx{&path, 7};
  for (bool verify : {false, true}) {
    std::vector<FieldView> views;
    bool ok = true;
    try {
      parse_record(value.data(), value.size(), verify, ctx, views);
    } catch (const Error& e) {
      ok = false;
      expect_named(e);
    }
    static RecordTemplate tmpl;  // shared across inputs on purpose
    std::vector<FieldView> cached;
    bool cached_ok = true;
    try {
      parse_record_cached(value.data(), value.size(), verify, ctx, cached, tmpl);
    } catch (const Error&) {
      cached_ok = false;
    }
    if (ok != cached_ok || (ok && !same_views(views, cached))) {
      std::fprintf(stderr, "parse_record_cached disagrees with parse_record (parsed: %d vs %d)\n", ok, cached_ok);
      std::abort();
    }
    if (!ok) continue;
    const char* begin = value.data();
    const char* end = begin + value.size();
    for (const FieldView& v : views) {
      if (v.name < begin || v.name + v.name_size > end || v.data < begin || v.stored > size_t(end - v.data) ||
          (v.codec == Codec::None && v.stored != v.nbytes)) {
        std::fprintf(stderr, "a view points outside the record\n");
        std::abort();
      }
      // A Blosc header may declare up to 2 GiB (validated, then allocated):
      // more than libFuzzer's malloc limit, so such views are not decoded here.
      if (v.codec != Codec::None && v.nbytes > (uint64_t{256} << 20)) continue;
      at::Tensor t;
      try {
        t = to_tensor(v);  // decompresses: a damaged frame raises CorruptedError naming path and index
      } catch (const Error& e) {
        expect_named(e);
        continue;
      }
      if (static_cast<uint64_t>(t.nbytes()) != v.nbytes) {
        std::fprintf(stderr, "to_tensor made %zu bytes of a %llu-byte payload\n", size_t(t.nbytes()),
                     (unsigned long long)v.nbytes);
        std::abort();
      }
    }
  }
  // The same bytes against a schema (compact records name their fields by
  // position; the schema of the seed corpus's compact records).
  static const std::vector<FieldSchema> schema{{"cir", FieldKind::Tensor, at::kComplexFloat, {-1}},
                                               {"small", FieldKind::Tensor, at::kLong, {-1}},
                                               {"s", FieldKind::Str, at::kByte, {-1}},
                                               {"m", FieldKind::Tensor, at::kFloat, {-1, 3}}};
  for (bool verify : {false, true}) {
    std::vector<FieldView> views;
    try {
      parse_record(value.data(), value.size(), verify, ctx, views, &schema);
    } catch (const Error& e) {
      expect_named(e);
      continue;
    }
    const char* begin = value.data();
    const char* end = begin + value.size();
    for (const FieldView& v : views) {
      if (v.in_column) {
        // A field whose bytes are in its value's column: no bytes of its own
        // until resolve_columns() points it at the column (a record read
        // outside a columnar value has none), and reading it unresolved
        // raises a named CorruptedError.
        if (v.data != nullptr || v.stored != 0 || v.nbytes > kMaxColumnBytes) {
          std::fprintf(stderr, "an unresolved column view has bytes\n");
          std::abort();
        }
        try {
          (void)to_tensor(v);
          std::fprintf(stderr, "an unresolved column view was read\n");
          std::abort();
        } catch (const CorruptedError& e) {
          expect_named(e);
        }
        continue;
      }
      if (v.data < begin || v.stored > size_t(end - v.data) || (v.codec == Codec::None && v.stored != v.nbytes)) {
        std::fprintf(stderr, "a compact view points outside the record\n");
        std::abort();
      }
      if (v.codec != Codec::None && v.nbytes > (uint64_t{256} << 20)) continue;
      try {
        const at::Tensor t = to_tensor(v);
        if (static_cast<uint64_t>(t.nbytes()) != v.nbytes) std::abort();
      } catch (const Error&) {
      }
    }
  }
  // The same bytes as a packed value (format version 3): a record found in
  // it lies inside the input, and the slots of n records are 0..n-1 only.
  for (size_t slot = 0; slot < 20; ++slot) {
    const char* record = nullptr;
    size_t record_size = 0;
    const bool found = packed_record(value.data(), value.size(), slot, 16, &record, &record_size);
    if (found && (record < value.data() || record_size > size_t(value.data() + value.size() - record))) {
      std::fprintf(stderr, "packed_record returned a record outside the value\n");
      std::abort();
    }
    if (found && slot >= 16) {
      std::fprintf(stderr, "packed_record found slot %zu of at most 16 records\n", slot);
      std::abort();
    }
    if (!found) continue;
    std::vector<FieldView> views;
    try {
      parse_record(record, record_size, true, ctx, views);
    } catch (const Error&) {
    }
    // A columnar value (format version 5): its records against the schema,
    // their column fields resolved (the section checked) and decoded, or an
    // error naming the path and index; a view never points outside the value.
    PackedColumns columns;
    packed_record(value.data(), value.size(), slot, 16, &record, &record_size, &columns);
    if (columns.data != nullptr &&
        (columns.data < value.data() || columns.size > size_t(value.data() + value.size() - columns.data))) {
      std::fprintf(stderr, "packed_record returned a column section outside the value\n");
      std::abort();
    }
    for (bool verify : {false, true}) {
      try {
        parse_record(record, record_size, verify, ctx, views, &schema);
        if (torch_lmdb::detail::any_in_column(views)) torch_lmdb::detail::resolve_columns(columns, views, verify, ctx);
        for (const FieldView& v : views) {
          if (v.data < value.data() || v.stored > size_t(value.data() + value.size() - v.data)) {
            std::fprintf(stderr, "a column view points outside the value\n");
            std::abort();
          }
          if (v.codec != Codec::None && v.nbytes > (uint64_t{256} << 20)) continue;
          const at::Tensor t = to_tensor(v);
          if (static_cast<uint64_t>(t.nbytes()) != v.nbytes) std::abort();
        }
      } catch (const Error& e) {
        expect_named(e);
      }
    }
  }
  return 0;
}
