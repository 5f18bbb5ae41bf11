#include "torch_lmdb/detail/record_format.h"

#include <cereal/archives/binary.hpp>
#include <c10/util/Exception.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

// libxxhash's entry point that picks the widest vector unit of the CPU at run
// time (xxh_x86dispatch.h; AVX2 or AVX-512 where present): the inlined
// XXH3_64bits above is compiled for this build's baseline (SSE2), about 3x
// slower on a 16 KiB record. Declared here: its header cannot follow
// XXH_INLINE_ALL in one translation unit. Weak: a libxxhash built without
// the dispatcher leaves it null, and the inlined function serves.
extern "C" unsigned long long XXH3_64bits_dispatch(const void* input, size_t length) __attribute__((weak));
#include <blosc.h>

#include <algorithm>
#include <cstring>
#include <istream>
#include <limits>
#include <ostream>
#include <streambuf>

#include "torch_lmdb/detail/blosc_codec.h"
#include "torch_lmdb/detail/columns.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {
namespace {

using detail::blosc_problem;
using detail::compress_payload;

}  // namespace

// A record's xxh3-64: inlined for short records (no call), the dispatching
// library function for the rest. Both compute the same hash.
uint64_t record_checksum(const void* p, size_t n) noexcept {
  if (n < 1024 || XXH3_64bits_dispatch == nullptr) return XXH3_64bits(p, n);
  return static_cast<uint64_t>(XXH3_64bits_dispatch(p, n));
}

namespace {

static_assert(sizeof(void*) == 8, "torch_lmdb needs a 64-bit platform");

bool host_is_little_endian() {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// A streambuf appending to a std::string (cereal writes through std::ostream).
class StringSink : public std::streambuf {
 public:
  void target(std::string* s) noexcept { s_ = s; }

 protected:
  std::streamsize xsputn(const char* p, std::streamsize n) override {
    s_->append(p, static_cast<size_t>(n));
    return n;
  }
  int_type overflow(int_type c) override {
    if (c != traits_type::eof()) s_->push_back(static_cast<char>(c));
    return c;
  }

 private:
  std::string* s_ = nullptr;
};

// A zero-copy streambuf over a buffer: cereal reads the header fields from
// it and we take payload pointers straight from the buffer (no copy, cereal
// issue #316).
class ViewSource : public std::streambuf {
 public:
  ViewSource(const char* p, size_t n) {
    char* b = const_cast<char*>(p);
    setg(b, b, b + n);
  }
  size_t remaining() const { return static_cast<size_t>(egptr() - gptr()); }
  const char* current() const { return gptr(); }
  void skip(size_t n) { setg(eback(), gptr() + n, egptr()); }
};

}  // namespace

[[noreturn]] void throw_corrupted_record(const RecordContext& ctx, const std::string& what) {
  const std::string path = ctx.path ? *ctx.path : std::string("<memory>");
  throw CorruptedError("corrupted record at '" + path + "' index " +
                           std::to_string(ctx.index) + ": " + what +
                           "; run `torch-lmdb verify` on this database",
                       0, path);
}

namespace {

[[noreturn]] void corrupted(const RecordContext& ctx, const std::string& what) { throw_corrupted_record(ctx, what); }

// The checks every field of a record passes; returns its dtype code.
uint8_t check_field(const Field& f) {
  TORCH_CHECK_VALUE(!f.name.empty(), "field names must not be empty");
  TORCH_CHECK_VALUE(f.tensor.defined(), "field '", f.name, "' holds an undefined tensor");
  TORCH_CHECK_VALUE(f.tensor.device().is_cpu(), "field '", f.name,
                    "' is on ", f.tensor.device(), "; move it to the CPU first");
  TORCH_CHECK_VALUE(f.tensor.dim() <= kMaxDims, "field '", f.name, "' has ",
                    f.tensor.dim(), " dimensions; at most ", kMaxDims, " are supported");
  TORCH_CHECK_TYPE(!f.tensor.is_sparse() && !f.tensor.is_quantized(), "field '", f.name,
                   "' is a sparse or quantized tensor; store it dense");
  if (f.kind != FieldKind::Tensor) {
    TORCH_CHECK_TYPE(f.tensor.scalar_type() == at::kByte && f.tensor.dim() == 1,
                     "field '", f.name, "' of kind ", kind_name(f.kind),
                     " must be a 1-D uint8 tensor");
  }
  try {
    return static_cast<uint8_t>(dtype_code(f.tensor.scalar_type()));
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, "field '", f.name, "': ", e.what_without_backtrace());
  }
}

// The values to store: resolve_conj/resolve_neg, since a conj() or neg()
// view shares its base's memory with a lazy bit that contiguous() keeps.
at::Tensor stored_tensor(const Field& f) { return f.tensor.resolve_conj().resolve_neg().contiguous(); }

}  // namespace

