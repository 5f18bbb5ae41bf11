// torch_lmdb/detail/meta.h -- internal: the `meta` table (one JSON value per key).
// Not installed: it exposes nlohmann::json, which public headers avoid.
//
// Contract
// - Metadata comes from files we did not necessarily write: every value is
//   checked before it is used, and a bad one raises InvalidDatabaseError
//   naming the database path and the key, never a JSON library exception,
//   an OverflowError or a crash.
// - Nesting depth: nlohmann's parser and serializer recurse once per level of
//   arrays/objects, so a value nested 100,000 deep overflows the stack. No
//   value deeper than kMaxMetaDepth is parsed (read_meta checks the bytes
//   with a linear scan first) or written (parse_user_json).
// - Thread safety: pure functions (read_meta/put_meta use the caller's txn),
//   but for first_report, whose set of reported paths is guarded by a mutex.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/fault_guard.h"
#include "torch_lmdb/errors.h"
#include "torch_lmdb/record.h"

namespace torch_lmdb {
namespace detail {

using Json = nlohmann::ordered_json;

/// Deepest nesting of arrays and objects accepted in one metadata value
/// (`{"a": [1]}` has depth 2). Far above what torch_lmdb or a converter
/// writes, far below what overflows a thread's stack in nlohmann's recursive
/// parser and dump() (about 1e4-1e5 levels with 8 MiB stacks, less on worker
/// threads).
constexpr size_t kMaxMetaDepth = 128;

/// Nesting depth of the JSON text [p, p + n): the most arrays/objects open at
/// once, counting brackets outside strings. One pass, no recursion, stops
/// counting past `limit` (returns limit + 1). For any text, nlohmann's parser
/// nests no deeper than this before it finishes or rejects the text.
size_t json_depth(const char* p, size_t n, size_t limit = kMaxMetaDepth) noexcept;

/// Parses the value of metadata key `key` of the database at `path`. Throws
/// CorruptedError naming both when the key is not valid UTF-8, or the value
/// is not JSON or is nested deeper than kMaxMetaDepth (checked before
/// parsing).
Json parse_meta_value(const char* p, size_t n, const std::string& path, const std::string& key);

/// Parses user metadata given to a Writer: c10::ValueError when it is not a
/// JSON object or is nested deeper than kMaxMetaDepth (checked before parsing).
Json parse_user_json(const std::string& text);

/// What a reader needs from the metadata, checked.
struct MetaInfo {
  int64_t format_version = 0;
  size_t num_samples = 0;
  /// Records per LMDB value (metadata `samples_per_value`; 1 when absent).
  size_t samples_per_value = 1;
  bool complete = false;
  std::vector<FieldSchema> schema;
};

/// Checks the whole metadata object of the database at `path` (every key a
/// reader relies on, with its JSON type) and returns its contents. Throws
/// InvalidDatabaseError "'<path>' is not a readable torch_lmdb database:
/// metadata '<key>' ..." saying what was expected and what was found:
/// format != "torch_lmdb", format_version missing / not an integer / another
/// version, num_samples missing / not an integer / negative / >= 2^63,
/// complete or byte_order of the wrong type, samples_per_value not an
/// integer 1..kMaxSamplesPerValue (or > 1 below format version 3), byte_order not "little", schema
/// or user of the wrong shape.
MetaInfo validate_meta(const Json& meta, const std::string& path);

/// One of data.mdb's two LMDB meta pages, read with plain file reads (no
/// map: nothing faults).
struct MetaPage {
  bool lmdb_accepts = false;  // P_META flag, magic and data version as LMDB checks them
  uint32_t page_size = 0;
  uint64_t last_page = 0;     // the last page its commit uses
  uint64_t txnid = 0;
  uint64_t main_root = ~uint64_t{0};  // the root page of LMDB's table of tables (~0: none)
  /// A power of two from 512 to 64 KiB (LMDB divides by it).
  bool page_size_ok() const noexcept {
    return page_size >= 512 && page_size <= 65536 && (page_size & (page_size - 1)) == 0;
  }
};
/// The meta pages of `data_path` (up to two; fewer when the file is short
/// or the first names an impossible page size). One parser for the check
/// at open (Env::open) and `torch-lmdb verify` (meta_pages_problem).
std::vector<MetaPage> read_meta_pages(const std::string& data_path);
/// Why `data_path` cannot be mapped safely: no meta page LMDB would accept
/// with a valid page size, a file shorter than the newest one's commit, or
/// a root page of its table of tables that is no B-tree page (main_root_problem);
/// "" when none.
std::string meta_pages_problem(const std::string& data_path);
/// Why the newest meta page's root of the table of tables (where
/// mdb_dbi_open searches for the named tables) is not a page LMDB can
/// search: past the commit's last page, or a header that is not its own
/// (page number, branch or leaf flags, bounds). Read with plain file reads;
/// "" when it is, or when there is no such root or meta page to read.
std::string main_root_problem(const std::string& data_path);

/// Metadata keys that decide how a record's bytes are read; the layout
/// checksum covers them (docs/FORMAT.md, "Layout checksum").
inline const char* const kLayoutKeys[] = {"byte_order", "checksum", "format", "format_version",
                                          "samples_per_value", "schema"};
/// The key under which writers store the layout checksum.
constexpr const char* kLayoutChecksumKey = "layout_xxh3_64";
/// The layout checksum of `meta`: xxh3-64 (seed 0), as 16 lowercase hex
/// digits, of the canonical JSON text (RFC 8785: keys sorted, no whitespace)
/// of the object holding those of kLayoutKeys that `meta` has.
std::string layout_checksum(const Json& meta);
/// Throws CorruptedError naming `path` when `meta` holds a layout checksum
/// that does not match its keys (an edited schema, version or packing).
/// Databases written before the checksum existed have none: nothing to check.
void check_layout(const Json& meta, const std::string& path);

/// Reads every key of `meta` into one object. Throws CorruptedError naming
/// the path and key on keys that are not UTF-8 and values that are not JSON
/// or are nested deeper than kMaxMetaDepth (see parse_meta_value).
inline Json read_meta(const Env& env, MDB_txn* txn) {
  Json out = Json::object();
  MDB_cursor* cur = nullptr;
  // The table's root is searched under the fault guard first (a damaged
  // page fails here, not in mdb_cursor_open), and so is every step.
  MDB_stat root{};
  int rc = guarded_stat(txn, env.meta_dbi(), &root);
  if (rc != MDB_SUCCESS) {
    env.check_intact();
    throw_mdb(rc, "mdb_stat(meta)", env.path(), "");
  }
  check_mdb(mdb_cursor_open(txn, env.meta_dbi(), &cur), "mdb_cursor_open(meta)", env.path());
  MDB_val k, v;
  rc = guarded_cursor_get(cur, &k, &v, MDB_FIRST);
  while (rc == 0) {
    try {
      env.check_value(k, "a metadata key");
      env.check_value(v, "a metadata value");
    } catch (...) {
      mdb_cursor_close(cur);
      throw;
    }
    std::string key(static_cast<const char*>(k.mv_data), k.mv_size);
    Json value;
    try {
      value = parse_meta_value(static_cast<const char*>(v.mv_data), v.mv_size, env.path(), key);
    } catch (...) {
      mdb_cursor_close(cur);
      throw;
    }
    out[key] = std::move(value);
    rc = guarded_cursor_get(cur, &k, &v, MDB_NEXT);
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

/// The `schema` value as fields. Throws InvalidDatabaseError naming `path`
/// when it is not a list of {name, kind, dtype, shape} with known kind and
/// dtype names and at most kMaxDims dims, each -1 (varies) or >= 0.
std::vector<FieldSchema> schema_from_json(const Json& j, const std::string& path);

/// Whether a Writer holds the database at `path`: one of this process (its
/// claim on `env`), or of any process (its fcntl lock on writer.lock, listed
/// in /proc/locks). Never opens writer.lock (closing any descriptor of a file
/// drops this process's fcntl locks on it).
bool writer_alive(const std::string& path, const Env& env);

/// True the first time it is asked for `path` in this process: a database
/// left incomplete by a dead writer is reported once (every reader of every
/// worker would repeat it otherwise). Thread-safe.
bool first_report(const std::string& path);

}  // namespace detail
}  // namespace torch_lmdb
