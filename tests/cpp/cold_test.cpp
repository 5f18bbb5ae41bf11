// Cold reads: a batch's pages requested at once (ReaderOptions::page_requests,
// page_request_bytes) and pages dropped after the copy (keep_cache = false).
#include <fcntl.h>
#include <lmdb.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <numeric>
#include <functional>
#include <random>
#include <thread>

#include "test_util.h"
#include "torch_lmdb/detail/direct_io.h"
#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/lookup.h"
#include "torch_lmdb/detail/tree_pages.h"
#include "torch_lmdb/record.h"
#include "torch_lmdb/stream.h"

using namespace torch_lmdb;
using torch_lmdb_test::make_sample;
using torch_lmdb_test::TempDir;

namespace {

constexpr int64_t kWidth = 4096;  // 16 KiB of float32 a sample: values on overflow pages

void write_wide(const std::string& path, int64_t n) {
  Writer w(path);
  for (int64_t i = 0; i < n; ++i) w.write(make_sample(i, kWidth));
  w.close();
}

// Drops dir/data.mdb from the page cache (while no process maps it).
void evict_file(const std::string& dir) {
  const int fd = ::open((dir + "/data.mdb").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ::fdatasync(fd);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  ::close(fd);
}

// Pages of dir/data.mdb in the page cache, and the file's pages.
std::pair<size_t, size_t> resident_pages(const std::string& dir) {
  const int fd = ::open((dir + "/data.mdb").c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  struct stat st {};
  ::fstat(fd, &st);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t pages = (static_cast<size_t>(st.st_size) + page - 1) / page;
  void* map = ::mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  EXPECT_NE(map, MAP_FAILED);
  std::vector<unsigned char> vec(pages);
  EXPECT_EQ(::mincore(map, st.st_size, vec.data()), 0);
  ::munmap(map, st.st_size);
  ::close(fd);
  const size_t in = static_cast<size_t>(std::count_if(vec.begin(), vec.end(), [](unsigned char c) { return c & 1; }));
  return {in, pages};
}

std::vector<size_t> shuffled(size_t n, uint64_t seed) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  return order;
}

// The batches of `order`, `batch` indices each (the last one shorter).
std::vector<std::vector<size_t>> batches_of(const std::vector<size_t>& order, size_t batch) {
  std::vector<std::vector<size_t>> out;
  for (size_t i = 0; i < order.size(); i += batch)
    out.emplace_back(order.begin() + i, order.begin() + std::min(order.size(), i + batch));
  return out;
}

// The page requests alone (madvise MADV_WILLNEED): what readers with
// direct_reads = false, and records sharing their pages, go through.
ReaderOptions with_page_requests(PageRequests mode, size_t bytes = size_t{64} << 20) {
  ReaderOptions o;
  o.page_requests = mode;
  o.page_request_bytes = bytes;
  o.direct_reads = false;
  return o;
}

}  // namespace

TEST(ColdReads, PageRequestBatchesEqualPlainOnesAndCoverEveryIndexOnce) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 600;
  write_wide(path, n);
  evict_file(path);
  Reader ahead(path, with_page_requests(PageRequests::Always));
  Reader plain(path, with_page_requests(PageRequests::Never));
  std::vector<int> seen(n, 0);
  const auto batches = batches_of(shuffled(n, 1), 64);
  for (const auto& idx : batches) {
    Batch a = ahead.read_batch(idx);
    Batch b = plain.read_batch(idx);
    ASSERT_TRUE(torch::equal(a.tensors["x"], b.tensors["x"]));
    for (size_t j = 0; j < idx.size(); ++j) {
      ASSERT_EQ(a.tensors["index"][j].item<int64_t>(), static_cast<int64_t>(idx[j]));
      ASSERT_TRUE(torch::equal(a.tensors["x"][j], make_sample(idx[j], kWidth)["x"]));
      ++seen[idx[j]];
    }
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  EXPECT_EQ(ahead.io_stats().batches, batches.size());
  EXPECT_EQ(ahead.io_stats().page_request_batches, batches.size());
  EXPECT_EQ(plain.io_stats().page_request_batches, 0u);
  // The general path (padding requested) requests its pages too.
  BatchOptions pad;
  pad.pad = true;
  Batch p = ahead.read_batch(batches[0], pad);
  EXPECT_TRUE(torch::equal(p.tensors["x"], plain.read_batch(batches[0]).tensors["x"]));
  EXPECT_EQ(ahead.io_stats().page_request_batches, batches.size() + 1);
}

TEST(ColdReads, AutoRequestsPagesOnceBatchesWaitForTheDiskAndStopsWhenWarm) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 2000;  // 32 MiB
  write_wide(path, n);
  evict_file(path);
  Reader r(path);  // PageRequests::Auto
  for (const auto& idx : batches_of(shuffled(n, 2), 64)) r.read_batch(idx);
  const Reader::IoStats cold = r.io_stats();
  EXPECT_GT(cold.page_request_batches, 0u);
  EXPECT_GT(cold.pages_requested, 0u);
  // Every page is cached now: at most 4 batches request their pages (finding
  // nothing to request) before the thread's reads go back to plain.
  for (const auto& idx : batches_of(shuffled(n, 3), 64)) r.read_batch(idx);
  const Reader::IoStats warm = r.io_stats();
  EXPECT_LE(warm.page_request_batches - cold.page_request_batches, 4u);
  EXPECT_EQ(warm.pages_requested, cold.pages_requested);
}

TEST(ColdReads, AutoRequestsPagesFromTheFirstBatchWhoseFirstSampleIsNotCached) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 600);
  evict_file(path);
  Reader r(path);  // PageRequests::Auto
  r.read_batch(batches_of(shuffled(600, 7), 64)[0]);
  EXPECT_EQ(r.io_stats().page_request_batches, 1u);
  EXPECT_GT(r.io_stats().pages_requested, 0u);
  // Cached now: the next thread's batches do not request their pages.
  Reader warm(path);
  std::thread([&] { warm.read_batch(batches_of(shuffled(600, 7), 64)[0]); }).join();
  EXPECT_EQ(warm.io_stats().page_request_batches, 0u);
}

