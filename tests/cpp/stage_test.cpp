// Staging a shard directory to a local cache (detail/stage.h, ReaderOptions::cache_dir),
// from a directory standing for a shared file system (HTTP is tested from Python
// against nginx: tests/python/test_remote.py).
#include <dirent.h>
#include <sys/stat.h>

#include <atomic>
#include <fstream>
#include <memory>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "test_util.h"
#include "torch_lmdb/detail/stage.h"
#include "torch_lmdb/detail/windows.h"

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

// The node's running count of the cache's bytes (.space.lock): a fetch with
// room by the count walks no directory; a fetch the count has no room for
// walks it, evicts, and the count follows the directory.
TEST(Stage, FetchesWithRoomByTheRunningCountWalkNoDirectory) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 7, 100);
  StageOptions o;
  o.cache_dir = tmp.sub("cache");
  uint64_t three = 0;
  {
    ShardCache c(src, o);  // no limit
    for (size_t k = 0; k < 6; ++k) {
      c.acquire(k);
      c.release(k);
      three = std::max(three, c.shards()[k].size);
    }
    three *= 3;
    EXPECT_EQ(c.stats().shards_fetched, 6u);
    EXPECT_EQ(c.stats().cache_scans, 1u) << "only a cache's first fetch walks the directory";
    // A count that is not one (damaged, or from elsewhere) is walked past.
    std::ofstream(o.cache_dir + "/.space.lock", std::ios::trunc) << "garbage 1 2\n";
    c.acquire(6);
    EXPECT_EQ(c.stats().cache_scans, 2u);
  }
  TempDir tmp2;
  o.cache_dir = tmp2.sub("cache");
  o.cache_limit = three;
  ShardCache c(src, o);
  for (size_t k = 0; k < 6; ++k) {
    c.acquire(k);
    c.release(k);
    EXPECT_LE(c.cached_bytes(), o.cache_limit) << "after shard " << k;
  }
  EXPECT_EQ(c.stats().evictions, 3u);
  EXPECT_GE(c.stats().cache_scans, 2u) << "a fetch past the limit by the count walks the directory";
  EXPECT_LE(c.stats().cache_scans, 4u) << "one walk for the first fetch, one per eviction at most";
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

TEST(StageConcurrent, TheCacheNeverHoldsMoreThanItsLimitWhileThreadsFetchAndEvict) {
  // Threads fetch, read and give back shards of a dataset three times its
  // cache, with prefetches between; a probe walks the cache all along. Every
  // change to what the cache holds (a download's reservation, its rename, an
  // eviction) is made under the space lock and the probe walks under it, so
  // it sees moments, never an evicted shard together with the next download.
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 9, 20);
  StageOptions o;
  o.cache_dir = tmp.sub("cache");
  ShardCache probe(src, o);
  uint64_t largest = 0;
  for (const auto& s : probe.shards()) largest = std::max(largest, s.size);
  o.cache_limit = 3 * largest;
  std::atomic<bool> done{false};
  std::atomic<uint64_t> peak{0}, walks{0};
  std::thread watcher([&] {
    while (!done) {
      const uint64_t now = probe.cached_bytes();
      uint64_t p = peak.load();
      while (now > p && !peak.compare_exchange_weak(p, now)) {
      }
      ++walks;
    }
  });
  std::vector<std::thread> threads;
  std::vector<std::unique_ptr<ShardCache>> caches;
  for (int t = 0; t < 2; ++t) caches.push_back(std::make_unique<ShardCache>(src, o));
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int rep = 0; rep < 60; ++rep) {
        const size_t k = rng() % 9;
        EXPECT_FALSE(caches[t]->acquire(k).empty());
        caches[t]->prefetch({(k + 1) % 9});
        caches[t]->release(k);
      }
    });
  for (auto& t : threads) t.join();
  caches.clear();  // joins the prefetches
  done = true;
  watcher.join();
  EXPECT_GT(walks.load(), 10u);
  EXPECT_LE(peak.load(), o.cache_limit) << "largest shard " << largest;
  EXPECT_LE(probe.cached_bytes(), o.cache_limit);
  EXPECT_EQ(temporaries(o.cache_dir), 0);
}

// ---- a staged dataset larger than its cache, read in shard windows (detail/windows.h) ----

namespace {

LoaderOptions window_options(const std::string& cache, uint64_t limit) {
  LoaderOptions o;
  o.batch_size = 16;
  o.threads = 1;
  o.seed = 7;
  o.reader.cache_dir = cache;
  o.reader.cache_limit = limit;
  return o;
}

uint64_t largest_shard(const ShardCache& c) {
  uint64_t largest = 0;
  for (const auto& s : c.shards()) largest = std::max(largest, s.size);
  return largest;
}

// Every batch of one epoch: the indices in delivery order; checks each
// sample's x against its index and the cache against `limit` after each batch.
std::vector<int64_t> read_epoch(Loader& loader, const ShardCache& probe, uint64_t limit, size_t max_batches = SIZE_MAX) {
  std::vector<int64_t> seen;
  size_t batches = 0;
  for (auto& b : loader) {
    const at::Tensor idx = b.tensors["index"];
    for (int64_t j = 0; j < idx.size(0); ++j) {
      const int64_t i = idx[j].item<int64_t>();
      EXPECT_TRUE(b.tensors["x"][j].equal(torch_lmdb_test::make_sample(i)["x"])) << "sample " << i;
      seen.push_back(i);
    }
    EXPECT_LE(probe.cached_bytes(), limit);
    if (++batches == max_batches) break;
  }
  return seen;
}

}  // namespace

