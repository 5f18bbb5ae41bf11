#include "torch_lmdb/detail/manifest.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <c10/util/Exception.h>

#include "torch_lmdb/errors.h"
#include "torch_lmdb/reader.h"

namespace torch_lmdb {

namespace {

using detail::ShardExpectation;

// ---- shard manifests --------------------------------------------------------
// A directory holding manifest.json is one dataset of the shards it lists
// (README "Shards with a manifest"). The manifest is written last, so a
// directory of shards without one is an unfinished write: refused, named.

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kManifestFormat = "torch_lmdb.manifest";
// Version 2 adds `dataset_id`, which each shard's metadata `shard` repeats
// with its index and the number of shards; version 1 directories (no
// identity) stay readable.
constexpr int64_t kManifestVersion = 2;
constexpr int64_t kMinManifestVersion = 1;
constexpr std::streamoff kMaxManifestBytes = std::streamoff{64} << 20;

// The directory's canonical path (realpath) with a trailing '/', or "" when
// it cannot be resolved.
std::string canonical_dir(const std::string& p) {
  char* resolved = ::realpath(p.c_str(), nullptr);
  if (resolved == nullptr) return std::string();
  std::string out(resolved);
  std::free(resolved);
  return out.back() == '/' ? out : out + "/";
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Names of sub-directories of `dir` that hold an LMDB data file (shards).
std::vector<std::string> shard_like_entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (is_file(join(join(dir, name), "data.mdb"))) out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

[[noreturn]] void bad_manifest(const std::string& manifest, const std::string& why) {
  throw InvalidDatabaseError("shard manifest '" + manifest + "' is invalid: " + why, 0, manifest);
}

// dir/manifest.json read and parsed (size and depth bounded first).
detail::Json read_manifest(const std::string& manifest) {
  std::ifstream in(manifest, std::ios::binary);
  if (!in) throw NotFoundError("cannot read shard manifest '" + manifest + "'", ENOENT, manifest);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0 || size > kMaxManifestBytes)
    bad_manifest(manifest, "size " + std::to_string(size) + " bytes (at most " + std::to_string(kMaxManifestBytes) +
                               ")");
  in.seekg(0);
  std::string text(static_cast<size_t>(size), '\0');
  in.read(&text[0], size);
  if (in.gcount() != size) bad_manifest(manifest, "short read");
  if (detail::json_depth(text.data(), text.size()) > detail::kMaxMetaDepth)
    bad_manifest(manifest, "nested deeper than " + std::to_string(detail::kMaxMetaDepth) + " levels");
  detail::Json j = detail::Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad_manifest(manifest, "not JSON");
  if (!j.is_object()) bad_manifest(manifest, "expected a JSON object, got " + std::string(j.type_name()));
  return j;
}

// The manifest's format and version checked; returns its dataset id
// (empty before version 2).
std::string check_manifest_version(const detail::Json& j, const std::string& manifest) {
  if (j.value("format", std::string()) != kManifestFormat)
    bad_manifest(manifest, std::string("'format' is not \"") + kManifestFormat + "\"");
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    bad_manifest(manifest, "no integer 'format_version'");
  const int64_t version = j["format_version"].get<int64_t>();
  if (version < kMinManifestVersion || version > kManifestVersion)
    bad_manifest(manifest, "format version " + std::to_string(version) + " (this torch_lmdb reads versions " +
                               std::to_string(kMinManifestVersion) + " to " + std::to_string(kManifestVersion) + ")");
  if (version < 2) return std::string();
  if (!j.contains("dataset_id") || !j["dataset_id"].is_string() || j["dataset_id"].get<std::string>().empty())
    bad_manifest(manifest, "no 'dataset_id' (a version 2 manifest names its dataset)");
  return j["dataset_id"].get<std::string>();
}

// Whether a shard's relative path leaves the manifest's directory: absolute,
// empty, or with a ".." component.
bool escapes_directory(const std::string& rel) {
  bool escapes = rel.empty() || rel[0] == '/';
  for (size_t pos = 0; !escapes && pos <= rel.size();) {
    const size_t end = std::min(rel.find('/', pos), rel.size());
    escapes = rel.compare(pos, end - pos, "..") == 0 && end - pos == 2;
    pos = end + 1;
  }
  return escapes;
}

// The path of shard entry `where` of the manifest, checked: its keys, a
// relative path that stays inside the directory `root` (no "..", no
// symlink out of it), a data.mdb, and listed once (`seen`: canonical paths).
std::string shard_path(const detail::Json& shard, const std::string& where, const std::string& manifest,
                       const std::string& dir, const std::string& root, std::set<std::string>& seen) {
  if (!shard.is_object()) bad_manifest(manifest, where + " is not an object");
  if (!shard.contains("path") || !shard["path"].is_string()) bad_manifest(manifest, where + " has no 'path'");
  const std::string rel = shard["path"].get<std::string>();
  if (escapes_directory(rel))
    bad_manifest(manifest, where + " path '" + rel + "' is not a relative path inside the directory");
  if (!shard.contains("num_samples") || !shard["num_samples"].is_number_unsigned())
    bad_manifest(manifest, where + " ('" + rel + "') has no 'num_samples'");
  if (!shard.contains("meta_xxh3_64") || !shard["meta_xxh3_64"].is_string())
    bad_manifest(manifest, where + " ('" + rel + "') has no 'meta_xxh3_64'");
  const std::string path = join(dir, rel);
  if (!is_file(join(path, "data.mdb")))
    throw NotFoundError("shard '" + path + "' listed in '" + manifest + "' is missing (no data.mdb)", ENOENT, path);
  const std::string real = canonical_dir(path);
  if (root.empty() || real.size() <= root.size() || real.compare(0, root.size(), root) != 0)
    bad_manifest(manifest, where + " '" + rel + "' resolves to '" + real + "', outside the directory '" + root + "'");
  const std::string data_real = canonical_dir(join(path, "data.mdb"));
  if (data_real.compare(0, root.size(), root) != 0)
    bad_manifest(manifest, where + " '" + rel + "' has a data.mdb outside the directory ('" + data_real + "')");
  if (!seen.insert(real).second) bad_manifest(manifest, where + " '" + rel + "' is listed twice");
  return path;
}

// Parses dir/manifest.json; appends its shards to `paths` and `expect`.
void expand_manifest(const std::string& dir, std::vector<std::string>& paths,
                     std::vector<ShardExpectation>& expect) {
  const std::string manifest = join(dir, kManifestName);
  detail::Json j = read_manifest(manifest);
  const std::string dataset_id = check_manifest_version(j, manifest);
  const std::string root = canonical_dir(dir);
  std::set<std::string> seen;  // shards' canonical paths
  size_t total = 0;
  if (!j.contains("schema")) bad_manifest(manifest, "no 'schema'");
  const std::vector<FieldSchema> schema = detail::schema_from_json(j["schema"], manifest);
  if (!j.contains("shards") || !j["shards"].is_array() || j["shards"].empty())
    bad_manifest(manifest, "'shards' is not a non-empty list");
  size_t k = 0;
  for (const auto& shard : j["shards"]) {
    const std::string path = shard_path(shard, "shards[" + std::to_string(k) + "]", manifest, dir, root, seen);
    const size_t n = shard["num_samples"].get<size_t>();
    total += n;
    paths.push_back(path);
    expect.push_back(ShardExpectation{manifest, k, n, shard["meta_xxh3_64"].get<std::string>(), schema, dataset_id,
                                      j["shards"].size()});
    ++k;
  }
  if (!j.contains("num_samples") || !j["num_samples"].is_number_unsigned() || j["num_samples"].get<size_t>() != total)
    bad_manifest(manifest, "'num_samples' is " + (j.contains("num_samples") ? j["num_samples"].dump() : "missing") +
                               " but its shards list " + std::to_string(total) + " samples");
}

bool same_fields(const std::vector<FieldSchema>& got, const std::vector<FieldSchema>& want) {
  if (got.size() != want.size()) return false;
  for (size_t f = 0; f < got.size(); ++f) {
    if (got[f].name != want[f].name || got[f].kind != want[f].kind || got[f].dtype != want[f].dtype ||
        got[f].shape.size() != want[f].shape.size())
      return false;
    for (size_t d = 0; d < got[f].shape.size(); ++d)
      if (want[f].shape[d] != -1 && got[f].shape[d] != want[f].shape[d]) return false;
  }
  return true;
}

std::string xxh3_hex(const std::string& text) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits(text.data(), text.size())));
  return hex;
}

}  // namespace

