// Mixtures (mixture.h) and selections (selection.h).
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

using namespace torch_lmdb;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {

MixtureOptions three(bool stratified, size_t epoch_size = 0) {
  MixtureOptions o;
  o.names = {"sim", "measured", "scene"};
  o.sizes = {1000, 300, 77};
  o.weights = {0.5, 0.3, 0.2};
  o.epoch_size = epoch_size;
  o.stratified = stratified;
  o.block_size = 96;
  return o;
}

struct Located {
  std::vector<int64_t> source, sample;
};

Located locate(const MixtureOrder& m, size_t first, size_t count) {
  Located out{std::vector<int64_t>(count), std::vector<int64_t>(count)};
  m.locate(first, count, out.source.data(), out.sample.data());
  return out;
}

}  // namespace

TEST(Mixture, PermuteIsABijection) {
  for (uint64_t n : {1ull, 2ull, 7ull, 1000ull, 4097ull}) {
    std::set<uint64_t> seen;
    for (uint64_t x = 0; x < n; ++x) {
      const uint64_t y = permute(n, 42, x);
      ASSERT_LT(y, n);
      seen.insert(y);
    }
    EXPECT_EQ(seen.size(), n);
  }
  EXPECT_NE(permute(1000, 1, 3), permute(1000, 2, 3));  // keyed
}

TEST(Mixture, AnySplitOfPositionsGivesTheSameStream) {
  for (bool stratified : {false, true}) {
    const MixtureOrder m(three(stratified, 3 * kRandomChunk - 5), 5, 2);  // chunks of both modes
    const Located whole = locate(m, 0, m.size());
    std::mt19937_64 rng(1);
    size_t at = 0;
    // A fresh order (nothing cached) read in uneven pieces, last piece first.
    const MixtureOrder fresh(three(stratified, 3 * kRandomChunk - 5), 5, 2);
    std::vector<std::pair<size_t, size_t>> pieces;
    while (at < m.size()) {
      const size_t len = std::min<size_t>(m.size() - at, 1 + rng() % 100000);
      pieces.emplace_back(at, len);
      at += len;
    }
    std::reverse(pieces.begin(), pieces.end());
    for (auto [first, len] : pieces) {
      const Located part = locate(fresh, first, len);
      ASSERT_TRUE(std::equal(part.source.begin(), part.source.end(), whole.source.begin() + first));
      ASSERT_TRUE(std::equal(part.sample.begin(), part.sample.end(), whole.sample.begin() + first));
    }
  }
}

