// libFuzzer target: a metadata value as read from a file (detail/meta.h): the depth
// scan, the parse, validate_meta() and schema_from_json(). Only
// CorruptedError (a value that is not JSON or nests too deep: damage, from
// the parse) and InvalidDatabaseError (a value of the wrong kind, from the
// checks) may come out, naming the file; the depth scan must bound what the
// parser nests (checked against the parsed value's real depth).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "torch_lmdb/detail/meta.h"

using namespace torch_lmdb;

namespace {

// Depth of a parsed value, without recursion.
size_t value_depth(const torch_lmdb::detail::Json& root) {
  size_t deepest = 0;
  std::vector<std::pair<const torch_lmdb::detail::Json*, size_t>> todo{{&root, 0}};
  while (!todo.empty()) {
    auto [v, d] = todo.back();
    todo.pop_back();
    if (!v->is_structured()) continue;
    deepest = std::max(deepest, d + 1);
    for (const auto& child : *v) todo.push_back({&child, d + 1});
  }
  return deepest;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<char> text(data, data + size);
  const std::string path = "fuzz.lmdb";
  torch_lmdb::detail::Json meta;
  try {
    meta = torch_lmdb::detail::parse_meta_value(text.data(), text.size(), path, "meta");
  } catch (const CorruptedError& e) {
    if (std::string(e.what()).find("'fuzz.lmdb'") == std::string::npos) std::abort();
    return 0;
  }
  const size_t real = value_depth(meta);
  if (real > torch_lmdb::detail::json_depth(text.data(), text.size()) || real > torch_lmdb::detail::kMaxMetaDepth) {
    std::fprintf(stderr, "parsed depth %zu beyond the scanned depth\n", real);
    std::abort();
  }
  (void)meta.dump();  // what Reader::metadata_json does (recursive: bounded by the depth)
  // The input as the whole meta table, and as the value of each key.
  std::vector<torch_lmdb::detail::Json> tables{meta};
  for (const char* key : {"format_version", "num_samples", "complete", "schema", "user", "byte_order"}) {
    torch_lmdb::detail::Json t{{"format", "torch_lmdb"}, {"format_version", 1}, {"num_samples", 3}, {"complete", true},
                   {"schema", torch_lmdb::detail::Json::array()}};
    t[key] = meta;
    tables.push_back(std::move(t));
  }
  for (const auto& t : tables) {
    try {
      const torch_lmdb::detail::MetaInfo info = torch_lmdb::detail::validate_meta(t, path);
      if (info.num_samples > uint64_t{INT64_MAX}) std::abort();
      for (const auto& f : info.schema)
        if (f.shape.size() > size_t(kMaxDims)) std::abort();
    } catch (const InvalidDatabaseError& e) {
      if (std::string(e.what()).find("'fuzz.lmdb'") == std::string::npos) std::abort();
    }
  }
  return 0;
}
