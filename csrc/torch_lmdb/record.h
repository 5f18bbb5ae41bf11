// torch_lmdb/record.h -- samples, their fields and schema, the codecs of
// compressed fields, and the format versions a database may have.
//
// How a sample is laid out on disk (records, packed values) is internal to
// the library; docs/FORMAT.md describes it for readers written without this
// code.
//
// Contract
// - All functions are thread-safe (no shared state).
#pragma once

#include <ATen/ATen.h>
#include <torch/ordered_dict.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torch_lmdb {

/// A sample: named tensors, in insertion order. str/bytes fields are uint8
/// tensors in a Sample; use Field when the kind matters.
using Sample = torch::OrderedDict<std::string, at::Tensor>;

/// Records that name their fields, each with a codec byte (the
/// WriterOptions::format_version of a new database without codecs or packing).
constexpr uint16_t kFormatVersion = 2;
/// Metadata `format_version` of a database whose LMDB values each hold up to
/// `samples_per_value` records (metadata key; > 1). Its records are version
/// 2 (or 1); version 1 and 2 databases hold one record per value.
constexpr uint16_t kPackedFormatVersion = 3;
/// Compact records (fields by schema position) and the metadata
/// `format_version` of a database that holds them (packed or not).
constexpr uint16_t kCompactFormatVersion = 4;
/// Metadata `format_version` of a packed database of compact records whose
/// values may hold small fields in columns (docs/FORMAT.md "Columnar packed
/// value"): what a new compressed, packed database is.
constexpr uint16_t kColumnarFormatVersion = 5;
/// The newest metadata format version this library reads and writes.
constexpr uint16_t kMaxFormatVersion = kColumnarFormatVersion;
/// The oldest record/metadata format version this library reads (and may write).
constexpr uint16_t kMinFormatVersion = 1;
constexpr int kMaxDims = 16;
/// The largest samples_per_value a database may declare (WriterOptions::samples_per_value).
constexpr uint32_t kMaxSamplesPerValue = 65536;

enum class FieldKind : uint8_t { Tensor = 0, Str = 1, Bytes = 2 };

/// Per-field payload codec stored in version 2 records (stable codes).
enum class Codec : uint8_t { None = 0, BloscLZ4 = 1, BloscZstd = 2 };

/// A codec with its level (Blosc clevel 1-9).
struct Compression {
  Codec codec = Codec::None;
  int level = 5;
  bool operator==(const Compression& o) const { return codec == o.codec && (codec == Codec::None || level == o.level); }
};

/// "none", "lz4", "zstd".
const char* codec_name(Codec c) noexcept;
/// Parses a codec spec: "" or "none", "lz4", "zstd", optionally with a level
/// ("zstd:5", 1-9; default 5). Throws c10::ValueError naming `what` (e.g.
/// "field 'cir'") on anything else.
Compression parse_compression(const std::string& spec, const std::string& what);
/// The spec text of `c` ("none", "lz4:5", ...).
std::string compression_spec(const Compression& c);

/// Payloads smaller than this are stored raw (codec none) whatever the
/// field's codec; so is any payload whose Blosc frame is not smaller than the
/// raw bytes, or larger than Blosc 1's 2^31 - 1 - 16 byte limit.
constexpr size_t kMinCompressBytes = 128;
/// In a packed database of format version 5, a field whose payloads are stored
/// raw (smaller than kMinCompressBytes) is compressed across consecutive samples
/// of one LMDB value, in columns of about kColumnGroupBytes (at most
/// kMaxColumnBytes): reading one sample decodes one column per such field.
constexpr size_t kColumnGroupBytes = 2048;
constexpr size_t kMaxColumnBytes = 8192;

/// A field with its kind (what Python needs to give back str/bytes).
struct Field {
  std::string name;
  FieldKind kind = FieldKind::Tensor;
  at::Tensor tensor;  // str/bytes: 1-D uint8
};

/// Schema of one field as stored in the metadata (-1 = dimension varies).
struct FieldSchema {
  std::string name;
  FieldKind kind = FieldKind::Tensor;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
};

/// "float32", "int64", ... (numpy-style names used in the metadata).
const char* dtype_name(at::ScalarType t);
at::ScalarType dtype_from_name(const std::string& name);
const char* kind_name(FieldKind k) noexcept;
FieldKind kind_from_name(const std::string& name);

/// Converts kind-tagged fields to a Sample (kinds dropped).
Sample to_sample(std::vector<Field> fields);

}  // namespace torch_lmdb