void put_compact_header(std::string& out, size_t fields, bool checksum) {
  const uint32_t magic = kRecordMagic;
  const uint16_t version = kCompactFormatVersion;
  const uint16_t flags = checksum ? 1 : 0;
  out.append(reinterpret_cast<const char*>(&magic), 4);
  out.append(reinterpret_cast<const char*>(&version), 2);
  out.append(reinterpret_cast<const char*>(&flags), 2);
  put_varint(out, fields);
}

void put_varint(std::string& out, uint64_t v) {
  char buf[10];
  size_t n = 0;
  do {
    buf[n++] = static_cast<char>((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
    v >>= 7;
  } while (v != 0);
  out.append(buf, n);
}

namespace {

// A version 1 or 2 record of `fields` (cereal's binary archive), appended to
// `out` without its checksum; `stored` gets each field's stored bytes.
void append_cereal(const std::vector<Field>& fields, const EncodeOptions& options, std::string& out,
                   std::vector<uint64_t>& stored, std::string& scratch) {
  // One sink + ostream per thread, pointed at each output in turn: building a
  // std::ostream (locale, facets) per record costs more than a small record.
  struct Encoder {
    StringSink sink;
    std::ostream os{&sink};
  };
  thread_local Encoder enc;
  enc.sink.target(&out);
  try {
    cereal::BinaryOutputArchive ar(enc.os);
    const uint32_t magic = kRecordMagic;
    const uint16_t version = options.version;
    const uint16_t flags = options.checksum ? 1 : 0;
    const uint32_t count = static_cast<uint32_t>(fields.size());
    ar(magic, version, flags, count);
    for (size_t fi = 0; fi < fields.size(); ++fi) {
      const Field& f = fields[fi];
      const uint8_t code = check_field(f);
      const at::Tensor t = stored_tensor(f);
      const uint64_t name_len = f.name.size();
      ar(name_len, cereal::binary_data(f.name.data(), name_len));
      const uint8_t kind = static_cast<uint8_t>(f.kind);
      const uint8_t ndim = static_cast<uint8_t>(t.dim());
      ar(kind, code, ndim);
      for (int64_t s : t.sizes()) ar(s);
      const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
      const Compression c = options.compression && f.kind == FieldKind::Tensor ? (*options.compression)[fi]
                                                                               : Compression{};
      if (options.version == kMinFormatVersion) {
        TORCH_CHECK_VALUE(c.codec == Codec::None, "field '", f.name, "': format version ", kMinFormatVersion,
                          " records cannot be compressed");
        ar(nbytes);
        if (nbytes > 0) ar(cereal::binary_data(t.data_ptr(), nbytes));
        stored[fi] = nbytes;
        continue;
      }
      const int csize = compress_payload(f, t, c, nbytes, scratch);
      if (csize > 0) {
        const uint8_t codec = static_cast<uint8_t>(c.codec);
        const uint64_t size = static_cast<uint64_t>(csize);
        ar(codec, size, cereal::binary_data(scratch.data(), size));
        stored[fi] = size;
      } else {
        const uint8_t codec = 0;
        ar(codec, nbytes);
        if (nbytes > 0) ar(cereal::binary_data(t.data_ptr(), nbytes));
        stored[fi] = nbytes;
      }
    }
  } catch (...) {
    enc.sink.target(nullptr);
    enc.os.clear();  // a failed append (bad_alloc) sets badbit on the reused stream
    throw;
  }
  enc.sink.target(nullptr);
}

// A compact record (version 4) of `fields`, in the schema's order, appended
// to `out` without its checksum; `stored` gets each field's stored bytes.
void append_compact(const std::vector<Field>& fields, const EncodeOptions& options, std::string& out,
                    std::vector<uint64_t>& stored, std::string& scratch) {
  put_compact_header(out, fields.size(), options.checksum);
  for (size_t fi = 0; fi < fields.size(); ++fi) {
    const Field& f = fields[fi];
    check_field(f);
    const at::Tensor t = stored_tensor(f);
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    const Compression c = options.compression && f.kind == FieldKind::Tensor ? (*options.compression)[fi]
                                                                             : Compression{};
    const int csize = compress_payload(f, t, c, nbytes, scratch);
    out.push_back(static_cast<char>(csize > 0 ? static_cast<uint8_t>(c.codec) : uint8_t{0}));
    for (int64_t s : t.sizes()) put_varint(out, static_cast<uint64_t>(s));
    if (csize > 0) {
      put_varint(out, static_cast<uint64_t>(csize));
      out.append(scratch.data(), static_cast<size_t>(csize));
      stored[fi] = static_cast<uint64_t>(csize);
    } else {
      if (nbytes > 0) out.append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(nbytes));
      stored[fi] = nbytes;
    }
  }
}

}  // namespace

void encode_record(const std::vector<Field>& fields, bool checksum, std::string& out) {
  out.clear();
  append_record(fields, checksum, out);
}

size_t append_record(const std::vector<Field>& fields, bool checksum, std::string& out) {
  EncodeOptions o;
  o.checksum = checksum;
  return append_record(fields, o, out);
}

size_t append_record(const std::vector<Field>& fields, const EncodeOptions& options, std::string& out) {
  TORCH_CHECK(host_is_little_endian(), "torch_lmdb writes little-endian records only");
  TORCH_CHECK_VALUE(options.version == kFormatVersion || options.version == kMinFormatVersion ||
                        options.version == kCompactFormatVersion,
                    "record format version ", options.version, " cannot be written; this torch_lmdb writes ",
                    kMinFormatVersion, ", ", kFormatVersion, " and ", kCompactFormatVersion);
  TORCH_CHECK_VALUE(options.compression == nullptr || options.compression->size() == fields.size(),
                    "compression for ", options.compression ? options.compression->size() : 0, " fields of a ",
                    fields.size(), "-field record");
  const bool checksum = options.checksum;
  thread_local std::vector<uint64_t> stored;
  stored.assign(fields.size(), 0);
  thread_local std::string scratch;  // one compressed payload
  const size_t start = out.size();
  try {
    if (options.version == kCompactFormatVersion) {
      append_compact(fields, options, out, stored, scratch);
    } else {
      append_cereal(fields, options, out, stored, scratch);
    }
  } catch (...) {
    out.resize(start);  // never leave half a record behind
    throw;
  }
  if (checksum) {
    const uint64_t h = record_checksum(out.data() + start, out.size() - start);
    out.append(reinterpret_cast<const char*>(&h), sizeof(h));
  }
  if (options.stored_bytes != nullptr && options.stored_bytes->size() == fields.size())
    for (size_t fi = 0; fi < fields.size(); ++fi) (*options.stored_bytes)[fi] += stored[fi];
  return out.size() - start;
}

namespace {

// The end of a record's checksummed body: `size`, or without the trailing
// xxh3 when the record has one (which `verify` checks). A record shorter
// than `header` plus the checksum is truncated.
size_t body_end(const char* base, size_t size, bool has_checksum, size_t header, bool verify,
                const RecordContext& ctx) {
  if (!has_checksum) return size;
  if (size < header + 8) corrupted(ctx, "truncated checksum");
  const size_t end = size - 8;
  if (verify) {
    uint64_t stored;
    std::memcpy(&stored, base + end, 8);
    if (record_checksum(base, end) != stored) corrupted(ctx, "checksum mismatch");
  }
  return end;
}

// An unsigned LEB128 value at [p, end): advances `p`; false when it is
// truncated or longer than 9 bytes (so every value is below 2^63).
bool get_varint(const char*& p, const char* end, uint64_t* value) noexcept {
  uint64_t v = 0;
  for (int shift = 0; shift < 63 && p < end; shift += 7) {
    const uint8_t b = static_cast<uint8_t>(*p++);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) {
      *value = v;
      return true;
    }
  }
  return false;
}

// A compact field's sizes (one varint a dimension of its schema) and its
// decoded bytes. Every nonzero size's product must fit in an int64 (it
// reaches at::empty), and a payload's element count is bounded by the value
// (or Blosc's limit).
void parse_compact_sizes(const char*& p, const char* stop, size_t size, uint64_t numel_limit,
                         const std::string& name, FieldView& f, const RecordContext& ctx) {
  uint64_t rest = 1;
  bool has_zero = false;
  for (int d = 0; d < f.ndim; ++d) {
    uint64_t s = 0;
    if (!get_varint(p, stop, &s))
      corrupted(ctx, "field '" + name + "' has a truncated or invalid size in dimension " + std::to_string(d));
    f.sizes[d] = static_cast<int64_t>(s);
    if (s == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(rest, s, &rest) || rest > static_cast<uint64_t>(INT64_MAX))
      corrupted(ctx, "field '" + name + "' has sizes whose product overflows 64 bits");
  }
  if (!has_zero && rest > numel_limit)
    corrupted(ctx, "field '" + name + "' has shape " + c10::str(f.shape()) + " that does not fit in a " +
                       std::to_string(size) + "-byte value");
  const uint64_t numel = has_zero ? 0 : rest;
  f.nbytes = numel * c10::elementSize(f.dtype);
}

// One field of a compact record at `p` (advanced past it), described by its
// schema field: codec byte, sizes, payload length when compressed, payload.
void parse_compact_field(const char*& p, const char* stop, size_t size, uint64_t numel_limit,
                         const FieldSchema& fs, FieldView& f, const RecordContext& ctx) {
  f.name = fs.name.data();
  f.name_size = fs.name.size();
  f.kind = fs.kind;
  f.dtype = fs.dtype;
  f.ctx = ctx;
  if (fs.shape.size() > static_cast<size_t>(kMaxDims))
    corrupted(ctx, "schema field '" + fs.name + "' has " + std::to_string(fs.shape.size()) + " dimensions");
  f.ndim = static_cast<int>(fs.shape.size());
  f.in_column = false;
  f.column_bytes = 0;
  if (p >= stop) corrupted(ctx, "field '" + fs.name + "' is cut off (no codec byte)");
  const uint8_t codec = static_cast<uint8_t>(*p++);
  if (codec == kColumnCodecByte && fs.kind == FieldKind::Tensor) {  // its bytes are in the value's column
    f.codec = Codec::None;
    parse_compact_sizes(p, stop, size, kMaxColumnBytes, fs.name, f, ctx);
    if (f.nbytes > kMaxColumnBytes)
      corrupted(ctx, "field '" + fs.name + "' in a column has " + std::to_string(f.nbytes) + " bytes (at most " +
                         std::to_string(kMaxColumnBytes) + ")");
    f.in_column = true;
    f.data = nullptr;
    f.stored = 0;
    return;
  }
  if (codec > 2) corrupted(ctx, "field '" + fs.name + "' has unknown codec " + std::to_string(codec));
  if (codec != 0 && fs.kind != FieldKind::Tensor)
    corrupted(ctx, "field '" + fs.name + "' of kind " + kind_name(fs.kind) + " is compressed");
  f.codec = static_cast<Codec>(codec);
  parse_compact_sizes(p, stop, size, numel_limit, fs.name, f, ctx);
  if (f.codec == Codec::None) {
    f.stored = f.nbytes;
  } else {
    if (!get_varint(p, stop, &f.stored))
      corrupted(ctx, "field '" + fs.name + "' has a truncated or invalid payload length");
    if (f.nbytes == 0 || f.nbytes > static_cast<uint64_t>(BLOSC_MAX_BUFFERSIZE))
      corrupted(ctx, "field '" + fs.name + "' has a compressed payload for " + std::to_string(f.nbytes) +
                         " bytes");
  }
  if (f.stored > static_cast<uint64_t>(stop - p))
    corrupted(ctx, "field '" + fs.name + "' payload of " + std::to_string(f.stored) +
                       " bytes runs past the end of the " + std::to_string(size) + "-byte value");
  f.data = p;
  if (f.codec != Codec::None) {
    const std::string problem = blosc_problem(f);
    if (!problem.empty()) corrupted(ctx, "field '" + fs.name + "': " + problem);
  }
  p += f.stored;
}

void parse_compact(const char* base, size_t size, bool verify_checksum, const RecordContext& ctx,
                   std::vector<FieldView>& out, const std::vector<FieldSchema>* schema) {
  if (schema == nullptr) {
    const std::string path = ctx.path ? *ctx.path : std::string();
    throw InvalidDatabaseError("record at '" + path + "' index " + std::to_string(ctx.index) +
                                   " is a compact record (version 4), which is read with its database's schema",
                               0, path);
  }
  uint16_t flags = 0;
  std::memcpy(&flags, base + 6, 2);
  if (flags & ~uint16_t{1}) corrupted(ctx, "unknown flags " + std::to_string(flags));
  const size_t end = body_end(base, size, (flags & 1) != 0, 8 + 1, verify_checksum, ctx);
  const char* p = base + 8;
  const char* const stop = base + end;
  uint64_t count = 0;
  if (!get_varint(p, stop, &count)) corrupted(ctx, "truncated or invalid field count");
  if (count != schema->size())
    corrupted(ctx, "record has " + std::to_string(count) + " fields but the schema " +
                       std::to_string(schema->size()));
  out.resize(schema->size());
  // A raw payload lies in the value; a compressed one decompresses to at most Blosc 1's limit.
  const uint64_t numel_limit = std::max<uint64_t>(size, BLOSC_MAX_BUFFERSIZE);
  for (size_t i = 0; i < schema->size(); ++i) parse_compact_field(p, stop, size, numel_limit, (*schema)[i], out[i], ctx);
  if (p != stop) corrupted(ctx, std::to_string(stop - p) + " unexpected bytes after the last field");
}

// ---- records of versions 1 and 2 (cereal binary archives) ----

// Bytes left before `end` (the checksummed body's end) at `src`'s position.
size_t available(const ViewSource& src, size_t size, size_t end) {
  const size_t pos = size - src.remaining();
  return pos > end ? 0 : end - pos;
}

[[noreturn]] void unreadable_version(const RecordContext& ctx, uint16_t version) {
  const std::string path = ctx.path ? *ctx.path : std::string();
  throw InvalidDatabaseError("record at '" + path + "' index " + std::to_string(ctx.index) +
                                 " has format version " + std::to_string(version) +
                                 "; this torch_lmdb reads versions " +
                                 std::to_string(kMinFormatVersion) + ", " + std::to_string(kFormatVersion) +
                                 " and " + std::to_string(kCompactFormatVersion),
                             0, path);
}

// A field's name, kind, dtype code and number of dimensions.
void read_field_type(cereal::BinaryInputArchive& ar, ViewSource& src, uint32_t i, size_t avail, FieldView& f,
                     const RecordContext& ctx) {
  uint64_t name_len = 0;
  ar(name_len);
  // `avail` counted the 8 bytes of the length itself (a name past the body's
  // end would move the stream past its buffer: found by tests/fuzz/record_fuzz).
  const size_t after_len = avail >= 8 ? avail - 8 : 0;
  if (name_len == 0 || name_len > after_len || name_len > src.remaining())
    corrupted(ctx, "field " + std::to_string(i) + " has a name length of " + std::to_string(name_len));
  f.name = src.current();
  f.name_size = static_cast<size_t>(name_len);
  f.in_column = false;
  f.column_bytes = 0;
  src.skip(f.name_size);
  uint8_t kind = 0, code = 0, ndim = 0;
  ar(kind, code, ndim);
  if (kind > 2) corrupted(ctx, "field '" + f.printable_name() + "' has unknown kind " + std::to_string(kind));
  f.kind = static_cast<FieldKind>(kind);
  bool ok = false;
  f.dtype = dtype_from_code(code, &ok);
  if (!ok) corrupted(ctx, "field '" + f.printable_name() + "' has unknown dtype code " + std::to_string(code));
  if (ndim > kMaxDims) corrupted(ctx, "field '" + f.printable_name() + "' has " + std::to_string(ndim) + " dimensions");
  f.ndim = ndim;
}

// A field's sizes; returns its element count, bounded by `numel_limit`.
uint64_t read_field_sizes(cereal::BinaryInputArchive& ar, size_t size, uint64_t numel_limit, FieldView& f,
                          const RecordContext& ctx) {
  const int ndim = f.ndim;
  bool has_zero = false;
  for (int d = 0; d < ndim; ++d) {
    int64_t s = 0;
    ar(s);
    if (s < 0) corrupted(ctx, "field '" + f.printable_name() + "' has negative size " + std::to_string(s) + " in dimension " + std::to_string(d));
    f.sizes[d] = s;
    has_zero = has_zero || s == 0;
  }
  uint64_t numel = 1;
  if (has_zero) {
    // No payload, but the other sizes still reach at::empty (and a
    // batch's [B, ...]): their product must fit in an int64, as in any
    // tensor LibTorch made (found by tests/fuzz/record_fuzz).
    uint64_t rest = 1;
    for (int d = 0; d < ndim; ++d)
      if (f.sizes[d] != 0 && (__builtin_mul_overflow(rest, static_cast<uint64_t>(f.sizes[d]), &rest) ||
                              rest > static_cast<uint64_t>(INT64_MAX)))
        corrupted(ctx, "field '" + f.name_str() + "' has shape " + c10::str(f.shape()) +
                           " whose sizes overflow 64 bits");
    return 0;
  }
  for (int d = 0; d < ndim; ++d) {
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(f.sizes[d]), &numel) || numel > numel_limit)
      corrupted(ctx, "field '" + f.printable_name() + "' has shape " + c10::str(f.shape()) +
                         " that does not fit in a " + std::to_string(size) + "-byte value");
  }
  return numel;
}

