// torch_lmdb/detail/field_codecs.h -- the codec of each field a Writer
// encodes with, and the payload bytes each field holds (metadata
// `compression`, docs/FORMAT.md).
//
// Contract
// - resolve(): one codec per schema field (str/bytes fields: none); a codec
//   naming a field the schema lacks raises c10::ValueError naming it.
// - adopt(): appending, the codecs the database's metadata names become
//   this writer's when `keep` (no codec given); the specs of the records
//   already written are remembered when they differ, so json() lists every
//   codec the database holds. A codec this torch_lmdb does not know raises
//   CorruptedError naming the field and the file.
// - adopt_byte_counts(): the counts continue the metadata's; a database
//   that holds samples without them leaves the counts unknown (json() then
//   leaves them out).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/record.h"

namespace torch_lmdb::detail {

struct FieldCodecs {
  std::vector<Compression> codecs;  // per schema field
  // Per schema field: the codec specs ("zstd:5", ...) of the records already
  // in the database when other than this writer's (metadata `codecs`).
  std::vector<std::vector<std::string>> earlier;
  std::vector<uint64_t> stored_bytes, raw_bytes;  // per schema field, over the whole database
  bool counts_known = true;                       // false: appended to a database without counts

  void resolve(const std::vector<FieldSchema>& schema, const Compression& default_codec,
               const std::map<std::string, std::string>& field_compression, const std::string& path);
  void adopt(const Json& old, size_t counted, const std::vector<FieldSchema>& schema, bool keep,
             const std::string& path);
  void adopt_byte_counts(const Json& old, size_t counted, const std::vector<FieldSchema>& schema);
  /// Some field has a codec.
  bool any() const noexcept;
  /// Metadata `compression` of `schema`, with `raw` as the decoded bytes per field.
  Json json(const std::vector<FieldSchema>& schema, const std::vector<uint64_t>& raw) const;
};

}  // namespace torch_lmdb::detail
