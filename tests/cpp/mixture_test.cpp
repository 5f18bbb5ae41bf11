// Mixtures (mixture.h) and selections (selection.h).
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <set>
#include <string>
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
    const MixtureOrder m(three(stratified, 150000), 5, 2);
    const Located whole = locate(m, 0, m.size());
    std::mt19937_64 rng(1);
    size_t at = 0;
    // A fresh order (nothing cached) read in uneven pieces, last piece first.
    const MixtureOrder fresh(three(stratified, 150000), 5, 2);
    std::vector<std::pair<size_t, size_t>> pieces;
    while (at < m.size()) {
      const size_t len = std::min<size_t>(m.size() - at, 1 + rng() % 70000);
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

TEST(Mixture, CursorsAreTheCountsOfEarlierPositions) {
  for (bool stratified : {false, true}) {
    const MixtureOrder m(three(stratified, 200000), 9, 0);
    const Located whole = locate(m, 0, m.size());
    std::vector<uint64_t> count(3, 0);
    for (size_t p = 0; p <= m.size(); ++p) {
      if (p % 4099 == 0 || p % kRandomChunk == 0 || p % 96 == 0 || p == m.size()) {
        const MixtureOrder fresh(three(stratified, 200000), 9, 0);  // the closed form / table from scratch
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
