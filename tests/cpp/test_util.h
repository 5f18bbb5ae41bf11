// Helpers shared by the GoogleTest files.
#pragma once

#include <gtest/gtest.h>
#include <lmdb.h>
#include <stdlib.h>
#include <unistd.h>

#include <functional>
#include <string>
#include <vector>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/torch_lmdb.h"

namespace torch_lmdb_test {

// A fresh directory under $TORCH_LMDB_TEST_TMP (or /tmp), removed at the end.
class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TORCH_LMDB_TEST_TMP");
    std::string root = base ? base : "/tmp";
    std::string cmd = "mkdir -p '" + root + "'";
    EXPECT_EQ(system(cmd.c_str()), 0);
    std::string tmpl = root + "/tlmdb-XXXXXX";
    char* made = mkdtemp(&tmpl[0]);
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::string cmd = "chmod -R u+w '" + path_ + "' 2>/dev/null; rm -rf '" + path_ + "'";
    (void)system(cmd.c_str());
  }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Sample i of the standard test dataset: deterministic content from i.
inline torch_lmdb::Sample make_sample(int64_t i, int64_t width = 16) {
  torch_lmdb::Sample s;
  s.insert("index", torch::tensor(i));
  s.insert("x", torch::arange(width, torch::kFloat) + static_cast<float>(i));
  return s;
}

inline void write_dataset(const std::string& path, int64_t n, int64_t first = 0,
                          torch_lmdb::WriterOptions options = {}) {
  torch_lmdb::Writer w(path, options);
  for (int64_t i = 0; i < n; ++i) w.write(make_sample(first + i));
  w.close();
}

// Metadata `samples_per_value` of an open raw LMDB (1 when absent).
inline uint64_t raw_samples_per_value(MDB_txn* txn) {
  MDB_dbi meta;
  if (mdb_dbi_open(txn, "meta", 0, &meta) != 0) return 1;
  MDB_val k{17, const_cast<char*>("samples_per_value")}, v;
  if (mdb_get(txn, meta, &k, &v) != 0) return 1;
  return std::stoull(std::string(static_cast<char*>(v.mv_data), v.mv_size));
}

// The records of a packed value (docs/FORMAT.md), each as its bytes.
inline std::vector<std::string> unpack_value(const MDB_val& v, uint64_t per_value) {
  std::vector<std::string> out;
  const char* record = nullptr;
  size_t size = 0;
  while (torch_lmdb::packed_record(v.mv_data, v.mv_size, out.size(), per_value, &record, &size))
    out.emplace_back(record, size);
  return out;
}

inline std::string pack_records(const std::vector<std::string>& records) {
  std::string joined, out;
  std::vector<size_t> ends;
  for (const auto& r : records) ends.push_back((joined += r).size());
  torch_lmdb::append_packed(joined.data(), ends, out);
  return out;
}

// Runs `edit` on the `samples` table of the raw LMDB of `path` in one write
// transaction (as a bad disk or another writer would change it), then commits.
inline void edit_samples(const std::string& path, const std::function<void(MDB_txn*, MDB_dbi)>& edit) {
  MDB_env* env;
  ASSERT_EQ(mdb_env_create(&env), 0);
  mdb_env_set_maxdbs(env, 4);
  ASSERT_EQ(mdb_env_open(env, path.c_str(), 0, 0644), 0);
  MDB_txn* txn;
  ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), 0);
  MDB_dbi dbi;
  ASSERT_EQ(mdb_dbi_open(txn, "samples", 0, &dbi), 0);
  edit(txn, dbi);
  ASSERT_EQ(mdb_txn_commit(txn), 0);
  mdb_env_close(env);
}

// Opens the raw LMDB of `path` and applies `mutate` to the stored record of
// sample `index` (as a bad disk or another writer would change it); in a
// packed database, to its record inside the value that holds it.
inline void mutate_record(const std::string& path, uint64_t index,
                          const std::function<void(std::string&)>& mutate) {
  edit_samples(path, [&](MDB_txn* txn, MDB_dbi dbi) {
    const uint64_t per_value = raw_samples_per_value(txn);
    unsigned char key[8];
    torch_lmdb::encode_key(index / per_value, key);
    MDB_val k{8, key}, v;
    ASSERT_EQ(mdb_get(txn, dbi, &k, &v), 0);
    std::string value;
    if (per_value > 1) {
      auto records = unpack_value(v, per_value);
      ASSERT_LT(index % per_value, records.size());
      mutate(records[index % per_value]);
      value = pack_records(records);
    } else {
      value.assign(static_cast<char*>(v.mv_data), v.mv_size);
      mutate(value);
    }
    MDB_val nv{value.size(), value.data()};
    ASSERT_EQ(mdb_put(txn, dbi, &k, &nv, 0), 0);
  });
}

// Every dtype the record format names.
inline const std::vector<at::ScalarType> kAllDtypes = {
    at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf,
    at::kBFloat16, at::kFloat, at::kDouble, at::kComplexFloat, at::kComplexDouble};

}  // namespace torch_lmdb_test
