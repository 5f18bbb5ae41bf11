// torch_lmdb/detail/conform.h -- internal: a sample's fields held against a
// database's schema (the Writer's rule). Not installed.
//
// Contract
// - schema_of_first() is the schema a new database's first sample defines:
//   its fields in order, with their kinds, dtypes and shapes.
// - conform_fields() orders a later sample's fields like the schema and checks
//   each against its schema field; a size that differs from the schema's
//   becomes -1 there (a dimension that varies).
// - Errors name the sample's index (and the database's path): ValueError for
//   missing, repeated or extra fields, undefined tensors and dimensions;
//   TypeError for kinds and dtypes. Neither function keeps any state.
#pragma once

#include <string>
#include <vector>

#include "torch_lmdb/record.h"

namespace torch_lmdb {
namespace detail {

/// The schema sample `index` (a new database's first) defines. Throws
/// ValueError (no fields, a name twice, an undefined tensor) or TypeError (a
/// dtype the format does not store).
std::vector<FieldSchema> schema_of_first(const std::vector<Field>& fields, size_t index);

/// `fields` of sample `index` in the order of `schema`, into `ordered`
/// (copies of the fields). Sets `*widened` as soon as a size differs from
/// the schema's (it is then -1 in `schema`), even when a later field throws.
void conform_fields(std::vector<FieldSchema>& schema, const std::vector<Field>& fields, size_t index,
                    const std::string& path, std::vector<Field>& ordered, bool* widened);

}  // namespace detail
}  // namespace torch_lmdb
