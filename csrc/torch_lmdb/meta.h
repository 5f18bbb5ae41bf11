// torch_lmdb/meta.h -- internal: the `meta` table (one JSON value per key).
// Not installed: it exposes nlohmann::json, which public headers avoid.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "torch_lmdb/env.h"
#include "torch_lmdb/errors.h"
#include "torch_lmdb/record.h"

namespace torch_lmdb {
namespace detail {

using Json = nlohmann::ordered_json;

/// Reads every key of `meta` into one object. Throws InvalidDatabaseError on
/// values that are not JSON.
inline Json read_meta(const Env& env, MDB_txn* txn) {
  Json out = Json::object();
  MDB_cursor* cur = nullptr;
  check_mdb(mdb_cursor_open(txn, env.meta_dbi(), &cur), "mdb_cursor_open(meta)", env.path());
  MDB_val k, v;
  int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
  while (rc == 0) {
    std::string key(static_cast<const char*>(k.mv_data), k.mv_size);
    const char* p = static_cast<const char*>(v.mv_data);
    Json value = Json::parse(p, p + v.mv_size, nullptr, /*allow_exceptions=*/false);
    if (value.is_discarded()) {
      mdb_cursor_close(cur);
      throw InvalidDatabaseError("metadata key '" + key + "' of '" + env.path() +
                                     "' is not valid JSON",
                                 0, env.path());
    }
    out[key] = std::move(value);
    rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
  }
  mdb_cursor_close(cur);
  if (rc != MDB_NOTFOUND) throw_mdb(rc, "mdb_cursor_get(meta)", env.path(), "");
  return out;
}

inline void put_meta(const Env& env, MDB_txn* txn, const std::string& key, const Json& value) {
  const std::string text = value.dump();
  MDB_val k{key.size(), const_cast<char*>(key.data())};
  MDB_val v{text.size(), const_cast<char*>(text.data())};
  check_mdb(mdb_put(txn, env.meta_dbi(), &k, &v, 0), "mdb_put(meta)", env.path(), "key " + key);
}

inline Json schema_to_json(const std::vector<FieldSchema>& schema) {
  Json out = Json::array();
  for (const auto& f : schema) {
    out.push_back(Json{{"name", f.name},
                       {"kind", kind_name(f.kind)},
                       {"dtype", dtype_name(f.dtype)},
                       {"shape", f.shape}});
  }
  return out;
}

inline std::vector<FieldSchema> schema_from_json(const Json& j, const std::string& path) {
  std::vector<FieldSchema> out;
  if (!j.is_array()) {
    throw InvalidDatabaseError("metadata 'schema' of '" + path + "' is not a list", 0, path);
  }
  try {
    for (const auto& f : j) {
      FieldSchema s;
      s.name = f.at("name").get<std::string>();
      s.kind = kind_from_name(f.at("kind").get<std::string>());
      s.dtype = field_dtype_from_name(f.at("dtype").get<std::string>(), s.name, path);
      s.shape = f.at("shape").get<std::vector<int64_t>>();
      out.push_back(std::move(s));
    }
  } catch (const Json::exception& e) {
    throw InvalidDatabaseError("metadata 'schema' of '" + path + "' is malformed: " + e.what(),
                               0, path);
  }
  return out;
}

}  // namespace detail
}  // namespace torch_lmdb