// mixture.h: locate() and cursors() from many threads at once, on one order and on
// copies of it (which share the random mode's prefix table), while the table grows.
TEST(MixtureConcurrent, ThreadsLocateAndCountThroughOneSharedOrder) {
  for (bool stratified : {false, true}) {
    const size_t n = 6 * kRandomChunk + 17;
    const MixtureOrder reference(three(stratified, n), 4, 1);
    const Located whole = locate(reference, 0, n);
    const MixtureOrder shared(three(stratified, n), 4, 1);  // nothing cached yet
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t, copy = shared] {
        const MixtureOrder& m = t % 2 ? copy : shared;
        for (size_t k = 7; k-- > 0;) {  // far chunks first: the table grows by several at once
          const size_t first = (k * (n / 7) + t * 4099) % (n - 1000);
          const size_t len = 1000;
          const Located part = locate(m, first, len);
          if (!std::equal(part.source.begin(), part.source.end(), whole.source.begin() + first) ||
              !std::equal(part.sample.begin(), part.sample.end(), whole.sample.begin() + first))
            ++wrong;
          const std::vector<uint64_t> at = m.cursors(first);
          uint64_t total = 0;
          for (uint64_t c : at) total += c;
          if (total != first || at != reference.cursors(first)) ++wrong;
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(wrong.load(), 0) << (stratified ? "stratified" : "random");
  }
}

TEST(Mixture, CursorsAreTheCountsOfEarlierPositions) {
  for (bool stratified : {false, true}) {
    const size_t n = 2 * kRandomChunk + 1000;
    const MixtureOrder m(three(stratified, n), 9, 0);
    const Located whole = locate(m, 0, m.size());
    std::vector<uint64_t> count(3, 0);
    for (size_t p = 0; p <= m.size(); ++p) {
      if (p % 7919 == 0 || p % kRandomChunk <= 1 || (p % 96 == 0 && p < 5000) || p == m.size()) {
        const MixtureOrder fresh(three(stratified, n), 9, 0);  // the closed form / table from scratch
        ASSERT_EQ(fresh.cursors(p), count) << "position " << p;
      }
      if (p < m.size()) ++count[whole.source[p]];
    }
  }
}

TEST(Mixture, EachSourceIsReadInItsOwnPermutationThenANewOne) {
  const MixtureOrder m(three(false, 20000), 3, 1);
  const Located whole = locate(m, 0, m.size());
  const std::vector<size_t> sizes = {1000, 300, 77};
  for (int64_t s = 0; s < 3; ++s) {
    std::vector<int64_t> seq;
    for (size_t p = 0; p < whole.source.size(); ++p)
      if (whole.source[p] == s) seq.push_back(whole.sample[p]);
    ASSERT_GE(seq.size(), 2 * sizes[s]);
    for (size_t round = 0; round < 2; ++round) {
      std::set<int64_t> one(seq.begin() + round * sizes[s], seq.begin() + (round + 1) * sizes[s]);
      EXPECT_EQ(one.size(), sizes[s]);
      EXPECT_EQ(*one.rbegin(), static_cast<int64_t>(sizes[s]) - 1);
    }
    EXPECT_FALSE(std::equal(seq.begin(), seq.begin() + sizes[s], seq.begin() + sizes[s]));  // a new permutation
  }
  // A source's permutation does not depend on the weights nor on the other sources.
  MixtureOptions other = three(false, 20000);
  other.weights = {0.1, 0.1, 0.8};
  other.names = {"other", "measured", "x"};
  const Located changed = locate(MixtureOrder(other, 3, 1), 0, 20000);
  std::vector<int64_t> a, b;
  for (size_t p = 0; p < 20000; ++p) {
    if (whole.source[p] == 1 && a.size() < 300) a.push_back(whole.sample[p]);
    if (changed.source[p] == 1 && b.size() < 300) b.push_back(changed.sample[p]);
  }
  EXPECT_EQ(a, b);
}

TEST(Mixture, StratifiedBlocksHoldFloorOrCeilOfEachSource) {
  const MixtureOrder m(three(true, 96 * 500 + 17), 11, 4);
  const Located whole = locate(m, 0, m.size());
  const std::vector<double> w = {0.5, 0.3, 0.2};
  for (size_t b = 0; b + 1 <= m.size() / 96; ++b) {
    std::vector<int64_t> c(3, 0);
    for (size_t j = 0; j < 96; ++j) ++c[whole.source[b * 96 + j]];
    for (size_t s = 0; s < 3; ++s) {
      EXPECT_GE(c[s], std::floor(w[s] * 96)) << "block " << b;
      EXPECT_LE(c[s], std::ceil(w[s] * 96)) << "block " << b;
    }
  }
}

TEST(Mixture, RandomDrawsFollowTheWeights) {
  MixtureOptions o = three(false, 1000000);
  const MixtureOrder m(o, 123, 0);
  const Located whole = locate(m, 0, m.size());
  std::vector<double> count(3, 0);
  for (int64_t s : whole.source) ++count[s];
  double chi2 = 0;
  for (size_t s = 0; s < 3; ++s) chi2 += std::pow(count[s] - 1e6 * o.weights[s], 2) / (1e6 * o.weights[s]);
  EXPECT_LT(chi2, 9.21);  // chi-square, 2 degrees of freedom, 1 %
}

TEST(Mixture, ChecksOptionsAndPositions) {
  MixtureOptions o = three(false);
  o.weights = {1, 2};
  EXPECT_THROW(MixtureOrder(o, 0, 0), c10::ValueError);
  o = three(false);
  o.sizes[2] = 0;
  EXPECT_THROW(MixtureOrder(o, 0, 0), c10::ValueError);
  o = three(false);
  o.names[1] = "sim";
  EXPECT_THROW(MixtureOrder(o, 0, 0), c10::ValueError);
  const MixtureOrder m(three(false), 0, 0);
  EXPECT_EQ(m.size(), 1377u);
  std::vector<int64_t> a(2), b(2);
  EXPECT_THROW(m.locate(1376, 2, a.data(), b.data()), c10::IndexError);
}

TEST(Selection, StoredSelectionRoundTripsAndIsCheckedAgainstTheData) {
  TempDir dir;
  const std::string db = dir.sub("a.lmdb");
  write_dataset(db, 50);
  const Reader reader(db);
  const uint64_t id = data_identity(reader);
  const Selection sel({40, 3, 7}, 50);
  const std::string file = selection_path(db, "keep");
  save_selection(file, sel, 50, id);
  EXPECT_EQ(list_selections(db), std::vector<std::string>{"keep"});
  EXPECT_EQ(load_selection(file, 50, id).indices(), (std::vector<uint64_t>{40, 3, 7}));
  EXPECT_THROW(load_selection(file, 51, id), InvalidDatabaseError);
  EXPECT_THROW(load_selection(file, 50, id + 1), InvalidDatabaseError);
  EXPECT_THROW(load_selection(selection_path(db, "missing"), 50, id), NotFoundError);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(44);
    f.put('\x09');  // an index byte
  }
  EXPECT_THROW(load_selection(file, 50, id), CorruptedError);
  EXPECT_THROW(selection_path(db, "../x"), c10::ValueError);
  EXPECT_THROW(Selection({1, 1}, 50), c10::ValueError);
  EXPECT_EQ(Selection({1, 1}, 50, true).size(), 2u);
  EXPECT_THROW(Selection({50}, 50), c10::IndexError);
  // Appending changes the identity.
  WriterOptions append;
  append.append = true;
  write_dataset(db, 1, 50, append);
  EXPECT_NE(data_identity(Reader(db)), id);
}