TEST(ColdReads, PagesRequestedAheadAreBoundedByPageRequestBytes) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 256);
  evict_file(path);
  const size_t budget = 64 << 10;
  Reader r(path, with_page_requests(PageRequests::Always, budget));
  Batch b = r.read_batch(shuffled(256, 4));  // 4 MiB in one batch
  EXPECT_EQ(b.tensors["x"].size(0), 256);
  const Reader::IoStats st = r.io_stats();
  EXPECT_EQ(st.page_request_batches, 1u);
  EXPECT_GT(st.pages_requested, 0u);
  // Requests stop once `budget` bytes are covered: the last value's pages
  // (5 for 16 KiB after a page header) may cross it.
  EXPECT_LE(st.pages_requested, (budget + 5 * 4096) / 4096);
}

TEST(ColdReads, KeepCacheFalseDropsEachBatchsPagesFromThePageCache) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 1000;  // 16 MiB
  write_wide(path, n);
  evict_file(path);
  {
    ReaderOptions o;
    o.keep_cache = false;
    Reader r(path, o);
    for (const auto& idx : batches_of(shuffled(n, 5), 64)) {
      Batch b = r.read_batch(idx);
      ASSERT_TRUE(torch::equal(b.tensors["x"][0], make_sample(idx[0], kWidth)["x"]));
    }
    const auto [in, pages] = resident_pages(path);
    EXPECT_LT(in, pages / 10) << in << " of " << pages << " pages stayed cached";
  }
  evict_file(path);
  {
    Reader r(path);
    for (const auto& idx : batches_of(shuffled(n, 6), 64)) r.read_batch(idx);
    const auto [in, pages] = resident_pages(path);
    EXPECT_GT(in, pages / 2) << "keep_cache = true: " << in << " of " << pages << " pages cached";
  }
}

// Reads the 300 samples of `r` in order, 64 a batch: record 150 (batch 2) is damaged.
void expect_only_batch_2_raises_index_150(const Reader& r) {
  std::vector<size_t> order(300);
  std::iota(order.begin(), order.end(), 0);
  const auto batches = batches_of(order, 64);  // 150 is in batch 2
  for (size_t k = 0; k < batches.size(); ++k) {
    if (k != 2) {
      EXPECT_NO_THROW(r.read_batch(batches[k])) << "batch " << k;
      continue;
    }
    try {
      r.read_batch(batches[k]);
      FAIL() << "batch 2 holds the damaged record";
    } catch (const CorruptedError& e) {
      EXPECT_NE(std::string(e.what()).find("index 150"), std::string::npos) << e.what();
    }
  }
}

TEST(ColdReads, ADamagedRecordIsRaisedAtItsBatch) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 300);
  // a payload byte of record 150 flipped (a bad disk would)
  torch_lmdb_test::mutate_record(path, 150, [](std::string& value) { value[value.size() / 2] ^= 0x5A; });
  evict_file(path);
  ReaderOptions o = with_page_requests(PageRequests::Always);
  o.verify = true;
  Reader r(path, o);
  expect_only_batch_2_raises_index_150(r);
}

namespace {

// Reads one epoch of `stream`, checking every sample's content; returns how
// often each index came. `after_batch` runs after each batch.
std::vector<int> read_epoch(BatchStream& stream, int64_t n, const std::function<void(size_t)>& after_batch = {}) {
  std::vector<int> seen(n, 0);
  size_t k = 0;
  while (auto b = stream.next()) {
    const at::Tensor idx = b->tensors["index"];
    for (int64_t j = 0; j < idx.size(0); ++j) {
      const int64_t i = idx[j].item<int64_t>();
      EXPECT_TRUE(torch::equal(b->tensors["x"][j], make_sample(i, kWidth)["x"])) << "index " << i;
      ++seen[i];
    }
    if (after_batch) after_batch(++k);
  }
  return seen;
}

}  // namespace

TEST(ColdReads, StreamRequestsTheComingBatchesInBoundedChunks) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 3000;  // 5 pages a sample: ~59 MiB
  write_wide(path, n);
  evict_file(path);
  const size_t budget = size_t{8} << 20;
  Reader r(path, with_page_requests(PageRequests::Always, budget));
  StreamOptions o;
  o.batch_size = 64;
  o.order = SampleOrder::Shuffle;
  o.threads = 1;
  o.batches_ahead = 1;
  BatchStream stream(r, o);
  size_t peak_excess = 0;
  const auto seen = read_epoch(stream, n, [&](size_t delivered) {
    // Cached: the batches delivered, the one being read and the one queued
    // (5 pages a sample), B-tree pages, and what was requested ahead: at
    // most two chunks of budget / 2.
    const size_t read = std::min<size_t>(n, (delivered + 2) * 64) * 5;
    const size_t in = resident_pages(path).first;
    if (in > read) peak_excess = std::max(peak_excess, in - read);
  });
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  const Reader::IoStats st = r.io_stats();
  EXPECT_GT(st.request_pages_calls, 1u);
  EXPECT_GT(st.pages_requested_ahead, static_cast<uint64_t>(n) * 5 / 2);  // most pages came ahead of their batch
  EXPECT_GT(peak_excess, 0u) << "nothing was requested ahead";
  EXPECT_LE(peak_excess, 2 * budget / 4096 + 64) << "pages cached beyond the batches read";
}

TEST(ColdReads, StreamRequestsABlockShuffleWindowAtOnceAndNothingWhenWarm) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 3072;
  write_wide(path, n);
  evict_file(path);
  // Chunks of page_request_bytes / 2 would be 6 batches (8 requests an epoch);
  // a window is 4.
  Reader r(path, with_page_requests(PageRequests::Auto, size_t{16} << 20));
  StreamOptions o;
  o.batch_size = 64;
  o.order = SampleOrder::BlockShuffle;
  o.block_size = 128;
  o.window_blocks = 2;  // windows of 256 samples (~5 MiB): 4 batches
  o.threads = 2;
  {
    BatchStream stream(r, o);
    const auto seen = read_epoch(stream, n);
    EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  }
  const Reader::IoStats cold = r.io_stats();
  // 12 windows: one request each (the first ones partly read already), and
  // a first request or two of a single batch, before a batch's size is known.
  EXPECT_GE(cold.request_pages_calls, 10u);
  EXPECT_LE(cold.request_pages_calls, 15u);
  EXPECT_GT(cold.pages_requested_ahead, static_cast<uint64_t>(n) * 5 / 2);
  {
    BatchStream warm(r, o);  // every page cached: nothing is requested
    read_epoch(warm, n);
  }
  EXPECT_EQ(r.io_stats().request_pages_calls, cold.request_pages_calls);
}

