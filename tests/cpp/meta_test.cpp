// The `meta` table read from files torch_lmdb did not write: every bad value
// raises InvalidDatabaseError naming the path and the key, before anything
// recursive (nlohmann's parser and dump()) sees it.
#include <lmdb.h>

#include <string>
#include <utility>
#include <vector>

#include "test_util.h"
#include "torch_lmdb/detail/meta.h"

using namespace torch_lmdb;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {

// Overwrites metadata key `key` of the closed database at `path` with the raw
// bytes `value`, through LMDB itself (as another tool would).
// Writes metadata `key` = `value` (JSON text) into the database at `path`
// with liblmdb; with `keep_layout_checksum` false it also drops the layout
// checksum, as in a database written before it existed (so that the
// validation of each key is what the test sees).
void poke_meta(const std::string& path, const std::string& key, const std::string& value,
               bool keep_layout_checksum = false) {
  MDB_env* env = nullptr;
  ASSERT_EQ(mdb_env_create(&env), 0);
  ASSERT_EQ(mdb_env_set_maxdbs(env, 4), 0);
  ASSERT_EQ(mdb_env_set_mapsize(env, size_t{64} << 20), 0);
  ASSERT_EQ(mdb_env_open(env, path.c_str(), 0, 0644), 0);
  MDB_txn* txn = nullptr;
  ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), 0);
  MDB_dbi dbi;
  ASSERT_EQ(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
  MDB_val k{key.size(), const_cast<char*>(key.data())};
  MDB_val v{value.size(), const_cast<char*>(value.data())};
  ASSERT_EQ(mdb_put(txn, dbi, &k, &v, 0), 0);
  if (!keep_layout_checksum) {
    const std::string sum = torch_lmdb::detail::kLayoutChecksumKey;
    MDB_val sk{sum.size(), const_cast<char*>(sum.data())};
    const int rc = mdb_del(txn, dbi, &sk, nullptr);
    ASSERT_TRUE(rc == 0 || rc == MDB_NOTFOUND) << rc;
  }
  ASSERT_EQ(mdb_txn_commit(txn), 0);
  mdb_env_close(env);
}

std::string nested_arrays(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// Opens `path` with a Reader and returns the InvalidDatabaseError's (or,
// for metadata that does not parse, the CorruptedError's) message ("" when
// the open succeeded).
std::string open_error(const std::string& path) {
  try {
    Reader r(path);
    return "";
  } catch (const InvalidDatabaseError& e) {
    EXPECT_EQ(e.path(), path);
    return e.what();
  } catch (const CorruptedError& e) {
    EXPECT_EQ(e.path(), path);
    return e.what();
  }
}

}  // namespace

TEST(Meta, JsonDepthCountsBracketsOutsideStringsInOnePass) {
  auto depth = [](const std::string& s) { return torch_lmdb::detail::json_depth(s.data(), s.size()); };
  EXPECT_EQ(depth("1"), 0u);
  EXPECT_EQ(depth("{\"a\": [1, {\"b\": []}]}"), 4u);
  EXPECT_EQ(depth("[\"[[[{{{\", \"\\\"[[[\"]"), 1u);  // brackets and escaped quotes in strings
  EXPECT_EQ(depth("[][][]"), 1u);
  EXPECT_EQ(depth(nested_arrays(torch_lmdb::detail::kMaxMetaDepth)), torch_lmdb::detail::kMaxMetaDepth);
  // Stops counting past the limit: 1e6 levels cost one pass, no recursion.
  EXPECT_EQ(depth(nested_arrays(1000000)), torch_lmdb::detail::kMaxMetaDepth + 1);
}

TEST(Meta, ValueNestedDeeperThanTheLimitIsRefusedNamingPathAndKey) {
  TempDir tmp;
  const std::string path = tmp.sub("deep");
  write_dataset(path, 3);
  // At the limit: readable (any JSON is allowed under created_with).
  poke_meta(path, "created_with", nested_arrays(torch_lmdb::detail::kMaxMetaDepth));
  EXPECT_EQ(Reader(path).size(), 3u);
  // One level more is refused; 1e5 levels used to overflow the stack (SIGSEGV).
  for (size_t depth : {torch_lmdb::detail::kMaxMetaDepth + 1, size_t{100000}}) {
    poke_meta(path, "created_with", nested_arrays(depth));
    const std::string msg = open_error(path);
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("'created_with'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("nested more than 128 levels"), std::string::npos) << msg;
  }
}

TEST(Meta, UserMetadataNestedDeeperThanTheLimitIsRefusedAtWrite) {
  TempDir tmp;
  Writer w(tmp.sub("w"));
  const std::string at_limit = "{\"a\": " + nested_arrays(torch_lmdb::detail::kMaxMetaDepth - 1) + "}";
  w.set_user_metadata(at_limit);
  for (size_t depth : {torch_lmdb::detail::kMaxMetaDepth, size_t{100000}}) {
    const std::string deep = "{\"a\": " + nested_arrays(depth) + "}";
    try {
      w.set_user_metadata(deep);
      ADD_FAILURE() << "user metadata " << depth + 1 << " levels deep was accepted";
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what()).find("nested more than 128 levels"), std::string::npos) << e.what();
    }
  }
  WriterOptions o;
  o.user_json = "{\"a\": " + nested_arrays(100000) + "}";
  EXPECT_THROW(Writer(tmp.sub("w2"), o), c10::ValueError);
  w.write(torch_lmdb_test::make_sample(0));
  w.close();
  EXPECT_NE(Reader(tmp.sub("w")).metadata_json().find(at_limit.substr(6)), std::string::npos);
}