TEST(Selection, StreamReadsTheSelectedSamplesAcrossRanks) {
  TempDir dir;
  const std::string db = dir.sub("a.lmdb");
  write_dataset(db, 100);
  std::vector<uint64_t> chosen;
  for (uint64_t i = 0; i < 100; i += 3) chosen.push_back(i);
  std::multiset<int64_t> got;
  for (size_t rank = 0; rank < 3; ++rank) {
    StreamOptions o;
    o.batch_size = 4;
    o.seed = 2;
    o.rank = rank;
    o.world_size = 3;
    o.selection = Selection(chosen, 100);
    BatchStream s(Reader(db), o);
    EXPECT_EQ(s.num_samples(), chosen.size());
    while (auto b = s.next()) {
      const at::Tensor t = b->tensors["index"];
      got.insert(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    }
  }
  EXPECT_EQ(got, std::multiset<int64_t>(chosen.begin(), chosen.end()));
}

namespace {

// Three databases (ids 0.., 1000.., 2000..) read through one Reader; source 1 through a selection.
struct ThreeSources {
  TempDir dir;
  std::vector<std::string> paths;
  MixtureSource mixture;
  ThreeSources() {
    const std::vector<int64_t> sizes = {120, 45, 31};
    for (int64_t k = 0; k < 3; ++k) {
      paths.push_back(dir.sub("s" + std::to_string(k)));
      write_dataset(paths.back(), sizes[k], 1000 * k);
    }
    mixture.rule.names = {"sim", "measured", "scene"};
    mixture.rule.weights = {0.5, 0.3, 0.2};
    mixture.rule.epoch_size = 600;
    std::vector<uint64_t> odd;
    for (uint64_t i = 1; i < 45; i += 2) odd.push_back(i);
    mixture.rule.sizes = {120, odd.size(), 31};
    mixture.offsets = {0, 120, 165};
    mixture.selections = {std::nullopt, Selection(odd, 45), std::nullopt};
  }
  // The global stream read by `world` ranks from `start`, each step's rank batches in rank order.
  std::vector<std::pair<int64_t, int64_t>> read(size_t world, size_t start = 0, size_t batch = 7,
                                               size_t steps = SIZE_MAX) const {
    std::vector<std::vector<Batch>> per_rank(world);
    for (size_t r = 0; r < world; ++r) {
      StreamOptions o;
      o.batch_size = batch;
      o.seed = 11;
      o.rank = r;
      o.world_size = world;
      o.start = start;
      o.threads = 2;
      o.mixture = mixture;
      BatchStream s(Reader(paths), o);
      while (per_rank[r].size() < steps) {
        auto b = s.next();
        if (!b) break;
        per_rank[r].push_back(std::move(*b));
      }
    }
    std::vector<std::pair<int64_t, int64_t>> out;
    for (size_t k = 0; k < per_rank[0].size(); ++k)
      for (size_t r = 0; r < world; ++r) {
        const at::Tensor src = per_rank[r][k].tensors["source"], id = per_rank[r][k].tensors["index"];
        for (int64_t j = 0; j < id.numel(); ++j) out.emplace_back(src[j].item<int64_t>(), id[j].item<int64_t>());
      }
    return out;
  }
};

}  // namespace

TEST(MixtureStream, GlobalStreamIsTheRuleForEveryWorldSizeAndAcrossARankChange) {
  ThreeSources t;
  const auto reference = t.read(1);
  ASSERT_EQ(reference.size(), 600u);
  MixtureOptions rule = t.mixture.rule;
  rule.shuffle = true;
  const Located want = locate(MixtureOrder(rule, 11, 0), 0, 600);
  for (size_t p = 0; p < 600; ++p) {
    const int64_t s = want.source[p], j = want.sample[p];
    ASSERT_EQ(reference[p].first, s);
    ASSERT_EQ(reference[p].second, 1000 * s + (s == 1 ? 2 * j + 1 : j));  // source 1: its odd samples
  }
  for (size_t world : {2, 3, 4, 6}) EXPECT_EQ(t.read(world), reference) << world;
  // Five steps on 4 ranks, then the rest on 3 ranks from the global position.
  auto first = t.read(4, 0, 7, 5);
  const auto rest = t.read(3, 5 * 28);
  first.insert(first.end(), rest.begin(), rest.end());
  EXPECT_EQ(first, reference);
}

TEST(MixtureStream, LoaderResumesAndChecksTheMixture) {
  ThreeSources t;
  LoaderOptions o;
  o.batch_size = 7;
  o.seed = 11;
  o.threads = 2;
  o.mixture = t.mixture;
  Loader loader(Reader(t.paths), o);
  std::vector<int64_t> ids;
  size_t taken = 0;
  LoaderState state;
  for (auto& b : loader) {
    if (++taken == 3) state = loader.state();
    const at::Tensor id = b.tensors["index"];
    ids.insert(ids.end(), id.data_ptr<int64_t>(), id.data_ptr<int64_t>() + id.numel());
  }
  EXPECT_EQ(ids.size(), 600u);
  EXPECT_EQ(state.num_samples, 600u);
  EXPECT_EQ(state.position, 21u);
  Loader again(Reader(t.paths), o);
  again.load_state(state);
  std::vector<int64_t> rest;
  for (auto& b : again) {
    const at::Tensor id = b.tensors["index"];
    rest.insert(rest.end(), id.data_ptr<int64_t>(), id.data_ptr<int64_t>() + id.numel());
  }
  EXPECT_EQ(rest, std::vector<int64_t>(ids.begin() + 21, ids.end()));
  LoaderOptions block = o;
  block.block_size = 8;
  EXPECT_THROW(Loader(Reader(t.paths), block).begin(), c10::ValueError);
  MixtureSource past = t.mixture;
  past.offsets[2] = 170;  // 170 + 31 > 196 samples
  StreamOptions so;
  so.mixture = past;
  EXPECT_THROW(BatchStream(Reader(t.paths), so), c10::IndexError);
}
