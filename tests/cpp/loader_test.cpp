// BatchStream's ranks and positions (stream.h) and the native loader (loader.h).
#include <torch/types.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "test_util.h"

using namespace torch_lmdb;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {

std::vector<int64_t> ids(const Batch& b) {
  const at::Tensor t = b.tensors["index"];
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
}

// Every batch a stream yields, as sample ids, checking the contents against batch_indices.
std::vector<std::vector<int64_t>> drain(BatchStream& s) {
  std::vector<std::vector<int64_t>> out;
  while (auto b = s.next()) {
    out.push_back(ids(*b));
    const auto want = s.batch_indices(out.size() - 1);
    EXPECT_EQ(std::vector<int64_t>(want.begin(), want.end()), out.back());
  }
  return out;
}

StreamOptions opts(size_t batch, size_t rank, size_t world, size_t start, uint64_t epoch = 0) {
  StreamOptions o;
  o.batch_size = batch;
  o.seed = 7;
  o.epoch = epoch;
  o.rank = rank;
  o.world_size = world;
  o.start = start;
  o.threads = 2;
  return o;
}

}  // namespace

TEST(RankPlan, RanksPartitionEveryEpochWithEqualBatchCounts) {
  for (size_t n : {0, 1, 5, 64, 100, 101, 103}) {
    for (size_t world : {1, 2, 3, 4}) {
      for (size_t start : {size_t{0}, n / 3}) {
        std::multiset<size_t> seen;
        size_t batches = SIZE_MAX;
        for (size_t r = 0; r < world; ++r) {
          const RankPlan p = rank_plan(n, 8, r, world, start, false);
          if (batches == SIZE_MAX) batches = p.size();
          EXPECT_EQ(p.size(), batches) << "n=" << n << " world=" << world << " rank=" << r;
          for (size_t k = 0; k < p.size(); ++k) {
            if (p.count[k] == 0) seen.insert(p.pad_index);
            for (size_t i = 0; i < p.count[k]; ++i) seen.insert(p.first[k] + i);
          }
        }
        const size_t tail = (n - start) % (8 * world);
        std::multiset<size_t> want;
        for (size_t i = start; i < n; ++i) want.insert(i);
        if (tail != 0 && tail < world) {  // the documented repetition: one padding sample per empty share
          EXPECT_EQ(seen.size(), n - start + world - tail) << "n=" << n << " world=" << world;
        } else {
          EXPECT_EQ(seen, want) << "n=" << n << " world=" << world << " start=" << start;
        }
      }
    }
  }
  // drop_last: only full steps, the same on every rank.
  EXPECT_EQ(rank_plan(100, 8, 1, 3, 0, true).size(), 4u);
  EXPECT_EQ(rank_plan(100, 8, 1, 3, 0, true).position_after.back(), 96u);
  EXPECT_THROW(rank_plan(10, 8, 2, 2, 0, false), c10::ValueError);
  EXPECT_THROW(rank_plan(10, 8, 0, 1, 11, false), c10::ValueError);
}

TEST(Stream, EpochSeedsTheOrderDeterministically) {
  EXPECT_EQ(epoch_seed(42, 0), 42u);
  EXPECT_NE(epoch_seed(42, 1), epoch_seed(42, 2));
  TempDir tmp;
  write_dataset(tmp.sub("d"), 50);
  const Reader reader(tmp.sub("d"));
  BatchStream a(reader, opts(8, 0, 1, 0, 1)), b(reader, opts(8, 0, 1, 0, 1)), c(reader, opts(8, 0, 1, 0, 2));
  const auto da = drain(a), db = drain(b), dc = drain(c);
  EXPECT_EQ(da, db);
  EXPECT_NE(da, dc);
  EXPECT_EQ(a.position(), 50u);
  EXPECT_EQ(a.delivered(), a.size());
}

TEST(Stream, StartAtAPositionContinuesTheSameStream) {
  TempDir tmp;
  write_dataset(tmp.sub("d"), 77);
  const Reader reader(tmp.sub("d"));
  BatchStream whole(reader, opts(8, 0, 1, 0));
  const auto all = drain(whole);
  for (size_t k : {0, 1, 5, 9}) {
    BatchStream first(reader, opts(8, 0, 1, 0));
    std::vector<std::vector<int64_t>> got;
    for (size_t i = 0; i < k; ++i) got.push_back(ids(*first.next()));
    EXPECT_EQ(first.position(), std::min<size_t>(77, 8 * k));
    BatchStream rest(reader, opts(8, 0, 1, first.position()));
    for (auto& b : drain(rest)) got.push_back(b);
    EXPECT_EQ(got, all) << "interrupted after " << k << " batches";
  }
}

