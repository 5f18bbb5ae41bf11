// torch_lmdb/detail/record_format.h -- the on-disk record format (versions 2
// and 4; version 1 records are read too).
//
// A record (an LMDB value, or a slot of a packed value: packed_record) is a cereal binary
// archive (little-endian hosts only; the byte order is recorded in the metadata) of:
//   u32 magic: the bytes "TLMD" (0x444D4C54 read as little-endian u32)
//   u16 format version (2, or 1)   u16 flags (bit 0: checksum present)
//   u32 field count
//   per field: u64 name length, name bytes (UTF-8),
//              u8 kind (0 tensor, 1 str, 2 bytes), u8 dtype code (DtypeCode),
//              u8 ndim, ndim x i64 sizes,
//              [version 2 only: u8 codec (Codec: 0 none, 1 blosc-lz4, 2 blosc-zstd)]
//              u64 payload length, payload: codec none: the raw contiguous
//              little-endian element bytes; blosc-*: one Blosc 1 frame (byte
//              shuffle) that decompresses to those bytes
//   u64 xxh3-64 of every preceding byte (when flag bit 0 is set): it covers
//   the stored (compressed) bytes
// A compact record (version 4, kCompactFormatVersion) names its fields by
// their position in the database's schema, which gives each field's name,
// kind, dtype and ndim:
//   u32 magic "TLMD", u16 version 4, u16 flags (bit 0: checksum present),
//   varint field count (== the schema's)
//   per schema field: u8 codec, varint sizes[ndim],
//              [codec != none: varint payload length], payload
//   u64 xxh3-64 of every preceding byte (flag bit 0)
// (varint: unsigned LEB128 of at most 9 bytes, so below 2^63.)
// docs/FORMAT.md is the reference for readers written without this code.
//
// Contract
// - parse_record() validates every count and length against the value's size
//   before anything is allocated, and throws CorruptedError naming the path
//   and the sample index; it never reads outside [data, data + size). For a
//   compressed payload it also checks the Blosc header: the frame's length is
//   the payload length and it decompresses to exactly prod(sizes) * itemsize
//   bytes (at most 2^31 - 1: Blosc 1's limit), the codec named in the record.
// - A compact record is parsed only against a schema (parse_record's
//   `schema`): without one, InvalidDatabaseError; a field count other than
//   the schema's, CorruptedError. Its views' names point into the schema's
//   strings (valid while the schema lives).
// - FieldView pointers point into the caller's buffer (for LMDB: the map,
//   valid until the read transaction ends). Copy (decode_payload, to_tensor)
//   before the txn is released.
// - decode_payload() re-checks the Blosc header before decompressing (a
//   record matched by parse_record_cached was not re-parsed) and raises
//   CorruptedError naming the path, the index and the field when the payload
//   does not decompress to the expected bytes; it writes at most view.nbytes
//   bytes and reads only the view's stored bytes.
// - All functions are thread-safe (no shared state; Blosc is called through
//   its context API, which holds no global lock or state).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "torch_lmdb/record.h"