TEST(StageWindows, LoaderReadsAWindowOfShardsAtATimeInTheOrderPythonDraws) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 6, 40);
  StageOptions so;
  so.cache_dir = tmp.sub("cache");
  ShardCache probe(src, so);
  const uint64_t largest = largest_shard(probe);
  const uint64_t limit = 3 * largest + largest / 2;  // a window of 1 (the default for this cache)
  auto loader = make_loader(src, window_options(so.cache_dir, limit));
  ASSERT_TRUE(loader->shard_windows());
  EXPECT_THROW(loader->reader(), c10::Error);
  EXPECT_EQ(loader->size(), 15u);  // 240 samples, 16 a batch
  for (uint64_t epoch = 0; epoch < 2; ++epoch) {
    const std::vector<int64_t> seen = read_epoch(*loader, probe, limit);
    std::vector<int64_t> expect = torch_lmdb::detail::shard_window_order(std::vector<uint64_t>(6, 40), 1,
                                                                         epoch_seed(7, epoch), true);
    // make_sample(i)'s "index" is the global index: shard k holds [40k, 40k + 40).
    EXPECT_EQ(seen, expect) << "epoch " << epoch;
    std::vector<int64_t> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < 240; ++i) ASSERT_EQ(sorted[static_cast<size_t>(i)], i);
  }
  EXPECT_LE(probe.cached_bytes(), limit);
}

TEST(StageWindows, RanksAndResumptionCoverEverySampleOnce) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 5, 30);
  StageOptions so;
  so.cache_dir = tmp.sub("cache");
  ShardCache probe(src, so);
  const uint64_t largest = largest_shard(probe);
  const uint64_t limit = 4 * largest;
  // Two ranks: together every sample once.
  std::vector<int64_t> all;
  for (size_t rank = 0; rank < 2; ++rank) {
    LoaderOptions o = window_options(so.cache_dir, limit);
    o.shard_window = 2;
    o.rank = rank;
    o.world_size = 2;
    auto loader = make_loader(src, o);
    const auto part = read_epoch(*loader, probe, limit);
    all.insert(all.end(), part.begin(), part.end());
  }
  std::sort(all.begin(), all.end());
  ASSERT_EQ(all.size(), 150u);
  for (int64_t i = 0; i < 150; ++i) ASSERT_EQ(all[static_cast<size_t>(i)], i);
  // Stopped after 4 batches: a new loader continues with exactly the rest.
  LoaderOptions o = window_options(so.cache_dir, limit);
  o.shard_window = 2;
  auto first = make_loader(src, o);
  std::vector<int64_t> seen = read_epoch(*first, probe, limit, 4);
  const LoaderState state = first->state();
  EXPECT_EQ(state.position, 64u);
  first.reset();
  auto second = make_loader(src, o);
  second->load_state(state);
  const auto rest = read_epoch(*second, probe, limit);
  seen.insert(seen.end(), rest.begin(), rest.end());
  EXPECT_EQ(seen, torch_lmdb::detail::shard_window_order(std::vector<uint64_t>(5, 30), 2, epoch_seed(7, 0), true));
}

TEST(StageWindows, ACacheTooSmallForAWindowIsRefusedWithItsMinimum) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 4, 30);
  StageOptions so;
  so.cache_dir = tmp.sub("cache");
  ShardCache probe(src, so);
  const uint64_t largest = largest_shard(probe);
  LoaderOptions o = window_options(so.cache_dir, largest + largest / 2);
  try {
    make_loader(src, o);
    FAIL() << "a cache of 1.5 shards was accepted for a window of 1 (it needs 2)";
  } catch (const c10::ValueError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("needs at least"), std::string::npos) << what;
    EXPECT_NE(what.find(src), std::string::npos) << what;
  }
  // shard_window=2: a batch that straddles two windows holds 4 shards, so
  // 3 (a window and one more) are refused, 4 accepted.
  o.shard_window = 2;
  o.reader.cache_limit = 3 * largest;
  try {
    make_loader(src, o);
    FAIL() << "a cache of 3 shards was accepted for windows of 2 (a straddling batch holds 4)";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("needs at least"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("its 4 largest shards"), std::string::npos) << e.what();
  }
  o.reader.cache_limit = 4 * largest;
  EXPECT_NO_THROW(make_loader(src, o));  // (the whole dataset: staged whole)
  o.shard_window = 0;
  o.reader.cache_limit = 3 * largest;
  o.block_size = 64;
  EXPECT_THROW(make_loader(src, o), c10::ValueError);  // a window of shards is its block
  o.block_size = 0;
  o.fields = {"no_such_field"};
  EXPECT_THROW(make_loader(src, o), c10::ValueError);  // checked against shard 0 at once
  EXPECT_EQ(temporaries(so.cache_dir), 0);
}

TEST(StageConcurrent, ShardWindowThreadsReadEverySampleOnceAcrossWindows) {
  TempDir tmp;
  const std::string src = write_shard_dir(tmp.sub("nfs"), 6, 25);
  StageOptions so;
  so.cache_dir = tmp.sub("cache");
  ShardCache probe(src, so);
  const uint64_t largest = largest_shard(probe);
  LoaderOptions o = window_options(so.cache_dir, 4 * largest);
  o.shard_window = 1;
  o.threads = 2;
  o.batches_ahead = 4;
  o.batch_size = 7;  // batches straddle the windows
  auto loader = make_loader(src, o);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::vector<int64_t> seen = read_epoch(*loader, probe, 4 * largest);
    EXPECT_EQ(seen, torch_lmdb::detail::shard_window_order(std::vector<uint64_t>(6, 25), 1,
                                                           epoch_seed(7, static_cast<uint64_t>(epoch)), true));
  }
  EXPECT_EQ(temporaries(so.cache_dir), 0);
}
