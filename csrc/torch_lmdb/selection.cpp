#include "torch_lmdb/selection.h"

#include <c10/util/Exception.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb {

namespace {

constexpr char kMagic[8] = {'T', 'L', 'M', 'D', 'B', 'S', 'E', 'L'};
constexpr uint32_t kVersion = 1, kFlagSorted = 1;
constexpr size_t kHeader = 8 + 4 + 4 + 8 + 8 + 8;  // magic, version, flags, num_samples, identity, count
constexpr const char* kDir = "selections";
constexpr const char* kSuffix = ".sel";

template <typename T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);  // little-endian hosts (FORMAT.md)
}
template <typename T>
T get(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 128 || name[0] == '.') return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'; });
}

}  // namespace

Selection::Selection(std::vector<uint64_t> indices, size_t num_samples, bool allow_duplicates) {
  for (size_t p = 0; p < indices.size(); ++p)
    TORCH_CHECK_INDEX(indices[p] < num_samples, "selection position ", p, ": index ", indices[p],
                      " out of range for dataset of size ", num_samples);
  if (!allow_duplicates) {
    std::vector<uint64_t> sorted = indices;
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    TORCH_CHECK_VALUE(dup == sorted.end(), "index ", (dup == sorted.end() ? 0 : *dup),
                      " appears twice in the selection (pass allow_duplicates to allow it)");
  }
  indices_ = std::make_shared<const std::vector<uint64_t>>(std::move(indices));
}

bool Selection::sorted() const noexcept { return std::is_sorted(indices_->begin(), indices_->end()); }

std::string selection_path(const std::string& path, const std::string& name) {
  TORCH_CHECK_VALUE(valid_name(name), "selection name '", name,
                    "' must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with '.'");
  return path + "/" + kDir + "/" + name + kSuffix;
}

std::vector<std::string> list_selections(const std::string& path) {
  std::vector<std::string> out;
  const std::string dir = path + "/" + kDir;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  const size_t suffix = std::strlen(kSuffix);
  while (const dirent* e = ::readdir(d)) {
    const std::string file = e->d_name;
    if (file.size() > suffix && file.compare(file.size() - suffix, suffix, kSuffix) == 0) {
      const std::string name = file.substr(0, file.size() - suffix);
      if (valid_name(name)) out.push_back(name);
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

uint64_t data_identity(const Reader& reader) {
  std::string text;
  const std::vector<size_t> sizes = reader.file_sizes();
  for (size_t f = 0; f < reader.paths().size(); ++f) {
    const std::string meta_text = reader.metadata_json(f);
    const detail::Json meta = detail::parse_meta_value(meta_text.data(), meta_text.size(), reader.paths()[f], "meta");
    for (const char* key : {"schema", "created_with"}) text += meta.contains(key) ? meta[key].dump() : "null";
    text += "#" + std::to_string(sizes[f]) + ";";
  }
  return XXH3_64bits(text.data(), text.size());
}

void save_selection(const std::string& file, const Selection& selection, uint64_t num_samples, uint64_t identity) {
  for (size_t p = 0; p < selection.size(); ++p)
    TORCH_CHECK_INDEX(selection.at(p) < num_samples, "selection position ", p, ": index ", selection.at(p),
                      " out of range for dataset of size ", num_samples);
  std::string out(kMagic, sizeof kMagic);
  put<uint32_t>(out, kVersion);
  put<uint32_t>(out, selection.sorted() ? kFlagSorted : 0);
  put<uint64_t>(out, num_samples);
  put<uint64_t>(out, identity);
  put<uint64_t>(out, selection.size());
  out.append(reinterpret_cast<const char*>(selection.indices().data()), selection.size() * sizeof(uint64_t));
  put<uint64_t>(out, XXH3_64bits(out.data(), out.size()));
  const std::string dir = file.substr(0, file.rfind('/'));
  if (::mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST)
    throw Error("cannot create the selections directory '" + dir + "': " + std::strerror(errno), errno, dir);
  const std::string tmp = file + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    f.flush();
    if (!f) throw Error("cannot write the selection file '" + tmp + "'", errno, file);
  }
  if (std::rename(tmp.c_str(), file.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw Error("cannot rename '" + tmp + "' to '" + file + "': " + std::strerror(err), err, file);
  }
}

Selection load_selection(const std::string& file, uint64_t num_samples, uint64_t identity) {
  std::ifstream f(file, std::ios::binary | std::ios::ate);
  if (!f) throw NotFoundError("no selection file '" + file + "'", ENOENT, file);
  const auto size = static_cast<uint64_t>(f.tellg());
  auto damaged = [&](const std::string& why) {
    return CorruptedError("selection file '" + file + "' is damaged: " + why, 0, file);
  };
  if (size < kHeader + 8) throw damaged("it has " + std::to_string(size) + " bytes, less than a header");
  std::string head(kHeader, '\0');
  f.seekg(0);
  f.read(&head[0], static_cast<std::streamsize>(kHeader));
  const uint64_t count = get<uint64_t>(head.data() + 32);
  if (count > (size - kHeader - 8) / 8 || kHeader + count * 8 + 8 != size)
    throw damaged("it claims " + std::to_string(count) + " indices but has " + std::to_string(size) + " bytes");
  std::string body(size, '\0');  // size checked against the count: no blind allocation
  f.seekg(0);
  f.read(&body[0], static_cast<std::streamsize>(size));
  if (!f) throw damaged("it could not be read");
  if (XXH3_64bits(body.data(), size - 8) != get<uint64_t>(body.data() + size - 8))
    throw damaged("the checksum does not match");
  if (std::memcmp(body.data(), kMagic, sizeof kMagic) != 0) throw damaged("it is not a torch_lmdb selection");
  const uint32_t version = get<uint32_t>(body.data() + 8);
  if (version != kVersion)
    throw InvalidDatabaseError("selection file '" + file + "' has version " + std::to_string(version) +
                                   " (this torch_lmdb reads version 1)", 0, file);
  const uint64_t built_samples = get<uint64_t>(body.data() + 16), built_identity = get<uint64_t>(body.data() + 24);
  if (built_samples != num_samples || built_identity != identity)
    throw InvalidDatabaseError("selection file '" + file + "' was built for other data (" +
                                   std::to_string(built_samples) + " samples, identity " +
                                   std::to_string(built_identity) + "; this data: " + std::to_string(num_samples) +
                                   " samples, identity " + std::to_string(identity) + "): rebuild the selection",
                               0, file);
  std::vector<uint64_t> indices(count);
  std::memcpy(indices.data(), body.data() + kHeader, count * 8);
  for (size_t p = 0; p < count; ++p)
    if (indices[p] >= num_samples)
      throw damaged("index " + std::to_string(indices[p]) + " at position " + std::to_string(p) + " is >= " +
                    std::to_string(num_samples) + " samples");
  return Selection(std::move(indices), num_samples, /*allow_duplicates=*/true);
}

}  // namespace torch_lmdb