namespace torch_lmdb {

constexpr uint32_t kRecordMagic = 0x444D4C54u;  // bytes "TLMD" on disk

/// Stable on-disk dtype codes (never c10::ScalarType's numeric values).
enum class DtypeCode : uint8_t {
  Bool = 1, UInt8 = 2, Int8 = 3, Int16 = 4, Int32 = 5, Int64 = 6,
  Float16 = 7, BFloat16 = 8, Float32 = 9, Float64 = 10,
  Complex64 = 11, Complex128 = 12,
  Complex32 = 13, UInt16 = 14, UInt32 = 15, UInt64 = 16,          // torch >= 1.13 / 2.3
  Float8E5M2 = 17, Float8E4M3FN = 18,                             // torch >= 2.1
  Float8E5M2FNUZ = 19, Float8E4M3FNUZ = 20,                       // torch >= 2.2
};

/// Where a record came from, for error messages.
struct RecordContext {
  const std::string* path = nullptr;
  uint64_t index = 0;
};

/// Up to `limit` bytes of `p` for an error message: printable ASCII as is,
/// other bytes (and a backslash) as \xNN, "..." when cut (a damaged name or key
/// must not make the message itself invalid UTF-8).
inline std::string printable_bytes(const char* p, size_t n, size_t limit) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n && i < limit; ++i) {
    const unsigned char c = static_cast<unsigned char>(p[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  if (n > limit) out += "...";
  return out;
}

/// A parsed field pointing into the record's buffer.
struct FieldView {
  const char* name = nullptr;
  size_t name_size = 0;
  FieldKind kind = FieldKind::Tensor;
  at::ScalarType dtype = at::kFloat;
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  const char* data = nullptr;  ///< the stored payload (`stored` bytes)
  uint64_t nbytes = 0;         ///< the decoded payload: prod(sizes) * itemsize
  uint64_t stored = 0;         ///< bytes at `data` (== nbytes for codec none)
  Codec codec = Codec::None;   ///< str/bytes fields are always Codec::None (but in a column)
  RecordContext ctx;           ///< the record's path and index (for decode errors)
  /// A field of a compact record stored in its value's column (codec byte 3):
  /// `in_column` until resolve_columns() points `data`/`stored` at the
  /// column's frame, which decompresses to `column_bytes` bytes holding this
  /// sample's bytes in slot `column_slot` of `column_n` (detail/columns.h).
  bool in_column = false;
  bool column_ends = false;  ///< the column starts with u32 ends[column_n]
  uint32_t column_bytes = 0;
  uint32_t column_slot = 0;
  uint32_t column_n = 0;

  std::string name_str() const { return std::string(name, name_size); }
  /// The name for error messages: bytes outside printable ASCII as \xNN (a
  /// damaged name must not make the message itself invalid UTF-8).
  std::string printable_name() const { return printable_bytes(name, name_size, 256); }
  bool name_equals(const std::string& n) const {
    return n.size() == name_size && n.compare(0, n.size(), name, name_size) == 0;
  }
  at::IntArrayRef shape() const { return at::IntArrayRef(sizes, static_cast<size_t>(ndim)); }
};

DtypeCode dtype_code(at::ScalarType t);  // throws TypeError for unsupported dtypes
at::ScalarType dtype_from_code(uint8_t code, bool* ok) noexcept;
/// The dtype of schema field `field` of the database at `path`; throws InvalidDatabaseError
/// naming the field and the dtype when this torch lacks it (e.g. uint16 before torch 2.3)
/// or the format does not name it.
at::ScalarType field_dtype_from_name(const std::string& name, const std::string& field,
                                     const std::string& path);

/// Serializes fields into `out` (cleared first). Tensors must be on CPU;
/// non-contiguous tensors are written contiguous. Throws TypeError/ValueError
/// naming the field for unsupported dtypes, devices or too many dims.
void encode_record(const std::vector<Field>& fields, bool checksum, std::string& out);
/// Same record, appended to `out` (whose capacity is reused); returns the
/// record's size. On an exception `out` is left as it was.
size_t append_record(const std::vector<Field>& fields, bool checksum, std::string& out);

/// How append_record() encodes a record.
struct EncodeOptions {
  bool checksum = true;
  /// kFormatVersion, 1 (no codec byte; compression must be none), or
  /// kCompactFormatVersion (`fields` in the schema's order: names, kinds and
  /// dtypes are not stored).
  uint16_t version = kFormatVersion;
  /// Per field, in `fields` order (null: none). Tensor fields only: str/bytes
  /// payloads are always stored raw.
  const std::vector<Compression>* compression = nullptr;
  /// When set (sized like `fields`): each field's stored payload bytes are
  /// added, after the record was appended.
  std::vector<uint64_t>* stored_bytes = nullptr;
};
/// append_record() with compression (see kMinCompressBytes for what is
/// stored raw). Throws c10::ValueError for compression in a version 1 record.
size_t append_record(const std::vector<Field>& fields, const EncodeOptions& options, std::string& out);

/// Parses and validates a record; `out` is resized to the field count.
/// `verify_checksum` also checks the xxh3 (when the record carries one).
/// `schema`: the database's fields, needed by compact records (see above).
void parse_record(const void* data, size_t size, bool verify_checksum,
                  const RecordContext& ctx, std::vector<FieldView>& out,
                  const std::vector<FieldSchema>* schema = nullptr);

/// Throws the CorruptedError of a record whose checksum does not match, as
/// parse_record() with `verify_checksum` does.
[[noreturn]] void throw_checksum_mismatch(const RecordContext& ctx);
/// Throws CorruptedError("corrupted record at '<path>' index <i>: <what>; run ...").
[[noreturn]] void throw_corrupted_record(const RecordContext& ctx, const std::string& what);
/// The xxh3-64 (seed 0) of a record's bytes, as its checksum stores it.
uint64_t record_checksum(const void* p, size_t n) noexcept;
/// Appends `v` as an unsigned LEB128 varint (compact records).
void put_varint(std::string& out, uint64_t v);
/// Appends a compact record's header: magic, version 4, flags (bit 0:
/// `checksum`), the varint field count.
void put_compact_header(std::string& out, size_t fields, bool checksum);

/// The record version of the record at `data` (0 when it is too short to
/// tell); nothing else is checked.
inline uint16_t record_version(const void* data, size_t size) noexcept {
  uint16_t v = 0;
  if (size >= 6) std::memcpy(&v, static_cast<const char*>(data) + 4, 2);
  return v;
}

/// The layout of the last record parsed with it: every byte that is not
/// tensor data or the checksum, and where the names and data sit. A record
/// whose size and non-data bytes are identical has the same fields, kinds,
/// dtypes and shapes, so its views follow without parsing.
struct RecordTemplate {
  size_t size = 0;
  size_t body_end = 0;
  bool has_checksum = false;
  std::vector<std::pair<size_t, size_t>> segments;  // [begin, end) of non-data bytes
  std::string bytes;                                // their contents, back to back
  std::vector<FieldView> views;                     // name/data as offsets from the record start
};

/// parse_record(), skipping the parse when the record matches `tmpl` (which
/// is updated otherwise). Same results and errors as parse_record(). Returns
/// true when the record matched the template. A compact record is parsed
/// against `schema` (no template: its parse is a few varints) and returns
/// false, leaving `tmpl` as it was.
bool parse_record_cached(const void* data, size_t size, bool verify_checksum, const RecordContext& ctx,
                         std::vector<FieldView>& out, RecordTemplate& tmpl,
                         const std::vector<FieldSchema>* schema = nullptr);

/// Writes the field's decoded payload (view.nbytes bytes) to `dst`: a copy
/// for codec none, a Blosc decompression otherwise (throws CorruptedError
/// naming view.ctx's path and index and the field when it fails).
void decode_compressed(const FieldView& view, void* dst);
inline void decode_payload(const FieldView& view, void* dst) {
  if (view.codec == Codec::None && !view.in_column) {
    if (view.nbytes) std::memcpy(dst, view.data, view.nbytes);
  } else {
    decode_compressed(view, dst);
  }
}

/// Copies (decodes) a parsed field into a new tensor (str/bytes: 1-D uint8).
at::Tensor to_tensor(const FieldView& view);

/// Packed values (databases of kPackedFormatVersion): the value of key v holds
/// the records of samples v*K .. v*K+n-1 (K = samples_per_value, 1 <= n <= K):
///   u32 magic "TLMP", u32 n, u32 ends[n] (the end of each record, counted
///   from the first record's start; non-decreasing), the records back to back.
constexpr uint32_t kPackMagic = 0x504D4C54u;  // bytes "TLMP" on disk
/// Bytes before the first record of a packed value of `n` records.
constexpr size_t packed_header_bytes(size_t n) { return 8 + 4 * n; }
/// The record in `slot` of the packed value [data, data + size): sets
/// `record`/`record_size` and returns true; false (leaving them) when the
/// value is not a packed value of at most `max_records` records, an end lies
/// outside the value or before the previous one, or the value holds no
/// record `slot`. Reads only [data, data + size).
/// A columnar packed value (kColumnPackMagic, format version 5) is read too:
/// `columns` (when given) gets its column section and the slot, else is left
/// empty (data == nullptr).
struct PackedColumns {
  const char* data = nullptr;  ///< the column section (detail/columns.h), or null
  size_t size = 0;
  uint32_t n = 0;              ///< records in the value
  uint32_t slot = 0;           ///< the record's slot
};
constexpr uint32_t kColumnPackMagic = 0x434D4C54u;  // bytes "TLMC" on disk
/// The codec byte of a compact record's field whose bytes are in its value's column.
constexpr uint8_t kColumnCodecByte = 3;
bool packed_record(const void* data, size_t size, size_t slot, size_t max_records, const char** record,
                   size_t* record_size, PackedColumns* columns = nullptr) noexcept;
/// Appends to `out` the packed value of the records [records, records + ends.back())
/// whose ends (from `records`) are `ends` (at most kMaxSamplesPerValue).
void append_packed(const char* records, const std::vector<size_t>& ends, std::string& out);

}  // namespace torch_lmdb
