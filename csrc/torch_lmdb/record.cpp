#include "torch_lmdb/record.h"

#include <cereal/archives/binary.hpp>
#include <c10/util/Exception.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstring>
#include <istream>
#include <limits>
#include <ostream>
#include <streambuf>

#include "torch_lmdb/errors.h"
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR: which ScalarTypes this torch has

namespace torch_lmdb {
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

[[noreturn]] void corrupted(const RecordContext& ctx, const std::string& what) {
  const std::string path = ctx.path ? *ctx.path : std::string("<memory>");
  throw CorruptedError("corrupted record at '" + path + "' index " +
                           std::to_string(ctx.index) + ": " + what +
                           "; run `torch-lmdb verify` on this database",
                       0, path);
}

#define TORCH_LMDB_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// Every dtype the format names (codes never change; names are torch's, e.g. torch.uint16),
// with the first torch release that has it.
struct FormatDtype {
  DtypeCode code;
  const char* name;
  const char* since;
};

const FormatDtype kFormatDtypes[] = {
    {DtypeCode::Bool, "bool", "1.0"},          {DtypeCode::UInt8, "uint8", "1.0"},
    {DtypeCode::Int8, "int8", "1.0"},          {DtypeCode::Int16, "int16", "1.0"},
    {DtypeCode::Int32, "int32", "1.0"},        {DtypeCode::Int64, "int64", "1.0"},
    {DtypeCode::Float16, "float16", "1.0"},    {DtypeCode::BFloat16, "bfloat16", "1.0"},
    {DtypeCode::Float32, "float32", "1.0"},    {DtypeCode::Float64, "float64", "1.0"},
    {DtypeCode::Complex64, "complex64", "1.0"}, {DtypeCode::Complex128, "complex128", "1.0"},
    {DtypeCode::Complex32, "complex32", "1.13"},
    {DtypeCode::UInt16, "uint16", "2.3"},      {DtypeCode::UInt32, "uint32", "2.3"},
    {DtypeCode::UInt64, "uint64", "2.3"},
    {DtypeCode::Float8E5M2, "float8_e5m2", "2.1"},
    {DtypeCode::Float8E4M3FN, "float8_e4m3fn", "2.1"},
    {DtypeCode::Float8E5M2FNUZ, "float8_e5m2fnuz", "2.2"},
    {DtypeCode::Float8E4M3FNUZ, "float8_e4m3fnuz", "2.2"},
};

struct DtypeInfo {
  at::ScalarType type;
  DtypeCode code;
  const char* name;
};

// The format's dtypes this build of torch has.
const DtypeInfo kDtypes[] = {
    {at::kBool, DtypeCode::Bool, "bool"},
    {at::kByte, DtypeCode::UInt8, "uint8"},
    {at::kChar, DtypeCode::Int8, "int8"},
    {at::kShort, DtypeCode::Int16, "int16"},
    {at::kInt, DtypeCode::Int32, "int32"},
    {at::kLong, DtypeCode::Int64, "int64"},
    {at::kHalf, DtypeCode::Float16, "float16"},
    {at::kBFloat16, DtypeCode::BFloat16, "bfloat16"},
    {at::kFloat, DtypeCode::Float32, "float32"},
    {at::kDouble, DtypeCode::Float64, "float64"},
    {at::kComplexFloat, DtypeCode::Complex64, "complex64"},
    {at::kComplexDouble, DtypeCode::Complex128, "complex128"},
    {at::kComplexHalf, DtypeCode::Complex32, "complex32"},
#if TORCH_LMDB_TORCH_AT_LEAST(2, 1)
    {at::ScalarType::Float8_e5m2, DtypeCode::Float8E5M2, "float8_e5m2"},
    {at::ScalarType::Float8_e4m3fn, DtypeCode::Float8E4M3FN, "float8_e4m3fn"},
#endif
#if TORCH_LMDB_TORCH_AT_LEAST(2, 2)
    {at::ScalarType::Float8_e5m2fnuz, DtypeCode::Float8E5M2FNUZ, "float8_e5m2fnuz"},
    {at::ScalarType::Float8_e4m3fnuz, DtypeCode::Float8E4M3FNUZ, "float8_e4m3fnuz"},
#endif
#if TORCH_LMDB_TORCH_AT_LEAST(2, 3)
    {at::ScalarType::UInt16, DtypeCode::UInt16, "uint16"},
    {at::ScalarType::UInt32, DtypeCode::UInt32, "uint32"},
    {at::ScalarType::UInt64, DtypeCode::UInt64, "uint64"},
#endif
};

std::string available_dtype_names() {
  std::string out;
  for (const auto& d : kDtypes) out += (out.empty() ? "" : ", ") + std::string(d.name);
  return out;
}

}  // namespace

