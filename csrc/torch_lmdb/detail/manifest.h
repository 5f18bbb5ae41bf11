// torch_lmdb/detail/manifest.h -- internal: a shard directory's manifest.json, and
// each shard checked against what its manifest says. Not installed.
//
// Contract
// - expand_paths(given, expect): a plain database path stays; a directory
//   holding manifest.json becomes the shards it lists, in its order (README
//   "Shards with a manifest"); a directory of shards without one (an
//   unfinished write: the manifest is written last) is refused, named.
//   `expect` gets one entry per returned path (empty for a plain path).
// - A manifest is refused with InvalidDatabaseError naming it and the entry
//   when it is larger than 64 MiB, not JSON, nested too deep, of another
//   format or version, or lists a shard outside its directory (a path with
//   "..", absolute, or resolving through a symlink out of it), twice, or
//   with sample counts that do not add up; a listed shard without data.mdb
//   raises NotFoundError.
// - check_shard() throws InvalidDatabaseError naming the shard, its index and
//   the manifest when the opened shard's sample count, fields, metadata
//   checksum or (version 2) identity differ from the manifest's.
// - Thread safety: pure functions (they read files, hold no state).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/record.h"

namespace torch_lmdb {
namespace detail {

/// What a manifest says of one shard (all empty for a plain database path).
struct ShardExpectation {
  std::string manifest;  // path of manifest.json; empty for a plain database path
  size_t shard = 0;      // index in the manifest's list
  size_t num_samples = 0;
  std::string meta_checksum;
  std::vector<FieldSchema> schema;
  std::string dataset_id;  // manifest version 2: the identity the shard's metadata must state
  size_t shards = 0;       // how many the manifest lists
};

/// Plain database paths stay; manifest directories become their shards.
std::vector<std::string> expand_paths(const std::vector<std::string>& given, std::vector<ShardExpectation>& expect);

/// Checks the opened shard `path` (its metadata, sample count and schema)
/// against its manifest's expectation `e` (nothing for a plain path).
void check_shard(const std::string& path, const Json& meta, size_t num_samples,
                 const std::vector<FieldSchema>& schema, const ShardExpectation& e);

}  // namespace detail
}  // namespace torch_lmdb