TEST(ColdReads, AStreamRaisesADamagedRecordAtItsBatchThoughItsPagesWereRequestedAhead) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 640);
  torch_lmdb_test::mutate_record(path, 300, [](std::string& value) { value[value.size() / 2] ^= 0x5A; });
  evict_file(path);
  ReaderOptions ro = with_page_requests(PageRequests::Always);
  ro.verify = true;
  Reader r(path, ro);
  StreamOptions o;
  o.batch_size = 64;
  o.order = SampleOrder::Sequential;
  o.threads = 2;
  BatchStream stream(r, o);
  for (size_t k = 0; k < 4; ++k) EXPECT_TRUE(stream.next().has_value()) << "batch " << k;
  try {
    stream.next();
    FAIL() << "batch 4 holds the damaged record";
  } catch (const CorruptedError& e) {
    EXPECT_NE(std::string(e.what()).find("index 300"), std::string::npos) << e.what();
  }
  EXPECT_GT(r.io_stats().request_pages_calls, 0u);
}

// ---- keep_cache = false: uncached records read with O_DIRECT (detail/direct_io.h) ----

namespace {

// Whether the file system of `dir` takes O_DIRECT (tmpfs does not): where it
// does not, the reader reads through the map and counts no direct record.
bool takes_o_direct(const std::string& dir) {
  const int fd = ::open((dir + "/data.mdb").c_str(), O_RDONLY | O_DIRECT);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

ReaderOptions direct_options(bool direct) {
  ReaderOptions o;
  o.keep_cache = false;
  o.direct_reads = direct;
  return o;
}

}  // namespace

TEST(ColdReads, UncachedRecordsAreReadThroughIoUringWithTheSameBytesAndKeepCacheHolds) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 1000;  // 16 MiB
  write_wide(path, n);
  for (bool direct : {true, false}) {
    evict_file(path);
    Reader r(path, direct_options(direct));
    for (const auto& idx : batches_of(shuffled(n, 5), 64)) {
      Batch b = r.read_batch(idx);
      for (size_t j = 0; j < idx.size(); ++j)
        ASSERT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(idx[j], kWidth)["x"]))
            << "index " << idx[j] << (direct ? " (direct)" : " (map)");
      const auto many = r.get_many(std::vector<size_t>{idx[0]});
      ASSERT_TRUE(torch::equal(many[0]["x"], make_sample(idx[0], kWidth)["x"]));
    }
    const auto [in, pages] = resident_pages(path);
    EXPECT_LT(in, pages / 10) << in << " of " << pages << " pages stayed cached";
    if (direct && takes_o_direct(path)) {
      EXPECT_GT(r.io_stats().direct_records, uint64_t(n / 2)) << "most cold records are read with O_DIRECT";
    } else {
      EXPECT_EQ(r.io_stats().direct_records, 0u);
    }
  }
  // keep_cache = true: buffered reads through io_uring, whose pages stay
  // cached for the next epoch (read through the map then).
  evict_file(path);
  Reader r(path);
  for (const auto& idx : batches_of(shuffled(n, 6), 64)) {
    Batch b = r.read_batch(idx);
    ASSERT_TRUE(torch::equal(b.tensors["x"][0], make_sample(idx[0], kWidth)["x"]));
  }
  const uint64_t direct = r.io_stats().direct_records;
  EXPECT_GT(direct, uint64_t(n / 2));
  EXPECT_GT(resident_pages(path).first, resident_pages(path).second / 2);
  for (const auto& idx : batches_of(shuffled(n, 7), 64)) r.read_batch(idx);
  EXPECT_EQ(r.io_stats().direct_records, direct) << "a warm epoch reads through the map";
}

// A stream's page requests look up the records of the batches ahead; those its
// batches read through io_uring are not requested, and their lookups are kept
// in the value index, where the batch finds them without a second search.
TEST(ColdReads, PageRequestsKeepTheirLookupsInTheValueIndexForTheBatch) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 400;
  write_wide(path, n);
  evict_file(path);
  ReaderOptions ro = direct_options(true);
  ro.page_requests = PageRequests::Always;
  Reader r(path, ro);
  const std::vector<size_t> ahead{5, 100, 300, 301, 399};
  (void)r.request_pages(ahead);
  auto env = Env::open(path, EnvOptions{});
  ReadTxn txn = env->read_txn();
  const auto index = env->value_index(txn.get(), size_t{1} << 20);
  ASSERT_NE(index, nullptr);
  for (uint64_t key = 0; key < static_cast<uint64_t>(n); ++key) {
    const bool asked = std::find(ahead.begin(), ahead.end(), key) != ahead.end();
    const MDB_val known = index->find(key);
    EXPECT_EQ(known.mv_data != nullptr, asked) << "key " << key;
    if (!asked || known.mv_data == nullptr) continue;
    unsigned char kbuf[8];
    encode_key(key, kbuf);
    MDB_val k{8, kbuf}, v{0, nullptr};
    ASSERT_EQ(mdb_get(txn.get(), env->samples_dbi(), &k, &v), MDB_SUCCESS);
    EXPECT_EQ(known.mv_data, v.mv_data) << "key " << key;
    EXPECT_EQ(known.mv_size, v.mv_size) << "key " << key;
  }
  const Batch b = r.read_batch(ahead);
  for (size_t j = 0; j < ahead.size(); ++j)
    EXPECT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(ahead[j], kWidth)["x"]))
        << "index " << ahead[j];
}