DtypeCode dtype_code(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.code;
  TORCH_CHECK_TYPE(false, "unsupported dtype ", t, "; torch_lmdb stores ", available_dtype_names());
}

at::ScalarType dtype_from_code(uint8_t code, bool* ok) noexcept {
  for (const auto& d : kDtypes) {
    if (static_cast<uint8_t>(d.code) == code) {
      *ok = true;
      return d.type;
    }
  }
  *ok = false;
  return at::kByte;
}

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
}

at::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  TORCH_CHECK_VALUE(false, "unknown dtype name '", name, "' in metadata");
}

at::ScalarType field_dtype_from_name(const std::string& name, const std::string& field,
                                     const std::string& path) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  for (const auto& d : kFormatDtypes) {
    if (name == d.name) {
      throw InvalidDatabaseError("'" + path + "': field '" + field + "' has dtype " + name +
                                     ", which this torch (" + std::to_string(TORCH_VERSION_MAJOR) + "." +
                                     std::to_string(TORCH_VERSION_MINOR) + ") lacks; read it with torch >= " +
                                     d.since,
                                 0, path);
    }
  }
  throw InvalidDatabaseError("'" + path + "': field '" + field + "' has dtype '" + name +
                                 "', which torch_lmdb's format does not name (a newer torch_lmdb wrote it?)",
                             0, path);
}

const char* kind_name(FieldKind k) noexcept {
  switch (k) {
    case FieldKind::Str: return "str";
    case FieldKind::Bytes: return "bytes";
    default: return "tensor";
  }
}

FieldKind kind_from_name(const std::string& name) {
  if (name == "tensor") return FieldKind::Tensor;
  if (name == "str") return FieldKind::Str;
  if (name == "bytes") return FieldKind::Bytes;
  TORCH_CHECK_VALUE(false, "unknown field kind '", name, "' in metadata");
}

void encode_record(const std::vector<Field>& fields, bool checksum, std::string& out) {
  out.clear();
  append_record(fields, checksum, out);
}

size_t append_record(const std::vector<Field>& fields, bool checksum, std::string& out) {
  TORCH_CHECK(host_is_little_endian(), "torch_lmdb writes little-endian records only");
  const size_t start = out.size();
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
    const uint16_t version = kFormatVersion;
    const uint16_t flags = checksum ? 1 : 0;
    const uint32_t count = static_cast<uint32_t>(fields.size());
    ar(magic, version, flags, count);
    for (const Field& f : fields) {
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
      uint8_t code;
      try {
        code = static_cast<uint8_t>(dtype_code(f.tensor.scalar_type()));
      } catch (const c10::TypeError& e) {
        TORCH_CHECK_TYPE(false, "field '", f.name, "': ", e.what_without_backtrace());
      }
      // resolve_conj/resolve_neg: a conj() or neg() view shares its base's
      // memory with a lazy bit that contiguous() keeps; store the values.
      const at::Tensor t = f.tensor.resolve_conj().resolve_neg().contiguous();
      const uint64_t name_len = f.name.size();
      ar(name_len, cereal::binary_data(f.name.data(), name_len));
      const uint8_t kind = static_cast<uint8_t>(f.kind);
      const uint8_t ndim = static_cast<uint8_t>(t.dim());
      ar(kind, code, ndim);
      for (int64_t s : t.sizes()) ar(s);
      const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
      ar(nbytes);
      if (nbytes > 0) ar(cereal::binary_data(t.data_ptr(), nbytes));
    }
  } catch (...) {
    out.resize(start);  // never leave half a record behind
    enc.sink.target(nullptr);
    enc.os.clear();  // a failed append (bad_alloc) sets badbit on the reused stream
    throw;
  }
  enc.sink.target(nullptr);
  if (checksum) {
    const uint64_t h = XXH3_64bits(out.data() + start, out.size() - start);
    out.append(reinterpret_cast<const char*>(&h), sizeof(h));
  }
  return out.size() - start;
}

