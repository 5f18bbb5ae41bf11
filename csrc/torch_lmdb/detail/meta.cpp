#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/record_format.h"

#include <c10/util/Exception.h>

#include <xxhash.h>

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <cstdio>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <limits>

namespace torch_lmdb {
namespace detail {

size_t json_depth(const char* p, size_t n, size_t limit) noexcept {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    const char c = p[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) {
        deepest = depth;
        if (deepest > limit) return limit + 1;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

bool valid_utf8(const char* p, size_t n) noexcept {
  const auto* s = reinterpret_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n;) {
    const unsigned c = s[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (len == 0 || i + len > n || (len == 2 && c < 0xc2)) return false;
    for (size_t j = 1; j < len; ++j)
      if ((s[i + j] & 0xc0) != 0x80) return false;
    if (len == 3) {
      const unsigned cp = ((c & 0xf) << 12) | ((s[i + 1] & 0x3f) << 6);
      if (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)) return false;  // overlong, surrogate
    }
    if (len == 4) {
      const unsigned cp = ((c & 0x7) << 18) | ((s[i + 1] & 0x3f) << 12);
      if (cp < 0x10000 || cp > 0x10ffff) return false;
    }
    i += len;
  }
  return true;
}

Json parse_meta_value(const char* p, size_t n, const std::string& path, const std::string& key) {
  // Damage (a flipped byte) more often than a foreign writer: CorruptedError.
  auto damaged = [&](const std::string& why) {
    throw CorruptedError("'" + path + "' is not a readable torch_lmdb database: metadata '" +
                             printable_bytes(key.data(), key.size(), 64) + "' " + why +
                             "; run `torch-lmdb verify` and rebuild it from the source data",
                         MDB_CORRUPTED, path);
  };
  if (!valid_utf8(key.data(), key.size())) damaged("(a key) is not valid UTF-8");
  if (json_depth(p, n) > kMaxMetaDepth)
    damaged("is nested more than " + std::to_string(kMaxMetaDepth) + " levels deep");
  Json value = Json::parse(p, p + n, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) damaged("is not valid JSON");
  return value;
}

std::string layout_checksum(const Json& meta) {
  Json layout = Json::object();  // (a std::map: keys sorted by their bytes)
  for (const char* key : kLayoutKeys) {
    const auto it = meta.find(key);
    if (it != meta.end()) layout[key] = *it;
  }
  // Canonical: nlohmann::json keeps objects in std::maps (keys sorted by
  // their bytes, at every depth); dump() writes no whitespace, UTF-8 as is
  // and only the escapes JSON requires.
  const std::string text = nlohmann::json::parse(layout.dump()).dump();
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(XXH3_64bits(text.data(), text.size())));
  return hex;
}

void check_layout(const Json& meta, const std::string& path) {
  const auto it = meta.find(kLayoutChecksumKey);
  if (it == meta.end()) return;
  const std::string stored = it->is_string() ? it->get<std::string>() : it->dump();
  const std::string now = layout_checksum(meta);
  if (stored != now)
    throw CorruptedError("'" + path + "' is damaged or was edited: its metadata layout checksum is " + stored +
                             " but its schema, format version and packing hash to " + now +
                             " (their bytes would be read wrongly); rebuild it from the source data",
                         MDB_CORRUPTED, path);
}

Json parse_user_json(const std::string& text) {
  TORCH_CHECK_VALUE(json_depth(text.data(), text.size()) <= kMaxMetaDepth,
                    "user metadata is nested more than ", kMaxMetaDepth,
                    " levels deep (arrays/objects within each other); flatten it");
  Json parsed = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!parsed.is_discarded() && parsed.is_object(),
                    "user metadata must be a JSON object, got: ", text.substr(0, 200));
  return parsed;
}

namespace {

// "a string (\"1\")", "an array", ... for messages.
std::string describe(const Json& v) {
  std::string shown = v.is_structured() ? std::string() : " (" + v.dump().substr(0, 40) + ")";
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::object: return "an object";
    case Json::value_t::array: return "an array";
    case Json::value_t::string: return "a string" + shown;
    case Json::value_t::boolean: return "a boolean" + shown;
    case Json::value_t::number_float: return "a floating-point number" + shown;
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer" + shown;
    default: return "not a JSON value";
  }
}

}  // namespace