std::string metadata_checksum(const std::string& meta_json) {
  // Canonical form (docs/FORMAT.md): nlohmann::json sorts object keys by
  // their bytes at every depth; dump() adds no whitespace.
  const nlohmann::json parsed = nlohmann::json::parse(meta_json, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!parsed.is_discarded(), "metadata_checksum: the metadata is not JSON");
  return xxh3_hex(parsed.dump());
}

namespace detail {

std::vector<std::string> expand_paths(const std::vector<std::string>& given, std::vector<ShardExpectation>& expect) {
  std::vector<std::string> out;
  for (const auto& p : given) {
    if (is_dir(p) && is_file(join(p, kManifestName))) {
      expand_manifest(p, out, expect);
      continue;
    }
    if (is_dir(p) && !is_file(join(p, "data.mdb"))) {
      const auto shards = shard_like_entries(p);
      if (!shards.empty())
        throw InvalidDatabaseError("'" + p + "' holds " + std::to_string(shards.size()) + " shard database(s) ('" +
                                       shards[0] + "'...) but no manifest.json: an incomplete write (the manifest " +
                                       "is written last, once every shard is complete)",
                                   0, p);
    }
    out.push_back(p);
    expect.push_back(ShardExpectation{});
  }
  return out;
}

void check_shard(const std::string& path, const Json& meta, size_t n, const std::vector<FieldSchema>& schema,
                 const ShardExpectation& e) {
  if (e.manifest.empty()) return;
  auto mismatch = [&](const std::string& why) {
    throw InvalidDatabaseError("shard '" + path + "' (shards[" + std::to_string(e.shard) + "] of '" + e.manifest +
                                   "') does not match the manifest: " + why,
                               0, path);
  };
  if (n != e.num_samples)
    mismatch(std::to_string(n) + " samples, the manifest says " + std::to_string(e.num_samples));
  if (!same_fields(schema, e.schema)) mismatch("its fields or dtypes differ from the manifest's schema");
  const std::string sum = metadata_checksum(meta.dump());
  // A version 1 manifest hashed the text as stored (no canonical form).
  if (sum != e.meta_checksum && !(e.dataset_id.empty() && xxh3_hex(meta.dump()) == e.meta_checksum))
    mismatch("metadata checksum " + sum + ", the manifest says " + e.meta_checksum +
             " (the shard was rewritten or altered after the manifest)");
  // The checksum may have been recomputed: the shard's own identity.
  if (!e.dataset_id.empty()) {
    const detail::Json want{{"dataset_id", e.dataset_id}, {"index", e.shard}, {"count", e.shards}};
    const detail::Json got = meta.value("shard", detail::Json());
    if (got != want)
      mismatch("it is " + (got.is_null() ? std::string("no shard of a dataset") : "shard " + got.dump()) +
               ", the manifest lists it as " + want.dump() +
               " (a shard listed twice, left out, moved or taken from another dataset)");
  }
}

}  // namespace detail
}  // namespace torch_lmdb