void parse_record(const void* data, size_t size, bool verify_checksum,
                  const RecordContext& ctx, std::vector<FieldView>& out) {
  const char* base = static_cast<const char*>(data);
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
  if (version != kFormatVersion) {
    const std::string path = ctx.path ? *ctx.path : std::string();
    throw InvalidDatabaseError("record at '" + path + "' index " + std::to_string(ctx.index) +
                                   " has format version " + std::to_string(version) +
                                   "; this torch_lmdb reads version " +
                                   std::to_string(kFormatVersion),
                               0, path);
  }
  if (flags & ~uint16_t{1}) corrupted(ctx, "unknown flags " + std::to_string(flags));
  const bool has_checksum = (flags & 1) != 0;
  size_t end = size;  // end of the checksummed body
  if (has_checksum) {
    if (size < kHeader + 8) corrupted(ctx, "truncated checksum");
    end = size - 8;
    if (verify_checksum) {
      uint64_t stored;
      std::memcpy(&stored, base + end, 8);
      if (XXH3_64bits(base, end) != stored) corrupted(ctx, "checksum mismatch");
    }
  }
  // Each field takes at least 8 + 1 + 3 + 8 bytes: bound the count before resizing.
  constexpr size_t kMinField = 20;
  if (count > (end - kHeader) / kMinField + 1)
    corrupted(ctx, "field count " + std::to_string(count) + " does not fit in " +
                       std::to_string(size) + " bytes");
  out.resize(count);
  auto avail = [&]() -> size_t {
    const size_t pos = size - src.remaining();
    return pos > end ? 0 : end - pos;
  };
  try {
    for (uint32_t i = 0; i < count; ++i) {
      FieldView& f = out[i];
      uint64_t name_len = 0;
      ar(name_len);
      if (name_len == 0 || name_len > avail())
        corrupted(ctx, "field " + std::to_string(i) + " has a name length of " +
                           std::to_string(name_len));
      f.name = src.current();
      f.name_size = static_cast<size_t>(name_len);
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
        numel = 0;
      } else {
        for (int d = 0; d < ndim; ++d) {
          if (__builtin_mul_overflow(numel, static_cast<uint64_t>(f.sizes[d]), &numel) || numel > size)
            corrupted(ctx, "field '" + f.printable_name() + "' has shape " + c10::str(f.shape()) +
                               " that does not fit in a " + std::to_string(size) + "-byte value");
        }
      }
      ar(f.nbytes);
      const uint64_t itemsize = c10::elementSize(f.dtype);
      if (f.nbytes != numel * itemsize)
        corrupted(ctx, "field '" + f.printable_name() + "' declares " + std::to_string(f.nbytes) +
                           " bytes for " + std::to_string(numel) + " elements of " + dtype_name(f.dtype));
      if (f.nbytes > avail())
        corrupted(ctx, "field '" + f.printable_name() + "' payload of " + std::to_string(f.nbytes) +
                           " bytes runs past the end of the " + std::to_string(size) + "-byte value");
      f.data = src.current();
      src.skip(static_cast<size_t>(f.nbytes));
    }
  } catch (const cereal::Exception& e) {
    corrupted(ctx, std::string("truncated field header: ") + e.what());
  }
  if (size - src.remaining() != end)
    corrupted(ctx, std::to_string(end - (size - src.remaining())) + " unexpected bytes after the last field");
}

at::Tensor to_tensor(const FieldView& view) {
  at::Tensor t = at::empty(view.shape(), at::TensorOptions().dtype(view.dtype));
  if (view.nbytes > 0) std::memcpy(t.data_ptr(), view.data, view.nbytes);
  return t;
}

Sample to_sample(std::vector<Field> fields) {
  Sample s;
  s.reserve(fields.size());
  for (Field& f : fields) s.insert(std::move(f.name), std::move(f.tensor));
  return s;
}

bool parse_record_cached(const void* data, size_t size, bool verify_checksum, const RecordContext& ctx,
                         std::vector<FieldView>& out, RecordTemplate& tmpl) {
  const char* base = static_cast<const char*>(data);
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
      if (verify_checksum && tmpl.has_checksum) {
        uint64_t stored;
        std::memcpy(&stored, base + tmpl.body_end, 8);
        if (XXH3_64bits(base, tmpl.body_end) != stored) corrupted(ctx, "checksum mismatch");
      }
      out.resize(tmpl.views.size());
      for (size_t i = 0; i < out.size(); ++i) {
        out[i] = tmpl.views[i];
        out[i].name = base + reinterpret_cast<uintptr_t>(tmpl.views[i].name);
        out[i].data = base + reinterpret_cast<uintptr_t>(tmpl.views[i].data);
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
    if (v.data == nullptr || begin < start || begin + v.nbytes > tmpl.body_end) {  // unusual: do not cache
      tmpl.size = 0;
      tmpl.views.clear();
      return false;
    }
    tmpl.segments.emplace_back(start, begin);
    start = begin + v.nbytes;
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
