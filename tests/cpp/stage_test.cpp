// Staging a shard directory to a local cache (detail/stage.h, ReaderOptions::cache_dir),
// from a directory standing for a shared file system (HTTP is tested from Python
// against nginx: tests/python/test_remote.py).
#include <dirent.h>
#include <sys/stat.h>

#include <atomic>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "test_util.h"
#include "torch_lmdb/detail/stage.h"

using namespace torch_lmdb;
using torch_lmdb::detail::ShardCache;
using torch_lmdb::detail::StageOptions;
using torch_lmdb_test::TempDir;

namespace {

// A version 1 shard directory of `shards` databases of `per` samples, its
// manifest giving each shard's size and data_xxh3_64.
std::string write_shard_dir(const std::string& dir, int shards, int per) {
  ::mkdir(dir.c_str(), 0755);
  nlohmann::json m = {{"format", "torch_lmdb.manifest"}, {"format_version", 1}, {"num_samples", shards * per}};
  m["shards"] = nlohmann::json::array();
  for (int k = 0; k < shards; ++k) {
    const std::string name = "shard-0000" + std::to_string(k) + ".lmdb";
    torch_lmdb_test::write_dataset(dir + "/" + name, per, int64_t{k} * per);
    Reader r(dir + "/" + name);
    const auto meta = nlohmann::json::parse(r.metadata_json());
    m["schema"] = meta["schema"];
    struct stat st;
    ::stat((dir + "/" + name + "/data.mdb").c_str(), &st);
    nlohmann::json entry;
    entry["path"] = name;
    entry["num_samples"] = per;
    entry["meta_xxh3_64"] = metadata_checksum(r.metadata_json());
    entry["size"] = static_cast<uint64_t>(st.st_size);
    entry["data_xxh3_64"] = torch_lmdb::detail::file_xxh3(dir + "/" + name + "/data.mdb");
    m["shards"].push_back(entry);
  }
  std::ofstream(dir + "/manifest.json") << m.dump();
  return dir;
}

int temporaries(const std::string& dir) {
  int n = 0;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (name.rfind(".tmp-", 0) == 0) ++n;
    if (e->d_type == DT_DIR) n += temporaries(dir + "/" + name);
  }
  ::closedir(d);
  return n;
}

}  // namespace

TEST(Stage, ParsesSizes) {
  EXPECT_EQ(torch_lmdb::detail::parse_bytes("20GB"), uint64_t{20} * 1000 * 1000 * 1000);
  EXPECT_EQ(torch_lmdb::detail::parse_bytes("512MiB"), uint64_t{512} << 20);
  EXPECT_EQ(torch_lmdb::detail::parse_bytes(" 4096 "), 4096u);
  EXPECT_THROW(torch_lmdb::detail::parse_bytes("many"), std::invalid_argument);
  EXPECT_THROW(torch_lmdb::detail::parse_bytes("10 parsecs"), std::invalid_argument);
  EXPECT_TRUE(torch_lmdb::detail::is_url("https://h/x") && torch_lmdb::detail::is_url("s3://b/p") && !torch_lmdb::detail::is_url("/data/x"));
}

TEST(Stage, ReaderWithCacheDirReadsStagedCopies) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 3, 20);
  ReaderOptions o;
  o.cache_dir = tmp.sub("cache");
  Reader r(src, o);
  ASSERT_EQ(r.size(), 60u);
  for (const auto& p : r.paths()) EXPECT_EQ(p.rfind(tmp.sub("cache"), 0), 0u) << p;
  for (size_t i = 0; i < 60; ++i) EXPECT_EQ(r.get(i)["index"].item<int64_t>(), static_cast<int64_t>(i));
  const auto batch = r.read_batch(std::vector<size_t>{59, 0, 21});
  EXPECT_TRUE(batch.tensors["x"].equal(torch::stack({torch_lmdb_test::make_sample(59)["x"],
                                                        torch_lmdb_test::make_sample(0)["x"],
                                                        torch_lmdb_test::make_sample(21)["x"]})));
  EXPECT_EQ(r.refreshed().size(), 60u);
  // No lock file beside the staged copies.
  struct stat st;
  EXPECT_NE(::stat((r.paths()[0] + "/lock.mdb").c_str(), &st), 0);
  // A limit below the dataset: a Reader stages it whole, so it refuses.
  ReaderOptions small = o;
  small.cache_limit = 1000;
  try {
    Reader refused(src, small);
    FAIL() << "a cache_limit below the dataset was accepted";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("cache_limit"), std::string::npos) << e.what();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("cache_limit"), std::string::npos) << e.what();
  }
}

TEST(Stage, AHashThatDiffersIsRefetchedThenNamed) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 2, 10);
  auto m = nlohmann::json::parse(std::ifstream(src + "/manifest.json"));
  m["shards"][1]["data_xxh3_64"] = "00000000deadbeef";
  std::ofstream(src + "/manifest.json") << m.dump();
  StageOptions o;
  o.cache_dir = tmp.sub("cache");
  o.hash_retries = 1;
  ShardCache c(src, o);
  EXPECT_NO_THROW(c.acquire(0));
  try {
    c.acquire(1);
    FAIL() << "a shard that does not match its manifest was staged";
  } catch (const CorruptedError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("shard 1"), std::string::npos) << what;
    EXPECT_NE(what.find("shard-00001.lmdb/data.mdb"), std::string::npos) << what;
  }
  EXPECT_EQ(c.stats().hash_failures, 2u);
  EXPECT_EQ(temporaries(tmp.sub("cache")), 0);
}

TEST(Stage, EvictsTheLeastRecentlyUsedShardNobodyReads) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 3, 200);
  StageOptions o;
  o.cache_dir = tmp.sub("cache");
  {
    ShardCache probe(src, o);
    o.cache_limit = probe.shards()[0].size + probe.shards()[1].size + probe.shards()[2].size - 1;
  }
  ShardCache c(src, o);
  c.acquire(0);
  c.acquire(1);
  c.release(1);  // shard 0 is held, shard 1 is not
  c.acquire(2);  // no room for three: shard 1 goes, never the held shard 0
  EXPECT_EQ(c.stats().evictions, 1u);
  struct stat st;
  EXPECT_EQ(::stat((c.local_dir() + "/shard-00000.lmdb/data.mdb").c_str(), &st), 0);
  EXPECT_NE(::stat((c.local_dir() + "/shard-00001.lmdb/data.mdb").c_str(), &st), 0);
  EXPECT_LE(c.cached_bytes(), o.cache_limit);
}

TEST(StageConcurrent, ThreadsAcquiringOneShardFetchItOnce) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 2, 500);
  StageOptions o;
  o.cache_dir = tmp.sub("cache");
  ShardCache c(src, o);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int rep = 0; rep < 20; ++rep) {
        const std::string dir = c.acquire(rep % 2);
        if (!dir.empty()) ++ok;
        c.prefetch({size_t(1 - rep % 2)});
        c.release(rep % 2);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 80);
  EXPECT_EQ(c.stats().shards_fetched, 2u);
  EXPECT_EQ(temporaries(tmp.sub("cache")), 0);
}