// A stream's lookups of the batches ahead run while its batch's reads are in
// flight (torch_lmdb::detail::WhileReadingScope): once, by the batch's first copy, after
// the batch submitted its io_uring reads; run() does what no batch ran.
TEST(ColdReads, WorkWhileReadingRunsOnceWithTheBatchsReadsInFlight) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 256;
  write_wide(path, n);
  const bool direct = takes_o_direct(path);  // (tmpfs: no reads to be in flight)
  evict_file(path);
  Reader r(path, direct_options(true));
  const std::vector<size_t> idx = batches_of(shuffled(n, 3), 64)[0];
  int runs = 0;
  size_t pending = 0;
  {
    torch_lmdb::detail::WhileReadingScope scope([&] {
      ++runs;
      pending = torch_lmdb::detail::direct_reads_pending();
    });
    const Batch b = r.read_batch(idx);
    EXPECT_EQ(runs, 1);
    if (direct) EXPECT_GT(pending, 0u) << "the work ran before the batch's reads were submitted, or after they completed";
    torch_lmdb::detail::WhileReadingScope::run();
    EXPECT_EQ(runs, 1) << "run() after the batch ran the work again";
    for (size_t j = 0; j < idx.size(); ++j)
      ASSERT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(idx[j], kWidth)["x"]));
  }
  EXPECT_EQ(torch_lmdb::detail::direct_reads_pending(), 0u);
  {
    torch_lmdb::detail::WhileReadingScope scope([&] { ++runs; });
    torch_lmdb::detail::WhileReadingScope::run();  // no batch: run() does it
    torch_lmdb::detail::WhileReadingScope::run();
  }
  EXPECT_EQ(runs, 2);
  torch_lmdb::detail::WhileReadingScope::run();  // no scope: nothing
  EXPECT_EQ(runs, 2);
}

TEST(ColdReads, DirectReadsOfABatchAreBoundedByPageRequestBytes) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 256);
  evict_file(path);
  ReaderOptions o = direct_options(false);
  o.direct_reads = true;
  o.page_requests = PageRequests::Always;
  o.page_request_bytes = 64 << 10;  // three 16 KiB records (5 pages each) a batch
  Reader r(path, o);
  const auto order = shuffled(256, 8);
  const Batch b = r.read_batch(order);
  for (size_t j = 0; j < order.size(); ++j)
    ASSERT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(order[j], kWidth)["x"]));
  EXPECT_LE(r.io_stats().direct_records, 3u);
  if (takes_o_direct(path)) EXPECT_GT(r.io_stats().direct_records, 0u);
}

TEST(ColdReads, ADamagedRecordReadWithODirectIsRaisedAtItsBatch) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 300);
  torch_lmdb_test::mutate_record(path, 150, [](std::string& value) { value[value.size() / 2] ^= 0x5A; });
  evict_file(path);
  ReaderOptions o = direct_options(true);
  o.page_requests = PageRequests::Always;
  o.verify = true;
  Reader r(path, o);
  expect_only_batch_2_raises_index_150(r);
  if (takes_o_direct(path)) EXPECT_GT(r.io_stats().direct_records, 0u);
}

TEST(ColdReads, AFileCutShortUnderDirectReadsRaisesItsNamedError) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 600);
  ReaderOptions o = direct_options(true);
  o.page_requests = PageRequests::Always;
  Reader r(path, o);
  ASSERT_EQ(r.read_batch(std::vector<size_t>{0}).tensors["x"].size(0), 1);
  struct stat st {};
  ASSERT_EQ(::stat((path + "/data.mdb").c_str(), &st), 0);
  ASSERT_EQ(::truncate((path + "/data.mdb").c_str(), st.st_size / 2), 0);
  evict_file(path);
  std::vector<size_t> tail(100);
  std::iota(tail.begin(), tail.end(), 500);  // records past the cut
  try {
    r.read_batch(tail);
    FAIL() << "records past the end of the file were returned";
  } catch (const CorruptedError& e) {
    EXPECT_NE(std::string(e.what()).find(path + "/data.mdb"), std::string::npos) << e.what();
  }
}

TEST(ColdReads, StreamOnTwoThreadsReadsDirectlyEverySampleOnce) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 640;
  write_wide(path, n);
  evict_file(path);
  Reader r(path, direct_options(true));
  StreamOptions o;
  o.batch_size = 64;
  o.threads = 2;
  o.batches_ahead = 4;
  BatchStream stream(r, o);
  const std::vector<int> seen = read_epoch(stream, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "index " << i;
  // The stream requests no page ahead for them (the page cache would hold them).
  if (takes_o_direct(path)) EXPECT_GT(r.io_stats().direct_records, uint64_t(n / 2));
}

// ---- a block shuffle's cold windows read whole ahead of their batches (Reader::read_window) ----

TEST(ColdReads, BlockShuffleStreamReadsColdWindowsAheadInLongReadsEverySampleOnce) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 2048;  // ~34 MiB
  write_wide(path, n);
  for (bool keep : {false, true}) {
    evict_file(path);
    ReaderOptions ro;
    ro.keep_cache = keep;
    Reader r(path, ro);
    StreamOptions o;
    o.batch_size = 64;
    o.order = SampleOrder::BlockShuffle;
    o.block_size = 128;
    o.window_blocks = 2;  // windows of 256 samples: 4 batches, 8 windows
    o.threads = 2;
    {
      BatchStream stream(r, o);
      const auto seen = read_epoch(stream, n);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "index " << i;
    }
    const Reader::IoStats cold = r.io_stats();
    if (keep || takes_o_direct(path)) {
      EXPECT_GT(cold.window_records, uint64_t(n * 3 / 4)) << (keep ? "keep_cache" : "O_DIRECT") << ": " << cold.direct_records << " direct, " << cold.batches << " batches";
      // Every record's bytes (keep_cache: the kernel's read-ahead of the
      // buffered reads caches some records of the next window, which it skips).
      EXPECT_GE(cold.window_bytes, uint64_t(n) * kWidth * 4 * (keep ? 9 : 10) / 10)
          << "every record's bytes, keep_cache " << keep;
      EXPECT_LT(cold.direct_records, uint64_t(n / 10)) << "records read one by one, keep_cache " << keep;
      EXPECT_EQ(cold.request_pages_calls, 0u) << "a window read whole is not requested again, keep_cache " << keep;
    }
    if (!keep) {
      const auto [in, pages] = resident_pages(path);
      EXPECT_LT(in, pages / 10) << in << " of " << pages << " pages entered the page cache";
      continue;
    }
    // keep_cache: the windows' pages stay cached and the next epoch reads
    // them through the map; nothing is read ahead (its first records are cached).
    EXPECT_GT(resident_pages(path).first, resident_pages(path).second * 9 / 10);
    {
      o.epoch = 1;
      BatchStream warm(r, o);
      const auto seen = read_epoch(warm, n);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)], 1) << "index " << i;
    }
    EXPECT_EQ(r.io_stats().window_bytes, cold.window_bytes);
    EXPECT_EQ(r.io_stats().window_records, cold.window_records);
  }
}