TEST(Stream, ElasticResumeReadsEveryRemainingSampleOnce) {
  TempDir tmp;
  write_dataset(tmp.sub("d"), 203);
  const Reader reader(tmp.sub("d"));
  // Two ranks in step read 4 batches each; then 1 or 3 ranks finish the epoch.
  std::set<int64_t> before;
  size_t position = 0;
  for (size_t r = 0; r < 2; ++r) {
    BatchStream s(reader, opts(10, r, 2, 0));
    for (int i = 0; i < 4; ++i)
      for (int64_t id : ids(*s.next())) EXPECT_TRUE(before.insert(id).second);
    position = s.position();
  }
  ASSERT_EQ(position, 80u);
  for (size_t world : {1, 3}) {
    std::multiset<int64_t> after;
    size_t batches = SIZE_MAX;
    for (size_t r = 0; r < world; ++r) {
      BatchStream s(reader, opts(10, r, world, position));
      const auto got = drain(s);
      if (batches == SIZE_MAX) batches = got.size();
      EXPECT_EQ(got.size(), batches);
      for (const auto& b : got) after.insert(b.begin(), b.end());
    }
    EXPECT_EQ(after.size(), 203u - 80u) << "world " << world;
    EXPECT_EQ(std::set<int64_t>(after.begin(), after.end()).size(), after.size()) << "a sample read twice";
    for (int64_t id : after) EXPECT_EQ(before.count(id), 0u) << "sample " << id << " read again";
  }
}

TEST(Loader, IteratesEpochsAdvancingTheOrder) {
  TempDir tmp;
  write_dataset(tmp.sub("d"), 100);
  LoaderOptions o;
  o.batch_size = 16;
  o.seed = 3;
  auto loader = make_loader(tmp.sub("d"), o);
  EXPECT_EQ(loader->size(), 7u);
  std::vector<std::vector<int64_t>> epochs(2);
  for (int e = 0; e < 2; ++e) {
    EXPECT_EQ(loader->epoch(), static_cast<uint64_t>(e));
    for (auto& batch : *loader) {
      const auto b = ids(batch);
      epochs[e].insert(epochs[e].end(), b.begin(), b.end());
    }
    std::vector<int64_t> sorted = epochs[e];
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < 100; ++i) ASSERT_EQ(sorted[i], i);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  loader->set_epoch(1);
  std::vector<int64_t> again;
  for (auto& batch : *loader) {
    const auto b = ids(batch);
    again.insert(again.end(), b.begin(), b.end());
  }
  EXPECT_EQ(again, epochs[1]);
  // Sequential, fields, drop_last.
  LoaderOptions s;
  s.shuffle = false;
  s.batch_size = 30;
  s.drop_last = true;
  s.fields = {"index"};
  auto seq = make_loader(std::vector<std::string>{tmp.sub("d")}, s);
  std::vector<int64_t> order;
  for (auto& batch : *seq) {
    EXPECT_EQ(batch.tensors.size(), 1u);
    const auto b = ids(batch);
    order.insert(order.end(), b.begin(), b.end());
  }
  ASSERT_EQ(order.size(), 90u);
  for (int64_t i = 0; i < 90; ++i) EXPECT_EQ(order[i], i);
}

