// Reader, Dataset and StackedDataset: several files, DataLoaders, batches,
// collation, fork and read-only storage.
#include <lmdb.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <set>

#include "test_util.h"

using namespace torch_lmdb;
using torch_lmdb_test::make_sample;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {
// Files "f0", "f1", ... of tmp holding `sizes` samples each, numbered on from
// one file to the next (as one dataset of all of them reads them); their paths.
std::vector<std::string> write_files(const TempDir& tmp, std::initializer_list<int64_t> sizes) {
  std::vector<std::string> paths;
  int64_t first = 0;
  for (int64_t n : sizes) {
    paths.push_back(tmp.sub("f" + std::to_string(paths.size())));
    write_dataset(paths.back(), n, first);
    first += n;
  }
  return paths;
}
}  // namespace

TEST(Dataset, SeveralFilesFormOneDataset) {
  TempDir tmp;
  Dataset ds(write_files(tmp, {5, 0, 7}));
  ASSERT_EQ(ds.size().value(), 12u);
  for (size_t i = 0; i < 12; ++i) {
    auto s = ds.get(i);
    EXPECT_EQ(s["index"].item<int64_t>(), static_cast<int64_t>(i));
    EXPECT_TRUE(torch::equal(s["x"], make_sample(i)["x"]));
  }
  EXPECT_EQ(ds.reader().file_sizes(), (std::vector<size_t>{5, 0, 7}));
  EXPECT_THROW(ds.get(12), c10::IndexError);
}

// Braced lists, one path and a vector all select the paths they name (a
// braced list of one path was ambiguous between the vector, string and Reader
// constructors).
TEST(Dataset, ConstructorsTakeBracedListsOnePathOrAVector) {
  TempDir tmp;
  const std::vector<std::string> files = write_files(tmp, {3, 4});
  const std::string& first = files[0];
  EXPECT_EQ(Dataset({files[0], files[1]}).size().value(), 7u);
  EXPECT_EQ(Dataset({first}).size().value(), 3u);
  EXPECT_EQ(Dataset(first).size().value(), 3u);
  EXPECT_EQ(Dataset(first.c_str()).size().value(), 3u);
  EXPECT_EQ(Dataset({first.c_str()}).size().value(), 3u);
  EXPECT_EQ(Dataset(files).size().value(), 7u);
  EXPECT_EQ(Dataset({files[1]}, ReaderOptions{}).size().value(), 4u);
  EXPECT_EQ(Dataset(Reader({files[0], files[1]})).size().value(), 7u);
  EXPECT_EQ(StackedDataset({first}).size().value(), 3u);
  EXPECT_EQ(StackedDataset({files[0], files[1]}).size().value(), 7u);
  EXPECT_EQ(StackedDataset(first).size().value(), 3u);
  EXPECT_EQ(Reader({first}).size(), 3u);
  EXPECT_EQ(Reader({first, files[1]}).paths(), files);
  EXPECT_EQ(Reader(first).size(), 3u);
}

class DataLoaderWorkers : public ::testing::TestWithParam<int> {};

TEST_P(DataLoaderWorkers, RandomSamplerSeesEveryIndexOnce) {
  TempDir tmp;
  const int64_t n = 1000;
  const std::vector<std::string> files = write_files(tmp, {400, 600});
  Dataset ds(files);
  auto loader = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
      ds.map(Stack()), torch::data::DataLoaderOptions().batch_size(64).workers(GetParam()));
  std::vector<int> seen(n, 0);
  for (auto& batch : *loader) {
    auto idx = batch["index"];
    ASSERT_EQ(batch["x"].size(1), 16);
    for (int64_t j = 0; j < idx.size(0); ++j) {
      const int64_t i = idx[j].item<int64_t>();
      ++seen[i];
      EXPECT_TRUE(torch::equal(batch["x"][j], make_sample(i)["x"]));
    }
  }
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i], 1) << "index " << i;

  // The stacked fast path through the same loader.
  StackedDataset sds(files);
  auto fast = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
      sds, torch::data::DataLoaderOptions().batch_size(64).workers(GetParam()));
  std::vector<int> seen2(n, 0);
  for (auto& batch : *fast) {
    auto idx = batch["index"];
    for (int64_t j = 0; j < idx.size(0); ++j) {
      const int64_t i = idx[j].item<int64_t>();
      ++seen2[i];
      EXPECT_TRUE(torch::equal(batch["x"][j], make_sample(i)["x"]));
    }
  }
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen2[i], 1) << "index " << i;
}

INSTANTIATE_TEST_SUITE_P(Workers, DataLoaderWorkers, ::testing::Values(0, 2));

