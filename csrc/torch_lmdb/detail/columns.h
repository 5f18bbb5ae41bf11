#pragma once
// Internal (not installed): columnar packed values (format version 5; docs/FORMAT.md
// "Columnar packed value"). In a packed value, the bytes of a small tensor field (its
// payloads stored raw: under kMinCompressBytes) of consecutive records are compressed
// together as one column, as Zarr compresses a chunk; each record keeps the field's
// sizes with codec byte 3 and no payload.
//
//   u32 magic "TLMC", u32 n, u32 ends[n] (as in "TLMP"), u32 section bytes,
//   the column section, then the records (their ends count from here).
//   Column section: u32 count, then per column (ordered by field, then slot):
//     u32 field (schema position), u32 first slot, u32 slots, u8 codec (1 lz4,
//     2 zstd), u8 flags (bit 0: the column starts with u32 ends[slots], for a
//     field whose shape varies), u32 raw bytes (at most kMaxColumnBytes), u32
//     stored bytes, one Blosc frame that decompresses to the column: [ends] then
//     the bytes of the field of records first .. first + slots - 1, back to back;
//   then u64 xxh3-64 of the section's preceding bytes.
// The writer makes columns of about kColumnGroupBytes and keeps a column only
// when Blosc makes it (with its 22-byte entry) smaller than the records' bytes.
//
// Contract
// - resolve_columns() validates the section (every count and length against
//   its size, the columns' order and slots, codecs, the raw bound) and the
//   Blosc header of each frame it points a view at (whose bytes must fit in
//   its column), before a view points into it, and with `verify` the
//   section's checksum; it throws CorruptedError naming the path and index. It
//   reads only the section. parse_record() bounds a column field's bytes by
//   kMaxColumnBytes.
// - A resolved view decodes through decode_payload(): its column is
//   decompressed (at most kMaxColumnBytes bytes) and the sample's bytes, checked
//   to lie in the column, copied (decode_column). Each thread keeps its last 64
//   decoded columns and reuses one only for a frame at the same address with
//   the same bytes (compared in full).
// - append_columnar() writes a value that reads back the same records as
//   append_packed() of the same records would; it uses columns only where they
//   make the value smaller (each with its entry, and the section's own 16 bytes).
// - All functions are thread-safe (thread-local scratch only).
#include <cstdint>
#include <string>
#include <vector>

#include "torch_lmdb/detail/record_format.h"

namespace torch_lmdb {
namespace detail {

/// Points the `in_column` views of a record of the columnar value whose section is
/// `columns` at their columns (throws CorruptedError when one has none, or when
/// `columns` is empty: the value is not columnar). With `verify`, checks the
/// section's checksum first.
void resolve_columns(const PackedColumns& columns, std::vector<FieldView>& views, bool verify,
                     const RecordContext& ctx);

/// Whether any of `views` is in a column.
inline bool any_in_column(const std::vector<FieldView>& views) noexcept {
  for (const FieldView& v : views)
    if (v.in_column) return true;
  return false;
}

/// A compact record (version 4) rebuilt from its parsed `views` (in the
/// schema's order), appended to `out` with a checksum when `checksum`: a field
/// with `to_column[f]` set gets codec byte 3 and no payload (its bytes go to
/// the value's column); a resolved column view is decoded and stored raw;
/// every other field is copied as stored. Returns the record's size.
size_t append_compact_views(const std::vector<FieldView>& views, const std::vector<bool>& to_column, bool checksum,
                            std::string& out);

/// decode_payload() of a resolved column view.
void decode_column(const FieldView& view, void* dst);

/// Appends to `out` the packed value of the compact records [records, records +
/// ends.back()) (samples `first`..): a columnar value when compressing the small
/// fields with `codecs` (per schema field) saves bytes, else append_packed().
/// `delta` (sized like `schema`) gets, per field, its column's stored bytes minus
/// the raw payload bytes the records held (0 for fields left in the records).
void append_columnar(const char* records, const std::vector<size_t>& ends, const std::vector<FieldSchema>& schema,
                     const std::vector<Compression>& codecs, const std::string& path, uint64_t first,
                     std::string& out, std::vector<int64_t>& delta);

/// The records of the value [data, data + size) (packed or columnar, `n`
/// records, at most `max_records`), each as a record holding all its bytes
/// (fields of a column stored raw), appended to `out` with their ends; `delta`
/// (sized like `schema`) gets the value's column delta as append_columnar()
/// computes it. False when the value is damaged (throws CorruptedError for a
/// damaged column or record).
bool expand_records(const char* data, size_t size, size_t n, size_t max_records,
                    const std::vector<FieldSchema>& schema, const RecordContext& ctx, std::string& out,
                    std::vector<size_t>& ends, std::vector<int64_t>& delta);

}  // namespace detail
}  // namespace torch_lmdb