// A field's codec (version 2), stored length and payload, checked against
// its `numel` elements and the bytes left before `end`.
void read_field_payload(cereal::BinaryInputArchive& ar, ViewSource& src, uint16_t version, size_t size, size_t end,
                        uint64_t numel, FieldView& f, const RecordContext& ctx) {
  uint8_t codec = 0;
  if (version != 1) {
    ar(codec);
    if (codec > 2)
      corrupted(ctx, "field '" + f.printable_name() + "' has unknown codec " + std::to_string(codec));
    if (codec != 0 && f.kind != FieldKind::Tensor)
      corrupted(ctx, "field '" + f.printable_name() + "' of kind " + kind_name(f.kind) + " is compressed");
  }
  f.codec = static_cast<Codec>(codec);
  f.ctx = ctx;
  ar(f.stored);
  const uint64_t itemsize = c10::elementSize(f.dtype);
  f.nbytes = numel * itemsize;
  if (f.codec == Codec::None && f.stored != f.nbytes)
    corrupted(ctx, "field '" + f.printable_name() + "' declares " + std::to_string(f.stored) +
                       " bytes for " + std::to_string(numel) + " elements of " + dtype_name(f.dtype));
  if (f.codec != Codec::None && (f.nbytes == 0 || f.nbytes > static_cast<uint64_t>(BLOSC_MAX_BUFFERSIZE)))
    corrupted(ctx, "field '" + f.printable_name() + "' has a compressed payload for " +
                       std::to_string(f.nbytes) + " bytes");
  if (f.stored > available(src, size, end))
    corrupted(ctx, "field '" + f.printable_name() + "' payload of " + std::to_string(f.stored) +
                       " bytes runs past the end of the " + std::to_string(size) + "-byte value");
  f.data = src.current();
  if (f.codec != Codec::None) {
    const std::string problem = blosc_problem(f);
    if (!problem.empty()) corrupted(ctx, "field '" + f.printable_name() + "': " + problem);
  }
  src.skip(static_cast<size_t>(f.stored));
}