TEST(Dataset, ToExampleFeedsAnExistingTrainingLoop) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 50);
  Dataset ds(tmp.sub("a"));
  auto loader = torch::data::make_data_loader(
      ds.map(ToExample("x", "index")).map(torch::data::transforms::Stack<>()), 16);
  int64_t count = 0;
  for (auto& batch : *loader) {
    EXPECT_EQ(batch.data.size(1), 16);
    count += batch.target.size(0);
  }
  EXPECT_EQ(count, 50);
  EXPECT_THROW(ToExample("nope", "index").apply(ds.get(0)), c10::ValueError);
}

TEST(Batch, ReadBatchEqualsGetAndStack) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 40);
  Reader r(tmp.sub("a"));
  std::vector<size_t> idx{3, 17, 0, 39, 3};
  Batch b = r.read_batch(idx);
  Sample stacked = Stack().apply_batch(r.get_many(idx));
  ASSERT_EQ(b.tensors.size(), 2u);
  EXPECT_TRUE(torch::equal(b.tensors["x"], stacked["x"]));
  EXPECT_TRUE(torch::equal(b.tensors["index"], torch::tensor({3, 17, 0, 39, 3})));
}

// Runs of consecutive indices are walked with a cursor (MDB_NEXT) instead of
// searched: runs across leaf pages and file boundaries, restarts, repeats and
// descending indices read the right samples on both batch paths, and a
// sample missing inside a run is an error naming it (not its successor);
// get_many (Dataset::get_batch) too.
TEST(Batch, RunsOfConsecutiveIndices) {
  TempDir tmp;
  const std::vector<std::string> files = write_files(tmp, {300, 0, 500});
  Reader r(files);
  std::vector<size_t> all(800);
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  std::vector<size_t> mixed;
  for (size_t i = 10; i < 20; ++i) mixed.push_back(i);
  for (size_t i : {5, 6, 7, 8, 9, 9, 8, 7, 290}) mixed.push_back(i);
  for (size_t i = 291; i < 310; ++i) mixed.push_back(i);
  for (size_t i : {799, 0, 1, 2, 798, 799}) mixed.push_back(i);
  BatchOptions general;  // a caller's allocator takes the general (non fixed-shape) path
  general.allocate = [](at::IntArrayRef shape, at::ScalarType dtype) {
    return at::empty(shape, at::TensorOptions().dtype(dtype));
  };
  for (const auto* idx : {&all, &mixed}) {
    for (const BatchOptions& options : {BatchOptions{}, general}) {
      Batch b = r.read_batch(*idx, options);
      ASSERT_EQ(b.tensors["index"].size(0), static_cast<int64_t>(idx->size()));
      for (size_t j = 0; j < idx->size(); ++j) {
        const int64_t i = static_cast<int64_t>((*idx)[j]);
        ASSERT_EQ(b.tensors["index"][j].item<int64_t>(), i) << "row " << j;
        ASSERT_TRUE(torch::equal(b.tensors["x"][j], make_sample(i)["x"])) << "row " << j;
      }
    }
    std::vector<Sample> many = r.get_many(*idx);
    ASSERT_EQ(many.size(), idx->size());
    for (size_t j = 0; j < idx->size(); ++j)
      ASSERT_TRUE(torch::equal(many[j]["x"], make_sample(static_cast<int64_t>((*idx)[j]))["x"])) << "sample " << j;
  }

  // Delete sample 50 of the first file behind the writer's back (LMDB's default
  // comparator orders these keys as torch_lmdb's does).
  MDB_env* env = nullptr;
  ASSERT_EQ(mdb_env_create(&env), 0);
  ASSERT_EQ(mdb_env_set_maxdbs(env, 4), 0);
  ASSERT_EQ(mdb_env_open(env, files[0].c_str(), 0, 0644), 0);
  MDB_txn* txn = nullptr;
  MDB_dbi dbi;
  ASSERT_EQ(mdb_txn_begin(env, nullptr, 0, &txn), 0);
  ASSERT_EQ(mdb_dbi_open(txn, "samples", 0, &dbi), 0);
  unsigned char key[8];
  encode_key(50, key);
  MDB_val k{8, key};
  ASSERT_EQ(mdb_del(txn, dbi, &k, nullptr), 0);
  ASSERT_EQ(mdb_txn_commit(txn), 0);
  mdb_env_close(env);
  Reader damaged(files[0]);
  std::vector<size_t> run{45, 46, 47, 48, 49, 50, 51, 52};
  for (const BatchOptions& options : {BatchOptions{}, general}) {
    try {
      damaged.read_batch(run, options);
      FAIL() << "a batch over a missing sample was read";
    } catch (const CorruptedError& e) {
      EXPECT_NE(std::string(e.what()).find("sample index 50 is missing"), std::string::npos) << e.what();
    }
  }
  try {
    damaged.get_many(run);
    FAIL() << "samples including a missing one were read";
  } catch (const CorruptedError& e) {
    EXPECT_NE(std::string(e.what()).find("sample index 50 is missing"), std::string::npos) << e.what();
  }
  std::vector<size_t> around{47, 48, 49, 51, 52};
  EXPECT_EQ(damaged.read_batch(around).tensors["index"][3].item<int64_t>(), 51);
}

