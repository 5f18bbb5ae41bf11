#include "torch_lmdb/detail/record_format.h"

#include <c10/util/Exception.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR: which ScalarTypes this torch has

#include <string>

#include "torch_lmdb/errors.h"

// The names of the format's dtypes, field kinds and codecs (metadata and
// messages), each parsed next to its enum (record.h).

namespace torch_lmdb {
namespace {

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

const char* codec_name(Codec c) noexcept {
  switch (c) {
    case Codec::BloscLZ4: return "lz4";
    case Codec::BloscZstd: return "zstd";
    default: return "none";
  }
}

Compression parse_compression(const std::string& spec, const std::string& what) {
  Compression c;
  const size_t colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  auto bad = [&](const std::string& why) {
    TORCH_CHECK_VALUE(false, "compression for ", what, ": ", why,
                      "; expected none, lz4 or zstd, optionally with a level 1-9 (\"zstd:5\")");
  };
  if (name.empty() || name == "none") {
    if (colon != std::string::npos) bad("'" + spec + "' gives a level to no codec");
    return c;
  }
  if (name == "lz4") {
    c.codec = Codec::BloscLZ4;
  } else if (name == "zstd") {
    c.codec = Codec::BloscZstd;
  } else {
    bad("unknown codec '" + spec + "'");
  }
  if (colon != std::string::npos) {
    const std::string level = spec.substr(colon + 1);
    if (level.size() != 1 || level[0] < '1' || level[0] > '9') bad("level '" + level + "' is not 1-9");
    c.level = level[0] - '0';
  }
  return c;
}

std::string compression_spec(const Compression& c) {
  if (c.codec == Codec::None) return "none";
  return std::string(codec_name(c.codec)) + ":" + std::to_string(c.level);
}

}  // namespace torch_lmdb