// A record of version 1 or 2: header, then each field through the archive.
void parse_cereal(const char* base, size_t size, bool verify_checksum, const RecordContext& ctx,
                  std::vector<FieldView>& out) {
  constexpr size_t kHeader = 12;
  if (size < kHeader) corrupted(ctx, "value of " + std::to_string(size) + " bytes is shorter than the record header");
  ViewSource src(base, size);
  // One istream + archive per thread, pointed at each record in turn:
  // constructing a std::istream (locale, facets) costs more than parsing a
  // small record. Only plain values are loaded, so the archive keeps no state.
  struct Parser {
    std::istream is{nullptr};
    cereal::BinaryInputArchive ar{is};
  };
  thread_local Parser parser;
  struct Detach {
    std::istream& is;
    ~Detach() { is.rdbuf(nullptr); }
  } detach{parser.is};
  parser.is.rdbuf(&src);  // also clears the state flags
  cereal::BinaryInputArchive& ar = parser.ar;
  uint32_t magic = 0, count = 0;
  uint16_t version = 0, flags = 0;
  try {
    ar(magic, version, flags, count);
  } catch (const cereal::Exception& e) {
    corrupted(ctx, std::string("truncated header: ") + e.what());
  }
  if (magic != kRecordMagic) corrupted(ctx, "bad magic (not a torch_lmdb record)");
  if (version != kFormatVersion && version != kMinFormatVersion) unreadable_version(ctx, version);
  if (flags & ~uint16_t{1}) corrupted(ctx, "unknown flags " + std::to_string(flags));
  const size_t end = body_end(base, size, (flags & 1) != 0, kHeader, verify_checksum, ctx);  // the checksummed body
  // Each field takes at least 8 + 1 + 3 + 8 bytes (+ 1 codec byte in
  // version 2): bound the count before resizing.
  const size_t kMinField = version == 1 ? 20 : 21;
  // A raw payload lies in the value: its element count is bounded by the
  // value's size. A compressed one decompresses to at most Blosc 1's limit.
  const uint64_t numel_limit = version == 1 ? size : std::max<uint64_t>(size, BLOSC_MAX_BUFFERSIZE);
  if (count > (end - kHeader) / kMinField + 1)
    corrupted(ctx, "field count " + std::to_string(count) + " does not fit in " +
                       std::to_string(size) + " bytes");
  out.resize(count);
  try {
    for (uint32_t i = 0; i < count; ++i) {
      FieldView& f = out[i];
      read_field_type(ar, src, i, available(src, size, end), f, ctx);
      const uint64_t numel = read_field_sizes(ar, size, numel_limit, f, ctx);
      read_field_payload(ar, src, version, size, end, numel, f, ctx);
    }
  } catch (const cereal::Exception& e) {
    corrupted(ctx, std::string("truncated field header: ") + e.what());
  }
  if (size - src.remaining() != end)
    corrupted(ctx, std::to_string(end - (size - src.remaining())) + " unexpected bytes after the last field");
}

}  // namespace