TEST(ColdReads, WindowReadRecordsAreCheckedAsAnyAndTakenOnlyFromTheirSnapshotAndWholeReads) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  write_wide(path, 400);
  torch_lmdb_test::mutate_record(path, 150, [](std::string& value) { value[value.size() / 2] ^= 0x5A; });
  evict_file(path);
  const bool direct = takes_o_direct(path);
  ReaderOptions ro;
  ro.keep_cache = !direct;  // O_DIRECT where the file system takes it, buffered reads otherwise
  ro.verify = true;
  Reader r(path, ro);
  std::vector<size_t> window(256);
  std::iota(window.begin(), window.end(), 0);
  std::shuffle(window.begin(), window.end(), std::mt19937_64(3));
  const auto ahead = r.read_window(window);
  ASSERT_NE(ahead, nullptr);
  EXPECT_GT(ahead->records, 240u) << "the uncached records (a few share the pages the lookups read)";
  EXPECT_GE(r.io_stats().window_bytes, uint64_t(256) * kWidth * 4);
  // A damaged record read ahead is raised with its index, as any record.
  try {
    r.read_batch(std::vector<size_t>{7, 150, 8}, {}, ahead.get());
    FAIL() << "the damaged record 150 was returned";
  } catch (const CorruptedError& e) {
    EXPECT_NE(std::string(e.what()).find("index 150"), std::string::npos) << e.what();
  }
  const uint64_t before = r.io_stats().window_records;
  EXPECT_GE(before, 1u);
  const std::vector<size_t> first(window.begin(), window.begin() + 64);
  const Batch b = r.read_batch(first, {}, ahead.get());
  for (size_t j = 0; j < first.size(); ++j)
    ASSERT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(first[j], kWidth)["x"]));
  EXPECT_EQ(r.io_stats().window_records, before + first.size());
  EXPECT_EQ(r.io_stats().direct_records, 0u) << "every record came from the window read";
  // Without it, the same batch reads its records one by one.
  evict_file(path);
  r.read_batch(first);
  EXPECT_EQ(r.io_stats().window_records, before + first.size());
  if (direct) EXPECT_GT(r.io_stats().direct_records, 0u);

  // detail::read_window: ranges merged into runs; a run read short (past the
  // end of the file) and another snapshot give nothing.
  struct stat st {};
  ASSERT_EQ(::stat((path + "/data.mdb").c_str(), &st), 0);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto env = torch_lmdb::Env::open(path, torch_lmdb::EnvOptions{});
  if (direct) ASSERT_GE(env->direct_fd(), 0);
  const uint64_t version = env->file_version();
  ASSERT_NE(version, 0u);
  // 4096-6000 and 8192-12288 share a run (the 2 KiB between is less than
  // either); a 1 KiB record 28 KiB further has a run of its own; the last
  // range lies past the end of the file.
  const std::vector<torch_lmdb::detail::WindowRange> want{
      {0, 8192, 12288}, {0, 4096, 6000}, {0, 40960, 41984}, {0, size - 4096, size + 8192}};
  auto ranges = want;
  const auto got = torch_lmdb::detail::read_window({env}, {42}, {version}, ranges, /*keep_cache=*/!direct,
                                                   size_t{1} << 30, nullptr);
  ASSERT_NE(got, nullptr);
  ASSERT_EQ(got->files.size(), 1u);
  EXPECT_EQ(got->files[0].runs.size(), 3u);
  std::string expect(8192, '\0');
  const int fd = ::open((path + "/data.mdb").c_str(), O_RDONLY);
  ASSERT_EQ(::pread(fd, &expect[0], 8192, 4096), 8192);
  std::string apart(1024, '\0');
  ASSERT_EQ(::pread(fd, &apart[0], 1024, 40960), 1024);
  ::close(fd);
  const char* p = got->find(env.get(), 42, version, 4096, 8192);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(std::memcmp(p, expect.data(), 8192), 0) << "the bytes of the file";
  const char* q = got->find(env.get(), 42, version, 40960, 1024);
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(std::memcmp(q, apart.data(), 1024), 0);
  EXPECT_EQ(got->find(env.get(), 42, version, 20000, 16), nullptr) << "between runs: not read";
  EXPECT_EQ(got->find(env.get(), 43, version, 4096, 8192), nullptr) << "another snapshot";
  EXPECT_EQ(got->find(env.get(), 42, version + 1, 4096, 8192), nullptr) << "the file changed (copied over in place)";
  EXPECT_EQ(got->find(env.get(), 42, version, size - 4096, 4096), nullptr) << "a run read short";
  EXPECT_EQ(got->find(env.get(), 42, version, 4096, 16384), nullptr) << "past its run";
  // The runs stay within the budget: 8 KiB holds the first run only.
  ranges = want;
  const auto small = torch_lmdb::detail::read_window({env}, {42}, {version}, ranges, !direct, 8192, nullptr);
  ASSERT_NE(small, nullptr);
  EXPECT_EQ(small->files[0].runs.size(), 1u);
  EXPECT_EQ(small->records, 2u);
  EXPECT_NE(small->find(env.get(), 42, version, 4096, 8192), nullptr);
  EXPECT_EQ(small->find(env.get(), 42, version, 40960, 1024), nullptr) << "past the budget";
  // Nothing is read ahead without direct reads.
  ReaderOptions plain = ro;
  plain.direct_reads = false;
  evict_file(path);
  EXPECT_EQ(Reader(path, plain).read_window(window), nullptr);
}

