// torch_lmdb/selection.h -- a view of a dataset restricted to some samples,
// and named selections stored beside the data.
//
// Contract
// - A Selection is a list of sample indices of one dataset (any order);
//   position p of the view reads sample at(p). Copies share the list
//   (immutable, thread-safe, fork-safe: plain memory).
// - Selection(indices, num_samples, allow_duplicates) throws IndexError
//   naming the position of an index >= num_samples, and ValueError naming the
//   index of a duplicate unless allow_duplicates.
// - Stored selections: a database directory or a shard directory `path`
//   keeps selection `name` in `path/selections/<name>.sel` (selection_path;
//   names are 1-128 characters of [A-Za-z0-9._-] not starting with '.', else
//   ValueError). The file (little-endian): magic "TLMDBSEL", u32 version (1),
//   u32 flags (bit 0: sorted ascending), u64 the dataset's sample count, u64
//   the dataset's identity (data_identity), u64 count, count u64 indices,
//   then the xxh3-64 of every preceding byte.
// - save_selection writes `<file>.tmp-<pid>` and renames it over the file
//   (a reader sees the old or the new file, never a part).
// - load_selection checks, before allocating, that the file's size matches
//   its count; then the checksum, the magic and version, and that its sample
//   count and identity are those of the data: CorruptedError (a damaged
//   file) or InvalidDatabaseError (built for other data: "rebuild it")
//   naming the file; NotFoundError when it does not exist.
// - data_identity(reader) is the xxh3-64 of each file's schema and
//   `created_with` metadata and its sample count, in order: appending,
//   rewriting or reordering the data changes it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "torch_lmdb/reader.h"

namespace torch_lmdb {

class Selection {
 public:
  Selection() : indices_(std::make_shared<const std::vector<uint64_t>>()) {}
  Selection(std::vector<uint64_t> indices, size_t num_samples, bool allow_duplicates = false);
  size_t size() const noexcept { return indices_->size(); }
  size_t at(size_t position) const noexcept { return static_cast<size_t>((*indices_)[position]); }
  const std::vector<uint64_t>& indices() const noexcept { return *indices_; }
  bool sorted() const noexcept;

 private:
  std::shared_ptr<const std::vector<uint64_t>> indices_;
};

/// `path/selections/<name>.sel`; ValueError for an invalid name.
std::string selection_path(const std::string& path, const std::string& name);
/// Names of the selections stored for `path` (sorted; empty when none).
std::vector<std::string> list_selections(const std::string& path);
uint64_t data_identity(const Reader& reader);
void save_selection(const std::string& file, const Selection& selection, uint64_t num_samples, uint64_t identity);
Selection load_selection(const std::string& file, uint64_t num_samples, uint64_t identity);

}  // namespace torch_lmdb