MetaInfo validate_meta(const Json& meta, const std::string& path) {
  auto invalid = [&](const std::string& why) {
    throw InvalidDatabaseError("'" + path + "' is not a readable torch_lmdb database: " + why, 0, path);
  };
  // The key's value, or nullptr when it is absent.
  auto find = [&](const char* key) -> const Json* {
    const auto it = meta.find(key);
    return it == meta.end() ? nullptr : &*it;
  };
  auto wrong = [&](const char* key, const char* expected, const Json& v) {
    invalid(std::string("metadata '") + key + "' is " + describe(v) + ", expected " + expected);
  };
  MetaInfo info;
  if (!meta.is_object()) invalid("the metadata is " + describe(meta) + ", expected an object");

  const Json* format = find("format");
  if (format == nullptr) invalid("no metadata 'format' (not written by torch_lmdb)");
  if (!format->is_string() || format->get_ref<const std::string&>() != "torch_lmdb")
    invalid("metadata 'format' is " + describe(*format) + ", expected \"torch_lmdb\"");

  const Json* version = find("format_version");
  if (version == nullptr) invalid("no metadata 'format_version'");
  if (!version->is_number_integer()) wrong("format_version", "an integer", *version);
  const bool known = version->is_number_unsigned()
                         ? version->get<uint64_t>() >= kMinFormatVersion && version->get<uint64_t>() <= kMaxFormatVersion
                         : version->get<int64_t>() >= kMinFormatVersion && version->get<int64_t>() <= kMaxFormatVersion;
  if (!known)
    invalid("format version " + version->dump() + " (this torch_lmdb reads versions " +
            std::to_string(kMinFormatVersion) + " to " + std::to_string(kMaxFormatVersion) + ")");
  info.format_version = version->get<int64_t>();
  if (const Json* per = find("samples_per_value")) {
    if (!per->is_number_unsigned() || per->get<uint64_t>() < 1 || per->get<uint64_t>() > kMaxSamplesPerValue)
      wrong("samples_per_value", "an integer from 1 to 65536", *per);
    static_assert(kMaxSamplesPerValue == 65536, "the message above names the limit");
    info.samples_per_value = per->get<size_t>();
    if (info.samples_per_value > 1 && info.format_version < kPackedFormatVersion)
      invalid("metadata 'samples_per_value' is " + per->dump() + " in a format version " +
              std::to_string(info.format_version) + " database (packed values need version " +
              std::to_string(kPackedFormatVersion) + ")");
  }

  if (const Json* order = find("byte_order")) {
    if (!order->is_string()) wrong("byte_order", "\"little\"", *order);
    if (order->get_ref<const std::string&>() != "little") invalid("byte order is not little-endian");
  }

  const Json* n = find("num_samples");
  if (n == nullptr) invalid("no metadata 'num_samples'");
  if (!n->is_number_integer()) wrong("num_samples", "a non-negative integer", *n);
  if (!n->is_number_unsigned()) wrong("num_samples", "a non-negative integer", *n);
  // Python's len() and every signed index stop at 2^63 - 1.
  const uint64_t count = n->get<uint64_t>();
  if (count > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    wrong("num_samples", "a count below 2^63", *n);
  info.num_samples = static_cast<size_t>(count);

  if (const Json* complete = find("complete")) {
    if (!complete->is_boolean()) wrong("complete", "true or false", *complete);
    info.complete = complete->get<bool>();
  }
  if (const Json* checksum = find("checksum"))
    if (!checksum->is_string()) wrong("checksum", "a string (\"xxh3_64\" or \"none\")", *checksum);
  if (const Json* user = find("user"))
    if (!user->is_object()) wrong("user", "an object", *user);

  const Json* schema = find("schema");
  info.schema = schema_from_json(schema ? *schema : Json::array(), path);
  return info;
}

std::vector<FieldSchema> schema_from_json(const Json& j, const std::string& path) {
  auto invalid = [&](const std::string& why) {
    throw InvalidDatabaseError("'" + path + "' is not a readable torch_lmdb database: metadata 'schema' " + why,
                               0, path);
  };
  std::vector<FieldSchema> out;
  if (!j.is_array()) invalid("is " + describe(j) + ", expected a list of fields");
  for (size_t i = 0; i < j.size(); ++i) {
    const Json& f = j[i];
    const std::string where = "field " + std::to_string(i);
    if (!f.is_object()) invalid(where + " is " + describe(f) + ", expected an object");
    auto text = [&](const char* key) -> const std::string& {
      const auto it = f.find(key);
      if (it == f.end()) invalid(where + " has no '" + key + "'");
      if (!it->is_string()) invalid(where + " '" + key + "' is " + describe(*it) + ", expected a string");
      return it->get_ref<const std::string&>();
    };
    FieldSchema s;
    s.name = text("name");
    const std::string named = where + " ('" + s.name + "')";
    try {
      s.kind = kind_from_name(text("kind"));
      s.dtype = field_dtype_from_name(text("dtype"), s.name, path);  // a dtype this torch lacks: named
    } catch (const c10::Error& e) {
      invalid(named + ": " + e.what_without_backtrace());
    } catch (const InvalidDatabaseError& e) {
      invalid(named + ": " + e.what());
    }
    const auto shape = f.find("shape");
    if (shape == f.end()) invalid(named + " has no 'shape'");
    if (!shape->is_array() || shape->size() > static_cast<size_t>(kMaxDims))
      invalid(named + " 'shape' is " + describe(*shape) + ", expected a list of at most " +
              std::to_string(kMaxDims) + " sizes");
    for (const Json& d : *shape) {
      if (!d.is_number_integer() || (d.is_number_unsigned() ? d.get<uint64_t>() > uint64_t{INT64_MAX}
                                                             : d.get<int64_t>() < -1))
        invalid(named + " 'shape' holds " + describe(d) + ", expected sizes >= 0 or -1 (varies)");
      s.shape.push_back(d.get<int64_t>());
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Whether a Writer holds `path`: one of this process (its claim on the env),
// or of any process (its fcntl lock on writer.lock, listed in /proc/locks).
// Never opens writer.lock: closing any descriptor of a file drops this
// process's fcntl locks on it, a Writer's among them.
bool writer_alive(const std::string& path, const Env& env) {
  if (env.writer_claimed()) return true;
  struct stat st {};
  if (::stat((path + "/writer.lock").c_str(), &st) != 0) return false;
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    if (line.find("->") != std::string::npos) continue;  // a waiter, not a holder
    // "<n>: POSIX  ADVISORY  WRITE <pid> <major>:<minor>:<inode> <start> <end>" (major, minor in hex)
    std::istringstream in(line);
    std::string id, kind, mode, rw, pid, file;
    if (!(in >> id >> kind >> mode >> rw >> pid >> file)) continue;
    unsigned dev_major = 0, dev_minor = 0;
    unsigned long long inode = 0;
    if (std::sscanf(file.c_str(), "%x:%x:%llu", &dev_major, &dev_minor, &inode) != 3) continue;
    if (inode == static_cast<unsigned long long>(st.st_ino) && dev_major == major(st.st_dev) &&
        dev_minor == minor(st.st_dev))
      return true;
  }
  return false;
}

// A database left incomplete by a dead writer is reported once per process
// (every reader of every worker would repeat it otherwise).
bool first_report(const std::string& path) {
  static std::mutex mutex;
  static std::set<std::string> reported;
  std::lock_guard<std::mutex> lock(mutex);
  return reported.insert(path).second;
}

}  // namespace detail
}  // namespace torch_lmdb