// detail/direct_io.h: more requests than the ring holds, waited for in any
// order; the rest cancelled by finish_direct_reads(); the device's alignment.
TEST(ColdReads, DirectIoReadsRequestsBeyondItsRingInAnyOrderAndFinishesTheRest) {
  TempDir tmp;
  const std::string file = tmp.sub("bytes");
  const size_t n = 300, block = 4096;
  std::string bytes(n * block, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>((i * 131 + i / block) & 0xff);
  {
    const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    ::fsync(fd);
    ::close(fd);
  }
  int fd = ::open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) fd = ::open(file.c_str(), O_RDONLY);  // (a file system without O_DIRECT: buffered)
  ASSERT_GE(fd, 0);
  const uint32_t align = torch_lmdb::detail::direct_alignment(fd);
  EXPECT_TRUE(align >= 1 && align <= 4096 && (align & (align - 1)) == 0) << align;
  // Request j: block (j * 7) % n, at an offset of `align` into it (the
  // device's alignment is all O_DIRECT needs), one block long.
  const auto requests = [&](size_t count, char* buffer) {
    std::vector<torch_lmdb::detail::DirectRead> reads(count);
    for (size_t j = 0; j < count; ++j) {
      reads[j].fd = fd;
      reads[j].offset = ((j * 7) % n) * block + (((j * 7) % n) + 1 < n ? align : 0);
      reads[j].length = block;
      reads[j].dst = buffer + j * block;
    }
    return reads;
  };
  char* buffer = torch_lmdb::detail::direct_buffer(n * block);
  std::vector<torch_lmdb::detail::DirectRead> reads = requests(n, buffer);
  ASSERT_TRUE(torch_lmdb::detail::start_direct_reads(reads));
  for (size_t j = n; j-- > 0;) {  // the last request first: every one before it is read meanwhile
    ASSERT_EQ(torch_lmdb::detail::wait_direct_read(j), static_cast<int64_t>(block)) << "request " << j;
    ASSERT_EQ(std::memcmp(reads[j].dst, bytes.data() + reads[j].offset, block), 0) << "request " << j;
  }
  torch_lmdb::detail::finish_direct_reads();
  // Started, one waited for, then finished: nothing is left in flight, and
  // each request either read its bytes or was cancelled before it began.
  reads = requests(n, buffer);
  ASSERT_TRUE(torch_lmdb::detail::start_direct_reads(reads));
  ASSERT_EQ(torch_lmdb::detail::wait_direct_read(0), static_cast<int64_t>(block));
  torch_lmdb::detail::finish_direct_reads();
  size_t cancelled = 0;
  for (size_t j = 0; j < n; ++j) {
    if (reads[j].result == -ECANCELED) {
      ++cancelled;
      continue;
    }
    ASSERT_EQ(reads[j].result, static_cast<int64_t>(block)) << "request " << j;
    ASSERT_EQ(std::memcmp(reads[j].dst, bytes.data() + reads[j].offset, block), 0) << "request " << j;
  }
  EXPECT_GT(cancelled, 0u) << "requests beyond the ring are submitted only as earlier ones complete";
  // A wait for a request already done still takes the completions that came
  // meanwhile and tops the ring up: the device's queue does not run dry while
  // the thread copies what it has.
  reads = requests(n, buffer);
  ASSERT_TRUE(torch_lmdb::detail::start_direct_reads(reads));
  ASSERT_EQ(torch_lmdb::detail::wait_direct_read(0), static_cast<int64_t>(block));
  for (int tries = 0; tries < 3; ++tries) {
    const size_t before = torch_lmdb::detail::direct_reads_pending();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // (the ring's reads complete)
    ASSERT_EQ(torch_lmdb::detail::wait_direct_read(0), static_cast<int64_t>(block));
    EXPECT_LT(torch_lmdb::detail::direct_reads_pending(), before) << "wait " << tries;
  }
  torch_lmdb::detail::finish_direct_reads();
  // Waited for in order: all of them.
  reads = requests(n, buffer);
  ASSERT_TRUE(torch_lmdb::detail::start_direct_reads(reads));
  for (size_t j = 0; j < n; ++j) ASSERT_EQ(torch_lmdb::detail::wait_direct_read(j), static_cast<int64_t>(block));
  torch_lmdb::detail::finish_direct_reads();
  for (size_t j = 0; j < n; ++j) ASSERT_EQ(std::memcmp(reads[j].dst, bytes.data() + reads[j].offset, block), 0);
  ::close(fd);
}

namespace {

// Major faults of the calling thread so far.
long thread_major_faults() {
  struct rusage u {};
  ::getrusage(RUSAGE_THREAD, &u);
  return u.ru_majflt;
}

// Walks every key of the samples table (not the values: their overflow
// pages are not touched) and returns the major faults it took.
long walk_keys(const Env& env, size_t* keys) {
  ReadTxn txn = env.read_txn();
  MDB_cursor* c = nullptr;
  EXPECT_EQ(mdb_cursor_open(txn.get(), env.samples_dbi(), &c), MDB_SUCCESS);
  const long before = thread_major_faults();
  MDB_val k{0, nullptr}, v{0, nullptr};
  *keys = 0;
  for (int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == MDB_SUCCESS; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT))
    ++*keys;
  const long faults = thread_major_faults() - before;
  mdb_cursor_close(c);
  return faults;
}

}  // namespace