TEST(Batch, VariableLengthFieldsNeedPaddingAndGetLengths) {
  TempDir tmp;
  const std::string path = tmp.sub("v");
  {
    Writer w(path);
    for (int64_t i = 0; i < 6; ++i) {
      std::vector<Field> f{{"paths", FieldKind::Tensor, torch::full({i + 1, 4}, float(i))},
                           {"name", FieldKind::Str, torch::tensor({int64_t('a' + i)}).to(torch::kByte)}};
      w.write(f);
    }
    w.close();
  }
  Reader r(path);
  EXPECT_EQ(r.schema()[0].shape, (std::vector<int64_t>{-1, 4}));
  std::vector<size_t> idx{1, 4};
  try {
    r.read_batch(idx);
    FAIL() << "expected a shape error";
  } catch (const c10::ValueError& e) {
    const std::string what = e.what_without_backtrace();
    EXPECT_NE(what.find("field 'paths'"), std::string::npos) << what;
    // C++ users are told the C++ option, not Python's pad=True.
    EXPECT_NE(what.find("BatchOptions::pad"), std::string::npos) << what;
    EXPECT_EQ(what.find("pad=True"), std::string::npos) << what;
  }
  BatchOptions opt;
  opt.pad = true;
  opt.pad_value = -1;
  Batch b = r.read_batch(idx, opt);
  auto p = b.tensors["paths"];
  EXPECT_EQ(p.sizes(), (std::vector<int64_t>{2, 5, 4}));
  EXPECT_TRUE(torch::equal(b.tensors["paths_lengths"], torch::tensor({{2, 4}, {5, 4}})));
  EXPECT_TRUE(torch::equal(p[0].slice(0, 0, 2), torch::full({2, 4}, 1.f)));
  EXPECT_TRUE(torch::equal(p[0].slice(0, 2), torch::full({3, 4}, -1.f)));
  EXPECT_TRUE(torch::equal(p[1], torch::full({5, 4}, 4.f)));
  ASSERT_EQ(b.blobs.size(), 1u);
  EXPECT_EQ(b.blobs[0].values, (std::vector<std::string>{"b", "e"}));
  // The same through Stack on per-sample reads.
  auto samples = r.get_many(idx);
  EXPECT_THROW(Stack().apply_batch(samples), c10::ValueError);
  Sample s = Stack(true, {}, -1).apply_batch(samples);
  EXPECT_TRUE(torch::equal(s["paths"], p));
  EXPECT_TRUE(torch::equal(s["paths_lengths"], b.tensors["paths_lengths"]));
}

TEST(Reader, FieldSubset) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 3);
  ReaderOptions o;
  o.fields = {"x"};
  Reader r(tmp.sub("a"), o);
  auto s = r.get(1);
  EXPECT_EQ(s.size(), 1u);
  EXPECT_TRUE(s.contains("x"));
  o.fields = {"missing"};
  EXPECT_THROW(Reader(tmp.sub("a"), o), c10::ValueError);
}

TEST(Fork, ChildReadsADatasetItsParentOpened) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 200);
  Dataset ds(tmp.sub("a"));
  // The parent reads first, so it holds an env and pooled read txns.
  for (size_t i = 0; i < 10; ++i) ASSERT_EQ(ds.get(i)["index"].item<int64_t>(), int64_t(i));
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int bad = 0;
    try {
      for (size_t i = 0; i < 200; ++i) {
        auto s = ds.get(i);
        if (s["index"].item<int64_t>() != int64_t(i) || !torch::equal(s["x"], make_sample(i)["x"])) ++bad;
      }
      std::vector<size_t> idx{5, 150};
      if (ds.reader().read_batch(idx).tensors["index"][1].item<int64_t>() != 150) ++bad;
    } catch (...) {
      bad = 100;
    }
    _exit(bad == 0 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child crashed, status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // The parent's handles still work after the child is gone.
  EXPECT_EQ(ds.get(199)["index"].item<int64_t>(), 199);
}