TEST(Loader, StateResumesTheIdenticalStreamInANewLoader) {
  TempDir tmp;
  write_dataset(tmp.sub("d"), 150);
  LoaderOptions o;
  o.batch_size = 16;
  o.seed = 11;
  o.threads = 3;
  o.batches_ahead = 3;
  auto whole = make_loader(tmp.sub("d"), o);
  whole->set_epoch(2);
  std::vector<std::vector<int64_t>> all;
  for (auto& b : *whole) all.push_back(ids(b));
  for (size_t k : {1, 4, 9}) {
    auto first = make_loader(tmp.sub("d"), o);
    first->set_epoch(2);
    std::vector<std::vector<int64_t>> got;
    LoaderState st;
    for (auto& b : *first) {
      got.push_back(ids(b));
      if (got.size() == k) {
        st = first->state();
        break;
      }
    }
    EXPECT_EQ(st.epoch, 2u);
    EXPECT_EQ(st.position, std::min<size_t>(150, 16 * k));
    LoaderOptions other = o;
    other.seed = 999;  // the state's seed wins
    other.threads = 1;
    auto resumed = make_loader(tmp.sub("d"), other);
    resumed->load_state(st);
    for (auto& b : *resumed) got.push_back(ids(b));
    EXPECT_EQ(got, all) << "resumed after " << k << " batches";
    const LoaderState end = resumed->state();
    EXPECT_EQ(end.epoch, 3u);
    EXPECT_EQ(end.position, 0u);
  }
  LoaderState wrong;
  wrong.num_samples = 149;
  EXPECT_THROW(whole->load_state(wrong), c10::ValueError);
  LoaderOptions bad = o;
  bad.rank = 2;
  bad.world_size = 2;
  EXPECT_THROW(make_loader(tmp.sub("d"), bad), c10::ValueError);
}

TEST(Loader, OverloadsTakeOnePathAListOrAReader) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 10);
  write_dataset(tmp.sub("b"), 5, 10);
  const std::string a = tmp.sub("a"), b = tmp.sub("b");
  EXPECT_EQ(make_loader(a)->reader().size(), 10u);
  EXPECT_EQ(make_loader(a.c_str())->reader().size(), 10u);
  EXPECT_EQ(make_loader({a})->reader().size(), 10u);
  EXPECT_EQ(make_loader({a, b})->reader().size(), 15u);
  EXPECT_EQ(make_loader(Reader(b))->reader().size(), 5u);
  const Reader r(a);
  EXPECT_EQ(make_loader(r)->reader().size(), 10u);
}

// Suite name with "Concurrent": `make test-tsan` runs it under ThreadSanitizer.
TEST(ConcurrentLoader, StateWhileThreadsReadAheadCountsOnlyTakenBatches) {
  TempDir tmp;
  write_dataset(tmp.sub("d"), 300);
  LoaderOptions o;
  o.batch_size = 7;
  o.threads = 4;
  o.batches_ahead = 6;
  auto loader = make_loader(tmp.sub("d"), o);
  size_t k = 0;
  for (auto& b : *loader) {
    ++k;
    EXPECT_EQ(loader->state().position, std::min<size_t>(300, 7 * k));
    (void)b;
    if (k == 20) break;
  }
  // begin() again restarts the abandoned epoch from its start.
  size_t batches = 0;
  for (auto& b : *loader) {
    (void)b;
    ++batches;
  }
  EXPECT_EQ(batches, 43u);
  EXPECT_EQ(loader->epoch(), 1u);
}

// Raw payloads of 4 KiB and more reach a stream's batches through non-temporal
// stores (BatchOptions::nontemporal_stores): every byte, for odd widths (a tail under
// 64 bytes) and on two threads (under ThreadSanitizer too: make test-tsan).
TEST(Stream, WidePayloadsReadAheadArriveExactlyOnTwoThreads) {
  TempDir tmp;
  const int64_t n = 70;
  // Float counts: 1028 a 16-byte tail; 1037 slots not 16-byte aligned (some 32-byte aligned: both
  // copy loops); 1048 a 96-byte tail after 128-byte steps; 1056 whole 128-byte steps.
  for (int64_t width : {1024, 1028, 1037, 1048, 1056, 4096}) {
    const std::string path = tmp.sub("w" + std::to_string(width));
    {
      Writer w(path);
      for (int64_t i = 0; i < n; ++i) w.write(torch_lmdb_test::make_sample(i, width));
      w.close();
    }
    StreamOptions o;
    o.batch_size = 16;
    o.threads = 2;
    o.batches_ahead = 3;
    BatchStream stream(Reader(path), o);
    std::set<int64_t> seen;
    while (auto b = stream.next()) {
      const at::Tensor x = b->tensors["x"], index = b->tensors["index"];
      for (int64_t j = 0; j < x.size(0); ++j) {
        const int64_t i = index[j].item<int64_t>();
        seen.insert(i);
        EXPECT_TRUE(torch::equal(x[j], torch_lmdb_test::make_sample(i, width).find("x")->clone()))
            << "width " << width << " sample " << i;
      }
    }
    EXPECT_EQ(seen.size(), static_cast<size_t>(n));
  }
}