// A cold lookup faults its leaf page in from the map, one at a time:
// request_leaf_pages asks the disk for every leaf of the table at once, and a
// walk of the keys afterwards waits for none. 36,000 samples of one overflow
// page each make a B-tree three levels deep (root, branches, leaves).
TEST(ColdReads, TheLeavesOfTheSamplesTableAreAskedForAtOnce) {
  TempDir tmp;
  const std::string path = tmp.sub("d");
  constexpr int64_t n = 36000;
  {
    Writer w(path);
    for (int64_t i = 0; i < n; ++i) w.write(make_sample(i, 520));  // ~2.1 KB: one overflow page
    w.close();
  }
  MDB_stat st{};
  size_t keys = 0;
  evict_file(path);
  {
    auto env = Env::open(path, EnvOptions{});
    ReadTxn txn = env->read_txn();
    ASSERT_EQ(mdb_stat(txn.get(), env->samples_dbi(), &st), MDB_SUCCESS);
    ASSERT_EQ(st.ms_depth, 3u);
    ASSERT_GE(st.ms_overflow_pages, st.ms_leaf_pages);
    // Without the request, the walk faults the leaves in (what the check below rests on).
    EXPECT_GT(walk_keys(*env, &keys), static_cast<long>(st.ms_leaf_pages / 2));
    EXPECT_EQ(keys, static_cast<size_t>(n));
    // Too small a budget, or a table not named so: nothing asked for.
    EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "samples", env->buffered_fd(),
                                         (st.ms_leaf_pages - 1) * st.ms_psize), 0u);
    EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "meta", env->buffered_fd(), size_t{1} << 30), 0u);
  }
  evict_file(path);
  auto env = Env::open(path, EnvOptions{});
  {
    ReadTxn txn = env->read_txn();
    EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "samples", env->buffered_fd(),
                                         st.ms_leaf_pages * st.ms_psize),
              st.ms_leaf_pages);
  }
  // The kernel reads them in the background: wait until they are in.
  const size_t wanted = st.ms_leaf_pages + st.ms_branch_pages;
  for (int i = 0; i < 500 && resident_pages(path).first < wanted; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_GE(resident_pages(path).first, wanted);
  EXPECT_LT(resident_pages(path).first, wanted + st.ms_overflow_pages / 10);  // the leaves, not the values
  EXPECT_EQ(walk_keys(*env, &keys), 0);
  EXPECT_EQ(keys, static_cast<size_t>(n));
}