void throw_checksum_mismatch(const RecordContext& ctx) { corrupted(ctx, "checksum mismatch"); }

void parse_record(const void* data, size_t size, bool verify_checksum,
                  const RecordContext& ctx, std::vector<FieldView>& out,
                  const std::vector<FieldSchema>* schema) {
  const char* base = static_cast<const char*>(data);
  if (size >= 9 && record_version(data, size) == kCompactFormatVersion) {
    uint32_t magic = 0;
    std::memcpy(&magic, base, 4);
    if (magic != kRecordMagic) corrupted(ctx, "bad magic (not a torch_lmdb record)");
    parse_compact(base, size, verify_checksum, ctx, out, schema);
    return;
  }
  parse_cereal(base, size, verify_checksum, ctx, out);
}

void decode_compressed(const FieldView& view, void* dst) {
  if (view.in_column) {
    if (view.data == nullptr) corrupted(view.ctx, "field '" + view.printable_name() + "' is in a column its value does not hold");
    return detail::decode_column(view, dst);
  }
  std::string problem = blosc_problem(view);
  if (problem.empty()) {
    const int n = blosc_decompress_ctx(view.data, dst, static_cast<size_t>(view.nbytes), 1);
    if (n < 0 || static_cast<uint64_t>(n) != view.nbytes)
      problem = std::string("Blosc (") + codec_name(view.codec) + ") failed to decompress the payload (code " +
                std::to_string(n) + ")";
  }
  if (!problem.empty()) corrupted(view.ctx, "field '" + view.printable_name() + "': " + problem);
}