TEST(Env, SamePathSharesOneEnvPerProcess) {
  TempDir tmp;
  write_dataset(tmp.sub("a"), 3);
  Reader r1(tmp.sub("a"));
  Reader r2(tmp.sub("a") + "/");
  EnvOptions o;
  auto e1 = Env::open(tmp.sub("a"), o);
  auto e2 = Env::open(tmp.sub("a/"), o);
  EXPECT_EQ(e1.get(), e2.get());
  // A writer shares the environment of the readers of its path.
  {
    Writer w(tmp.sub("a"), WriterOptions{/*append=*/true});
    EXPECT_EQ(w.size(), 3u);
  }
  // The shared environment keeps the readahead it was opened with: asking
  // for the other one is said, not silently ignored.
  std::vector<std::string> warnings;
  o.warn = [&](const std::string& m) { warnings.push_back(m); };
  EXPECT_EQ(Env::open(tmp.sub("a"), o).get(), e1.get());
  EXPECT_TRUE(warnings.empty());
  o.os_readahead = true;
  EXPECT_EQ(Env::open(tmp.sub("a"), o).get(), e1.get());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("already open in this process with readahead off"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find(tmp.sub("a")), std::string::npos) << warnings[0];
}

TEST(Env, ReadOnlyDirectoryFallsBackToNoLock) {
  // Under /tmp: the unprivileged child must be able to traverse to it.
  setenv("TORCH_LMDB_TEST_TMP", "/tmp", 1);
  TempDir tmp;
  const std::string path = tmp.sub("ro");
  write_dataset(path, 20);
  ASSERT_EQ(unlink((path + "/lock.mdb").c_str()), 0);
  ASSERT_EQ(unlink((path + "/writer.lock").c_str()), 0);
  ASSERT_EQ(chmod(path.c_str(), 0555), 0);
  ASSERT_EQ(chmod(tmp.path().c_str(), 0755), 0);
  // Root ignores directory permissions: read as an unprivileged user.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(10);
    int code = 0;
    std::vector<std::string> warnings;
    ReaderOptions o;
    o.warn = [&](const std::string& m) { warnings.push_back(m); };
    try {
      ReaderOptions strict = o;
      strict.lock = 1;
      Reader r(path, strict);
      code = 2;  // locking must fail here
    } catch (const LockError&) {
    } catch (...) {
      code = 3;
    }
    if (code == 0) {
      try {
        Reader r(path, o);
        if (r.size() != 20 || r.get(19)["index"].item<int64_t>() != 19) code = 4;
        if (warnings.size() != 1 || warnings[0].find("lock=False") == std::string::npos) code = 5;
        if (r.reader_count() != -1) code = 6;
      } catch (...) {
        code = 7;
      }
    }
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(Stream, ReadsEveryBatchInOrderWithAnyThreadCount) {
  TempDir tmp;
  write_dataset(tmp.sub("s"), 301);
  Reader reader(tmp.sub("s"));
  for (SampleOrder order : {SampleOrder::Sequential, SampleOrder::Shuffle, SampleOrder::BlockShuffle}) {
    std::vector<int64_t> seen_by_one;
    for (size_t threads : {1, 3}) {
      StreamOptions o;
      o.batch_size = 32;
      o.order = order;
      o.seed = 11;
      o.threads = threads;
      o.batches_ahead = 2;
      o.block_size = 20;
      BatchStream stream(reader, o);
      ASSERT_EQ(stream.size(), 10u);
      std::vector<int64_t> seen;
      size_t k = 0;
      while (auto batch = stream.next()) {
        const at::Tensor index = batch->tensors["index"];
        const auto want = stream.batch_indices(k++);
        ASSERT_EQ(index.size(0), static_cast<int64_t>(want.size()));
        for (int64_t j = 0; j < index.size(0); ++j) {
          EXPECT_EQ(index[j].item<int64_t>(), static_cast<int64_t>(want[j]));
          EXPECT_TRUE(torch::equal(batch->tensors["x"][j], make_sample(want[j])["x"]));
          seen.push_back(index[j].item<int64_t>());
        }
      }
      EXPECT_FALSE(stream.next().has_value());
      std::vector<int64_t> sorted = seen;
      std::sort(sorted.begin(), sorted.end());
      for (int64_t i = 0; i < 301; ++i) ASSERT_EQ(sorted[i], i);
      EXPECT_EQ(std::is_sorted(seen.begin(), seen.end()), order == SampleOrder::Sequential);
      if (threads == 1) seen_by_one = seen;
      else EXPECT_EQ(seen, seen_by_one);  // the order depends on the seed alone
    }
  }
  // A stream dropped mid-epoch stops its threads (the test would hang otherwise).
  for (int i = 0; i < 50; ++i) {
    StreamOptions o;
    o.batch_size = 4;
    o.threads = 2;
    BatchStream stream(reader, o);
    ASSERT_TRUE(stream.next().has_value());
  }
  EXPECT_THROW(BatchStream(reader, StreamOptions{0}), c10::ValueError);
}