// A damaged branch page stops the walk: nothing asked for, nothing raised.
TEST(ColdReads, ADamagedBranchPageAsksForNoLeaves) {
  TempDir tmp;
  const std::string path = tmp.sub("d");
  write_wide(path, 600);  // depth 2: a root branch page over ~4 leaves
  size_t psize = 0, root = 0;
  {
    auto env = Env::open(path, EnvOptions{});
    ReadTxn txn = env->read_txn();
    MDB_stat st{};
    ASSERT_EQ(mdb_stat(txn.get(), env->samples_dbi(), &st), MDB_SUCCESS);
    ASSERT_EQ(st.ms_depth, 2u);
    psize = st.ms_psize;
    EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "samples", env->buffered_fd(), size_t{1} << 30),
              st.ms_leaf_pages);
    MDB_val k{7, const_cast<char*>("samples")}, v{0, nullptr};  // the table's record (MDB_db) in the main table
    ASSERT_EQ(mdb_get(txn.get(), 1, &k, &v), MDB_SUCCESS);
    ASSERT_EQ(v.mv_size, 48u);
    std::memcpy(&root, static_cast<const char*>(v.mv_data) + 40, 8);
  }
  const std::string file = path + "/data.mdb";
  struct Damage {
    size_t at;
    std::vector<unsigned char> bytes;
  };
  // The root's page number, its kind, its lower bound (odd; even and below
  // the header), a child's page number past the file, and two nodes on one child.
  const std::vector<Damage> damages = {{0, {0x55}}, {10, {0x02}}, {12, {0x03}}, {12, {0x02, 0x00}}, {0, {}}, {1, {}}};
  for (size_t d = 0; d < damages.size(); ++d) {
    const int fd = ::open(file.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    std::vector<unsigned char> page(psize);
    ASSERT_EQ(::pread(fd, page.data(), psize, static_cast<off_t>(root * psize)), static_cast<ssize_t>(psize));
    const std::vector<unsigned char> intact = page;
    if (damages[d].bytes.empty()) {
      uint16_t first = 0, second = 0;  // the first two nodes
      std::memcpy(&first, page.data() + 16, 2);
      std::memcpy(&second, page.data() + 18, 2);
      if (damages[d].at == 0) {
        page[first + 2] = 0x7f;  // mn_hi: the child's page number + 0x7f << 16
      } else {
        std::memcpy(page.data() + first, page.data() + second, 6);  // the second's child, twice
      }
    } else {
      std::memcpy(page.data() + damages[d].at, damages[d].bytes.data(), damages[d].bytes.size());
    }
    ASSERT_EQ(::pwrite(fd, page.data(), psize, static_cast<off_t>(root * psize)), static_cast<ssize_t>(psize));
    {
      auto env = Env::open(path, EnvOptions{});
      ReadTxn txn = env->read_txn();
      EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "samples", env->buffered_fd(), size_t{1} << 30),
                0u)
          << "damage " << d;
    }
    ASSERT_EQ(::pwrite(fd, intact.data(), psize, static_cast<off_t>(root * psize)), static_cast<ssize_t>(psize));
    ::close(fd);
  }
  // The table's record in the main table says 40 levels and 2^40 branch
  // pages (mdb_stat reports the same): no walk that deep or that long.
  std::vector<unsigned char> record;
  {
    auto env = Env::open(path, EnvOptions{});
    ReadTxn txn = env->read_txn();
    MDB_val k{7, const_cast<char*>("samples")}, v{0, nullptr};
    ASSERT_EQ(mdb_get(txn.get(), 1, &k, &v), MDB_SUCCESS);
    record.assign(static_cast<const unsigned char*>(v.mv_data), static_cast<const unsigned char*>(v.mv_data) + 48);
  }
  std::vector<unsigned char> bytes;
  {
    const int fd = ::open(file.c_str(), O_RDONLY);
    struct stat st {};
    ::fstat(fd, &st);
    bytes.resize(static_cast<size_t>(st.st_size));
    ASSERT_EQ(::pread(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    ::close(fd);
  }
  size_t patched = 0;
  for (auto it = std::search(bytes.begin(), bytes.end(), record.begin(), record.end()); it != bytes.end();
       it = std::search(it + 1, bytes.end(), record.begin(), record.end())) {
    const uint16_t depth = 40;
    const uint64_t branches = uint64_t{1} << 40;
    std::memcpy(&*it + 6, &depth, 2);
    std::memcpy(&*it + 8, &branches, 8);
    ++patched;
  }
  ASSERT_GE(patched, 1u);
  {
    const int fd = ::open(file.c_str(), O_WRONLY);
    ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    ::close(fd);
  }
  auto env = Env::open(path, EnvOptions{});
  ReadTxn txn = env->read_txn();
  MDB_stat st{};
  ASSERT_EQ(mdb_stat(txn.get(), env->samples_dbi(), &st), MDB_SUCCESS);
  ASSERT_EQ(st.ms_depth, 40u);
  EXPECT_EQ(torch_lmdb::detail::request_leaf_pages(txn.get(), env->samples_dbi(), "samples", env->buffered_fd(),
                                                   size_t{1} << 30),
            0u);
}

// A file's first cold batch (or lookups ahead, Reader::request_pages) asks for
// the leaves, once per opened file: a key walk afterwards waits for none.
TEST(ColdReads, AFilesFirstColdBatchAsksForTheLeavesOnce) {
  TempDir tmp;
  const std::string path = tmp.sub("d");
  constexpr int64_t n = 36000;
  {
    Writer w(path);
    for (int64_t i = 0; i < n; ++i) w.write(make_sample(i, 520));
    w.close();
  }
  for (bool ahead : {false, true}) {
    evict_file(path);
    Reader r(path, direct_options(true));
    if (ahead) {
      (void)r.request_pages(std::vector<size_t>{17});
    } else {
      const Batch b = r.read_batch(std::vector<size_t>{17});
      EXPECT_TRUE(torch::equal(b.tensors["x"][0], make_sample(17, 520)["x"]));
    }
    auto env = Env::open(path, EnvOptions{});  // the reader's (one env per file and process)
    EXPECT_FALSE(env->claim_leaf_request()) << "claimed by the first cold batch, ahead " << ahead;
    MDB_stat st{};
    {
      ReadTxn txn = env->read_txn();
      ASSERT_EQ(mdb_stat(txn.get(), env->samples_dbi(), &st), MDB_SUCCESS);
    }
    const size_t wanted = st.ms_leaf_pages + st.ms_branch_pages;
    for (int i = 0; i < 500 && resident_pages(path).first < wanted; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    size_t keys = 0;
    EXPECT_EQ(walk_keys(*env, &keys), 0) << "ahead " << ahead;
    EXPECT_EQ(keys, static_cast<size_t>(n));
  }
}

// A record only partly in the page cache (here its first page, as another
// reader's read-ahead leaves it) counts as cold: it is read whole through
// io_uring, not faulted in through the map a page at a time.
TEST(ColdReads, ARecordPartlyInThePageCacheIsReadWholeFromTheDisk) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  const int64_t n = 400;
  write_wide(path, n);
  for (bool keep_cache : {false, true}) {
    evict_file(path);
    {
      auto env = Env::open(path, EnvOptions{});
      ReadTxn txn = env->read_txn();
      const int fd = ::open((path + "/data.mdb").c_str(), O_RDONLY);
      ASSERT_GE(fd, 0);
      ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM), 0);  // (no read-ahead: the first page alone)
      std::vector<char> page(4096);
      for (int64_t i = 0; i < n; ++i) {
        unsigned char kbuf[8];
        encode_key(static_cast<uint64_t>(i), kbuf);
        MDB_val k{8, kbuf}, v{0, nullptr};
        ASSERT_EQ(mdb_get(txn.get(), env->samples_dbi(), &k, &v), MDB_SUCCESS);
        const uint64_t at = env->file_offset(v.mv_data) / 4096 * 4096;
        ASSERT_EQ(::pread(fd, page.data(), page.size(), static_cast<off_t>(at)), 4096);
      }
      ::close(fd);
    }
    const auto [in, pages] = resident_pages(path);
    ASSERT_LT(in, pages / 2) << "only the records' first pages are cached";
    ReaderOptions o = direct_options(true);
    o.keep_cache = keep_cache;
    Reader r(path, o);
    const long faults = thread_major_faults();
    for (const auto& idx : batches_of(shuffled(n, 9), 64)) {
      Batch b = r.read_batch(idx);
      for (size_t j = 0; j < idx.size(); ++j)
        ASSERT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], make_sample(idx[j], kWidth)["x"]))
            << "index " << idx[j];
    }
    // Faulted in, each record's 4 other pages would be 4 major faults.
    EXPECT_LT(thread_major_faults() - faults, n / 10) << "keep_cache " << keep_cache;
    // (keep_cache: the kernel's read-ahead of the buffered reads caches some records whole.)
    if (!keep_cache && takes_o_direct(path))
      EXPECT_GT(r.io_stats().direct_records, uint64_t(n * 9 / 10)) << "keep_cache " << keep_cache;
  }
  // Records of more than 64 pages (their first and last page are checked):
  // the first page cached, the last not.
  const std::string big = tmp.sub("big");
  constexpr int64_t kBigWidth = 70000, kBig = 20;  // 280 KB: 69 pages a record
  {
    Writer w(big);
    for (int64_t i = 0; i < kBig; ++i) w.write(make_sample(i, kBigWidth));
    w.close();
  }
  evict_file(big);
  {
    auto env = Env::open(big, EnvOptions{});
    ReadTxn txn = env->read_txn();
    const int fd = ::open((big + "/data.mdb").c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM), 0);
    std::vector<char> page(4096);
    for (int64_t i = 0; i < kBig; ++i) {
      unsigned char kbuf[8];
      encode_key(static_cast<uint64_t>(i), kbuf);
      MDB_val k{8, kbuf}, v{0, nullptr};
      ASSERT_EQ(mdb_get(txn.get(), env->samples_dbi(), &k, &v), MDB_SUCCESS);
      ASSERT_GT(v.mv_size, 64u * 4096);
      ASSERT_EQ(::pread(fd, page.data(), page.size(), static_cast<off_t>(env->file_offset(v.mv_data) / 4096 * 4096)), 4096);
    }
    ::close(fd);
  }
  if (!takes_o_direct(big)) return;
  Reader r(big, direct_options(true));
  std::vector<size_t> all(kBig);
  std::iota(all.begin(), all.end(), size_t{0});
  const Batch b = r.read_batch(all);
  for (int64_t i = 0; i < kBig; ++i)
    ASSERT_TRUE(torch::equal(b.tensors["x"][i], make_sample(i, kBigWidth)["x"])) << "index " << i;
  // (The first records may lie whole in what the open's reads of the meta
  // pages read ahead: cached, rightly read through the map.)
  EXPECT_GE(r.io_stats().direct_records, static_cast<uint64_t>(kBig - 2));
}