at::Tensor to_tensor(const FieldView& view) {
  at::Tensor t = at::empty(view.shape(), at::TensorOptions().dtype(view.dtype));
  decode_payload(view, t.data_ptr());
  return t;
}

Sample to_sample(std::vector<Field> fields) {
  Sample s;
  s.reserve(fields.size());
  for (Field& f : fields) s.insert(std::move(f.name), std::move(f.tensor));
  return s;
}

bool parse_record_cached(const void* data, size_t size, bool verify_checksum, const RecordContext& ctx,
                         std::vector<FieldView>& out, RecordTemplate& tmpl, const std::vector<FieldSchema>* schema) {
  const char* base = static_cast<const char*>(data);
  if (record_version(data, size) == kCompactFormatVersion) {
    parse_record(data, size, verify_checksum, ctx, out, schema);
    return false;
  }
  if (size == tmpl.size && !tmpl.views.empty()) {
    bool same = true;
    size_t at = 0;
    for (const auto& [begin, end] : tmpl.segments) {
      if (std::memcmp(base + begin, tmpl.bytes.data() + at, end - begin) != 0) {
        same = false;
        break;
      }
      at += end - begin;
    }
    if (same) {
      body_end(base, size, tmpl.has_checksum, 0, verify_checksum, ctx);  // (tmpl.body_end: the size matched)
      out.resize(tmpl.views.size());
      for (size_t i = 0; i < out.size(); ++i) {
        out[i] = tmpl.views[i];
        out[i].name = base + reinterpret_cast<uintptr_t>(tmpl.views[i].name);
        out[i].data = base + reinterpret_cast<uintptr_t>(tmpl.views[i].data);
        out[i].ctx = ctx;
        // The template holds the layout, not the payload: a compressed
        // payload's Blosc header is checked as parse_record checks it.
        if (out[i].codec != Codec::None) {
          const std::string problem = blosc_problem(out[i]);
          if (!problem.empty()) corrupted(ctx, "field '" + out[i].printable_name() + "': " + problem);
        }
      }
      return true;
    }
  }
  parse_record(data, size, verify_checksum, ctx, out);
  // Remember this layout: non-data bytes between the fields' data.
  tmpl.views.clear();
  tmpl.segments.clear();
  tmpl.bytes.clear();
  uint16_t flags;
  std::memcpy(&flags, base + 6, 2);
  tmpl.has_checksum = (flags & 1) != 0;
  tmpl.body_end = tmpl.has_checksum ? size - 8 : size;
  size_t start = 0;
  for (const FieldView& v : out) {
    const size_t begin = v.data != nullptr ? static_cast<size_t>(v.data - base) : 0;
    if (v.data == nullptr || begin < start || begin + v.stored > tmpl.body_end) {  // unusual: do not cache
      tmpl.size = 0;
      tmpl.views.clear();
      return false;
    }
    tmpl.segments.emplace_back(start, begin);
    start = begin + v.stored;
  }
  tmpl.segments.emplace_back(start, tmpl.body_end);
  for (const auto& [begin, end] : tmpl.segments) tmpl.bytes.append(base + begin, end - begin);
  for (FieldView v : out) {
    v.name = reinterpret_cast<const char*>(static_cast<uintptr_t>(v.name - base));
    v.data = reinterpret_cast<const char*>(static_cast<uintptr_t>(v.data - base));
    tmpl.views.push_back(v);
  }
  tmpl.size = size;
  return false;
}

}  // namespace torch_lmdb