// Each bad value -> the path, the key and what was wrong, as InvalidDatabaseError.
TEST(Meta, BadValuesNameThePathTheKeyAndWhatWasFound) {
  struct Case {
    const char* key;
    std::string value;
    std::string expect;  // in the message
  };
  const Case cases[] = {
      {"complete", "\"yes\"", "metadata 'complete' is a string (\"yes\"), expected true or false"},
      {"num_samples", "9223372036854775808", "metadata 'num_samples' is an integer (9223372036854775808)"},
      {"num_samples", "-1", "metadata 'num_samples' is an integer (-1), expected a non-negative integer"},
      {"num_samples", "3.0", "metadata 'num_samples' is a floating-point number"},
      {"format_version", "\"1\"", "metadata 'format_version' is a string (\"1\"), expected an integer"},
      {"format_version", "6", "format version 6 (this torch_lmdb reads versions 1 to 5)"},
      {"format_version", "0", "format version 0 (this torch_lmdb reads versions 1 to 5)"},
      {"samples_per_value", "0", "metadata 'samples_per_value' is an integer (0), expected an integer from 1 to 65536"},
      {"samples_per_value", "\"4\"", "metadata 'samples_per_value' is a string (\"4\"), expected an integer"},
      {"samples_per_value", "4", "metadata 'samples_per_value' is 4 in a format version 2 database"},
      {"format", "7", "metadata 'format' is an integer (7), expected \"torch_lmdb\""},
      {"byte_order", "[]", "metadata 'byte_order' is an array"},
      {"user", "[1]", "metadata 'user' is an array, expected an object"},
      {"schema", "{}", "metadata 'schema' is an object, expected a list of fields"},
      {"schema", "[{\"name\": \"x\", \"kind\": \"tensor\", \"dtype\": \"float99\", \"shape\": []}]",
       "field 'x' has dtype 'float99', which torch_lmdb's format does not name"},
      {"schema", "[{\"name\": \"x\", \"kind\": \"tensor\", \"dtype\": \"float32\", \"shape\": [-5]}]",
       "metadata 'schema' field 0 ('x') 'shape' holds an integer (-5)"},
      {"schema", "[{\"name\": 1}]", "metadata 'schema' field 0 'name' is an integer (1), expected a string"},
      {"schema", "[[]]", "metadata 'schema' field 0 is an array, expected an object"},
      {"format", "{\"a\": ", "metadata 'format' is not valid JSON"},
  };
  TempDir tmp;
  int i = 0;
  for (const Case& c : cases) {
    const std::string path = tmp.sub("bad" + std::to_string(i++));
    write_dataset(path, 3);
    poke_meta(path, c.key, c.value);
    const std::string msg = open_error(path);
    EXPECT_NE(msg.find("'" + path + "' is not a readable torch_lmdb database"), std::string::npos)
        << c.key << "=" << c.value << ": " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.key << "=" << c.value << ": " << msg;
  }
}

// The keys that decide how bytes are read are covered by the layout
// checksum: an edit is CorruptedError before any of them is believed.
TEST(Meta, AnEditedLayoutKeyFailsTheLayoutChecksum) {
  TempDir tmp;
  int i = 0;
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"format_version", "2"}, {"samples_per_value", "2"}, {"byte_order", "\"little\""},
           {"schema", "[{\"name\": \"y\", \"kind\": \"tensor\", \"dtype\": \"float32\", \"shape\": [4]}]"}}) {
    const std::string path = tmp.sub("edit" + std::to_string(i++));
    write_dataset(path, 3);
    const auto stored = torch_lmdb::detail::Json::parse(Reader(path).metadata_json());
    poke_meta(path, key, value, /*keep_layout_checksum=*/true);
    const bool same = stored.contains(key) && stored[key] == torch_lmdb::detail::Json::parse(value);
    try {
      Reader r(path);
      EXPECT_TRUE(same) << key << "=" << value << " was accepted";
    } catch (const CorruptedError& e) {
      EXPECT_FALSE(same) << e.what();
      EXPECT_NE(std::string(e.what()).find("layout checksum"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
}

TEST(Meta, ValidateMetaReturnsWhatTheWriterStored) {
  TempDir tmp;
  write_dataset(tmp.sub("ok"), 5);
  const auto meta = torch_lmdb::detail::Json::parse(Reader(tmp.sub("ok")).metadata_json());
  const torch_lmdb::detail::MetaInfo info = torch_lmdb::detail::validate_meta(meta, tmp.sub("ok"));
  EXPECT_EQ(info.format_version, 2);
  EXPECT_EQ(info.num_samples, 5u);
  EXPECT_TRUE(info.complete);
  ASSERT_EQ(info.schema.size(), 2u);
  EXPECT_EQ(info.schema[1].name, "x");
  EXPECT_EQ(info.schema[1].dtype, at::kFloat);
  EXPECT_EQ(info.schema[1].shape, std::vector<int64_t>{16});
}
