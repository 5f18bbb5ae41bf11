// One environment per file and process, shared by readers and the writer;
// map resizes that never race a read; damaged files; the writer's lock.
// Tests named *Concurrent* also run under ThreadSanitizer (make test-tsan).
#include <lmdb.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>
#include <typeindex>
#include <typeinfo>
#include <vector>

#include "test_util.h"
#include "torch_lmdb/errors.h"

using namespace torch_lmdb;
using torch_lmdb_test::make_sample;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {

// Checks a batch of the standard dataset: sample i holds index i, x = arange + i.
void expect_batch(const Batch& b, const std::vector<size_t>& idx, int64_t width) {
  const at::Tensor& index = *b.tensors.find("index");
  const at::Tensor& x = *b.tensors.find("x");
  ASSERT_EQ(index.size(0), static_cast<int64_t>(idx.size()));
  for (size_t j = 0; j < idx.size(); ++j) {
    ASSERT_EQ(index[j].item<int64_t>(), static_cast<int64_t>(idx[j]));
    const at::Tensor want = torch::arange(width, torch::kFloat) + static_cast<float>(idx[j]);
    ASSERT_TRUE(torch::equal(x[j], want)) << "sample " << idx[j] << ": x[0] = " << x[j][0].item<float>()
                                          << ", x[-1] = " << x[j][width - 1].item<float>()
                                          << ", wrong elements: " << (x[j] != want).sum().item<int64_t>();
  }
}

// Reads random batches of `reader` (refreshed every few rounds) on `threads`
// threads until `stop`; returns the number of batches read. Failures are
// gtest failures on the reading threads.
size_t read_until(const Reader& start, std::atomic<bool>& stop, int threads, int64_t width) {
  std::atomic<size_t> batches{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      Reader r = start;
      uint64_t rng = 0x9E3779B97F4A7C15ull * (t + 1);
      for (int round = 0; !stop.load(); ++round) {
        if (round % 8 == 0) r = r.refreshed();
        const size_t n = r.size();
        if (n == 0) continue;
        std::vector<size_t> idx(16);
        for (auto& i : idx) {
          rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
          i = rng % n;
        }
        try {
          expect_batch(r.read_batch(idx), idx, width);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "thread " << t << ": " << e.what();
          return;
        }
        ++batches;
      }
    });
  }
  for (auto& th : pool) th.join();
  return batches.load();
}

// Readers of a database a writer is still appending to warn (incomplete) at
// each refresh; the tests collect nothing. (TORCH_WARN's glog calls tzset,
// which glibc serialises with a lock ThreadSanitizer cannot see.)
ReaderOptions quiet() {
  ReaderOptions o;
  o.warn = [](const std::string&) {};
  return o;
}

void write_wide(const std::string& path, int64_t n, int64_t width, const WriterOptions& o) {
  Writer w(path, o);
  for (int64_t i = 0; i < n; ++i) w.write(make_sample(i, width));
  w.close();
}

}  // namespace

TEST(EnvConcurrent, ThreadsReadWhileAnotherProcessGrowsTheMap) {
  TempDir tmp;
  const std::string path = tmp.sub("grow");
  const int64_t width = 1024;  // 4 KiB samples
  WriterOptions o;
  o.map_size = 256 << 10;
  o.commit_every = 16;
  write_wide(path, 32, width, o);
  Reader reader(path, quiet());
  const size_t map_before = reader.map_size();

  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Appends until the file is several times the readers' initial map.
    int status = 0;
    try {
      WriterOptions a = o;
      a.append = true;
      Writer w(path, a);
      for (int64_t i = 32; i < 160000 && w.map_size() < 4 * map_before; ++i) w.write(make_sample(i, width));
      w.close();
    } catch (...) {
      status = 1;
    }
    _exit(status);
  }
  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    int status = 0;
    waitpid(child, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "writer status " << status;
    stop = true;
  });
  const size_t batches = read_until(reader, stop, 3, width);
  waiter.join();
  EXPECT_GT(batches, 0u);
  const Reader after = reader.refreshed();
  EXPECT_GT(after.size(), 32u);
  EXPECT_GT(after.map_size(), map_before);  // the readers adopted the grown map
  std::vector<size_t> last{after.size() - 1};
  expect_batch(after.read_batch(last), last, width);
}

TEST(EnvConcurrent, AWriterAndReadersOfOneProcessShareTheEnvWhileTheMapGrows) {
  TempDir tmp;
  const std::string path = tmp.sub("shared");
  const int64_t width = 1024;
  WriterOptions o;
  o.map_size = 128 << 10;
  o.commit_every = 8;
  write_wide(path, 16, width, o);
  o.append = true;
  Writer w(path, o);  // opened first: the readers join its environment and its small map
  Reader reader(path, quiet());
  const size_t map_before = w.map_size();
  ASSERT_EQ(reader.map_size(), map_before);
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    try {
      for (int64_t i = 16; i < 3000; ++i) w.write(make_sample(i, width));
      w.flush();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "writer: " << e.what();
    }
    stop = true;
  });
  const size_t batches = read_until(reader, stop, 2, width);
  writer.join();
  EXPECT_GT(batches, 0u);
  EXPECT_GE(w.map_size(), 16 * map_before);  // it grew several times under the readers
  EXPECT_EQ(reader.size(), 16u);             // a Reader keeps the count it opened with
  EXPECT_EQ(reader.refreshed().size(), 3000u);
  w.close();
  EXPECT_TRUE(reader.refreshed().complete());
}

TEST(Env, AWriterJoinsTheEnvironmentOfDatasetsOpenedFirst) {
  TempDir tmp;
  const std::string path = tmp.sub("first");
  write_dataset(path, 8);
  Reader reader(path);
  WriterOptions o;
  o.append = true;
  Writer w(path, o);
  for (int64_t i = 8; i < 20; ++i) w.write(make_sample(i));
  w.flush();
  EXPECT_EQ(reader.size(), 8u);
  const Reader now = reader.refreshed();
  ASSERT_EQ(now.size(), 20u);
  std::vector<size_t> idx{0, 8, 19};
  expect_batch(now.read_batch(idx), idx, 16);
  EXPECT_FALSE(now.complete());
  w.close();
  EXPECT_TRUE(reader.refreshed().complete());
}

TEST(Env, AThreadHoldingATransactionCannotResizeItsOwnEnv) {
  TempDir tmp;
  const std::string path = tmp.sub("hold");
  write_dataset(path, 4);
  EnvOptions eo;
  auto env = Env::open(path, eo);
  ReadTxn txn = env->read_txn();
  try {
    env->set_map_size(env->map_size() * 2);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds one of its transactions"), std::string::npos) << e.what();
  }
}

TEST(EnvConcurrent, OpeningAndClosingOneFileFromManyThreadsKeepsOneEnv) {
  TempDir tmp;
  const std::string path = tmp.sub("reopen");
  write_dataset(path, 64);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int k = 0; k < 200; ++k) {
        try {
          Reader r(path);
          std::vector<size_t> idx{static_cast<size_t>(k % 64)};
          expect_batch(r.read_batch(idx), idx, 16);
        } catch (const std::exception& e) {
          ++failures;
          ADD_FAILURE() << e.what();
          return;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  // Every handle was closed: the lock file lists no reader of this process.
  Reader r(path);
  EXPECT_LE(r.reader_count(), 1);
}

TEST(Env, ATruncatedDataFileIsRefusedAtOpenNamingThePath) {
  TempDir tmp;
  const std::string path = tmp.sub("trunc");
  write_dataset(path, 200, 0, WriterOptions{});
  struct stat st {};
  ASSERT_EQ(::stat((path + "/data.mdb").c_str(), &st), 0);
  ASSERT_EQ(::truncate((path + "/data.mdb").c_str(), st.st_size - 4096), 0);
  try {
    Reader r(path);
    for (size_t i = 0; i < r.size(); ++i) r.get(i);
    FAIL() << "expected CorruptedError";
  } catch (const CorruptedError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path + "/data.mdb"), std::string::npos) << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  }
}

TEST(Writer, TwoWritersOfOneFileInOneProcessAreRefused) {
  TempDir tmp;
  const std::string path = tmp.sub("two");
  Writer a(path);
  WriterOptions o;
  o.append = true;
  EXPECT_THROW(Writer b(path, o), LockError);
  a.write(make_sample(0));
  a.close();
  Writer c(path, o);  // released by close()
  EXPECT_EQ(c.size(), 1u);
}

TEST(Writer, AForkedChildDoesNotInheritTheWritersLock) {
  TempDir tmp;
  const std::string path = tmp.sub("fork");
  int ready[2], done[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(done), 0);
  auto w = std::make_unique<Writer>(path);
  w->write(make_sample(0));
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Outlives the parent's writer; while the parent's writer lives, the
    // child cannot open one itself.
    int status = 0;
    try {
      WriterOptions o;
      o.append = true;
      Writer mine(path, o);
      status = 2;  // should have been refused
    } catch (const LockError&) {
    } catch (...) {
      status = 3;
    }
    char c = 1;
    (void)!write(ready[1], &c, 1);
    (void)!read(done[0], &c, 1);
    _exit(status);
  }
  char c;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  w->close();
  w.reset();
  WriterOptions o;
  o.append = true;
  {
    Writer again(path, o);  // the child is alive and holds no lock
    again.write(make_sample(1));
    again.close();
  }
  c = 1;
  ASSERT_EQ(write(done[1], &c, 1), 1);
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(Reader(path).size(), 2u);
}

TEST(Writer, ARejectedFirstSampleDefinesNoSchema) {
  TempDir tmp;
  const std::string path = tmp.sub("first");
  Writer w(path);
  Sample bad;
  bad.insert("a", torch::zeros({1}));
  std::vector<int64_t> shape(17, 1);
  bad.insert("deep", torch::zeros(shape));
  EXPECT_THROW(w.write(bad), c10::ValueError);
  Sample good;
  good.insert("y", torch::ones({3}));
  EXPECT_EQ(w.write(good), 0u);
  w.close();
  Reader r(path);
  ASSERT_EQ(r.schema().size(), 1u);
  EXPECT_EQ(r.schema()[0].name, "y");
  EXPECT_TRUE(torch::equal(r.get(0)["y"], torch::ones({3})));
}

TEST(Writer, ConjugateAndNegativeViewsAreStoredAsTheirValues) {
  TempDir tmp;
  const std::string path = tmp.sub("views");
  const at::Tensor z = torch::tensor({1.0, 3.0}).to(torch::kComplexFloat) +
                       torch::tensor({2.0, -4.0}).to(torch::kComplexFloat) * c10::complex<float>(0, 1);
  const at::Tensor conj = z.conj();
  const at::Tensor neg = torch::tensor({1.0, -2.0, 3.0})._neg_view();
  ASSERT_TRUE(conj.is_conj());
  ASSERT_TRUE(neg.is_neg());
  {
    Writer w(path);
    Sample s;
    s.insert("conj", conj);
    s.insert("neg", neg);
    w.write(s);
    w.close();
  }
  Reader r(path);
  const Sample got = r.get(0);
  EXPECT_TRUE(torch::equal(got.find("conj")->resolve_conj(), conj.resolve_conj()));
  EXPECT_TRUE(torch::equal(*got.find("neg"), torch::tensor({-1.0, 2.0, -3.0})));
}

// The value index (Env::value_index): one per env for the newest snapshot,
// none for an older snapshot or a table larger than asked, a new one after
// a commit, and none surviving a resize of the map.
TEST(ValueIndex, OneIndexPerSnapshotMadeAnewByACommitAndByAResize) {
  TempDir tmp;
  const std::string path = tmp.sub("index");
  write_dataset(path, 10);
  EnvOptions eo;
  auto env = Env::open(path, eo);
  std::shared_ptr<ValueIndex> first;
  {
    ReadTxn a = env->read_txn(), b = env->read_txn();
    EXPECT_EQ(env->value_index(a.get(), 9), nullptr);  // 10 values, room for 9
    EXPECT_EQ(env->value_index(a.get(), 0), nullptr);
    first = env->value_index(a.get(), 10);
    ASSERT_NE(first, nullptr);
    EXPECT_EQ(first->keys(), 10u);
    EXPECT_EQ(first->txnid(), mdb_txn_id(a.get()));
    EXPECT_EQ(env->value_index(b.get(), 1000), first);  // the same snapshot: the same index
    unsigned char key[8];
    encode_key(3, key);
    MDB_val k{8, key}, v{0, nullptr};
    ASSERT_EQ(mdb_get(a.get(), env->samples_dbi(), &k, &v), MDB_SUCCESS);
    EXPECT_EQ(first->find(3).mv_data, nullptr);
    first->store(3, v);
    EXPECT_EQ(first->find(3).mv_data, v.mv_data);
    EXPECT_EQ(first->find(3).mv_size, v.mv_size);
    EXPECT_EQ(first->find(10).mv_data, nullptr);  // past its keys
    first->store(10, v);                          // ignored
    EXPECT_EQ(first->find(10).mv_data, nullptr);
  }
  ReadTxn old = env->read_txn();  // the snapshot of 10 samples, held
  WriterOptions wo;
  wo.append = true;
  Writer w(path, wo);
  w.write(make_sample(10));
  w.flush();
  {
    ReadTxn now = env->read_txn();
    const auto second = env->value_index(now.get(), 1000);
    ASSERT_NE(second, nullptr);
    EXPECT_NE(second, first);
    EXPECT_GT(second->txnid(), first->txnid());
    EXPECT_EQ(second->keys(), 11u);
    EXPECT_EQ(second->find(3).mv_data, nullptr);  // nothing carried over from the old snapshot
    EXPECT_EQ(env->value_index(old.get(), 1000), nullptr);  // older than the index: none
  }
  w.close();
  old = ReadTxn();
  std::shared_ptr<ValueIndex> before;
  {
    ReadTxn t = env->read_txn();
    before = env->value_index(t.get(), 1000);
    ASSERT_NE(before, nullptr);
  }
  env->set_map_size(env->map_size() * 2);
  ReadTxn t = env->read_txn();
  const auto after = env->value_index(t.get(), 1000);
  ASSERT_NE(after, nullptr);
  EXPECT_EQ(after->txnid(), before->txnid());  // the same snapshot ...
  EXPECT_NE(after, before);                    // ... but the map moved: a new index
}

// A commit that rewrites a packed value (the last value's records grow) is
// read anew by batched reads, which filled the index in the older snapshot.
TEST(ValueIndex, ARewrittenPackedValueIsReadFromTheNewSnapshot) {
  TempDir tmp;
  const std::string path = tmp.sub("packed");
  WriterOptions wo;
  wo.samples_per_value = 4;
  Writer w(path, wo);
  for (int64_t i = 0; i < 2; ++i) w.write(make_sample(i));
  w.flush();
  ReaderOptions quiet;
  quiet.warn = [](const std::string&) {};
  const Reader two(path, quiet);
  ASSERT_EQ(two.size(), 2u);
  const std::vector<size_t> first{0, 1};
  for (int epoch = 0; epoch < 2; ++epoch) expect_batch(two.read_batch(first), first, 16);
  for (int64_t i = 2; i < 7; ++i) w.write(make_sample(i));
  w.flush();
  const Reader seven = two.refreshed();
  ASSERT_EQ(seven.size(), 7u);
  const std::vector<size_t> all{6, 0, 3, 1, 2, 5, 4};
  for (int epoch = 0; epoch < 2; ++epoch) expect_batch(seven.read_batch(all), all, 16);
  w.close();
}

// Batches read again in the same snapshot (the index's hits) give the same
// samples as the first read, and with value_index_bytes = 0 as well.
TEST(ValueIndex, EpochsReadTheSameSamplesWithAndWithoutTheIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("epochs");
  write_dataset(path, 300);
  for (size_t bytes : {size_t{0}, size_t{64} << 20}) {
    ReaderOptions o;
    o.value_index_bytes = bytes;
    const Reader r(path, o);
    std::mt19937_64 rng(bytes);
    for (int epoch = 0; epoch < 3; ++epoch) {
      std::vector<size_t> order(300);
      std::iota(order.begin(), order.end(), size_t{0});
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t at = 0; at < order.size(); at += 64) {
        const std::vector<size_t> idx(order.begin() + at, order.begin() + std::min(order.size(), at + 64));
        expect_batch(r.read_batch(idx), idx, 16);
      }
    }
  }
}

// Threads filling and reading one file's index at once (run under
// ThreadSanitizer by make test-tsan): every batch holds its samples.
TEST(ValueIndexConcurrent, ThreadsFillAndReadOneIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("threads");
  write_dataset(path, 200);
  const Reader reader(path);
  std::atomic<size_t> bad{0};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      const Reader own = t % 2 ? reader : Reader(path);  // one Env, so one index, either way
      for (int round = 0; round < 40; ++round) {
        std::vector<size_t> idx(1 + rng() % 48);
        for (auto& i : idx) i = rng() % 200;
        const Batch b = own.read_batch(idx);
        const at::Tensor index = b.tensors["index"], x = b.tensors["x"];
        for (size_t j = 0; j < idx.size(); ++j) {
          const at::Tensor want = torch::arange(16, torch::kFloat) + static_cast<float>(idx[j]);
          if (index[j].item<int64_t>() != static_cast<int64_t>(idx[j]) || !torch::equal(x[j], want)) ++bad;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0u);
}

// errors.cpp's one table of codes: each code throws its class, named, with its hint.
TEST(Errors, EachCodeThrowsItsClassWithItsNameAndHint) {
  auto thrown = [](int rc) -> std::pair<std::type_index, std::string> {
    try {
      torch_lmdb::detail::check_mdb(rc, "mdb_put", "/data/db", "index 7");
    } catch (const Error& e) {
      return {std::type_index(typeid(e)), e.what()};
    }
    return {std::type_index(typeid(void)), "nothing"};
  };
  EXPECT_EQ(thrown(MDB_SUCCESS).second, "nothing");
  struct Row {
    int rc;
    std::type_index cls;
    const char* name;
  };
  const Row rows[] = {
      {MDB_MAP_FULL, typeid(MapFullError), "MDB_MAP_FULL"},
      {MDB_READERS_FULL, typeid(ReadersFullError), "MDB_READERS_FULL"},
      {MDB_NOTFOUND, typeid(NotFoundError), "MDB_NOTFOUND"},
      {ENOENT, typeid(NotFoundError), "ENOENT"},
      {MDB_CORRUPTED, typeid(CorruptedError), "MDB_CORRUPTED"},
      {MDB_PAGE_NOTFOUND, typeid(CorruptedError), "MDB_PAGE_NOTFOUND"},
      {MDB_PANIC, typeid(CorruptedError), "MDB_PANIC"},
      {MDB_INVALID, typeid(InvalidDatabaseError), "MDB_INVALID"},
      {MDB_VERSION_MISMATCH, typeid(InvalidDatabaseError), "MDB_VERSION_MISMATCH"},
      {MDB_INCOMPATIBLE, typeid(InvalidDatabaseError), "MDB_INCOMPATIBLE"},
      {EACCES, typeid(LockError), "EACCES"},
      {EROFS, typeid(LockError), "EROFS"},
      {EAGAIN, typeid(LockError), "EAGAIN"},
      {ENOSPC, typeid(DiskFullError), "ENOSPC"},
      {MDB_BAD_TXN, typeid(Error), "MDB_BAD_TXN"},
      {EIO, typeid(Error), "EIO"},
      {12345, typeid(Error), "error"},
  };
  for (const Row& row : rows) {
    const auto [cls, what] = thrown(row.rc);
    EXPECT_TRUE(cls == row.cls) << row.name << ": " << what;
    EXPECT_EQ(what.rfind(std::string("mdb_put failed: ") + row.name + " (", 0), 0u) << what;
    EXPECT_NE(what.find("at '/data/db' (index 7)"), std::string::npos) << what;
  }
  EXPECT_NE(thrown(MDB_MAP_FULL).second.find("): the map is full; the Writer grows the map itself"), std::string::npos);
  EXPECT_NE(thrown(MDB_READERS_FULL).second.find("raise max_readers (default 1024)"), std::string::npos);
  EXPECT_NE(thrown(EROFS).second.find("readers fall back to lock=False on read-only storage"), std::string::npos);
  EXPECT_EQ(thrown(MDB_BAD_TXN).second.find("): "), std::string::npos) << "no hint for a code without one";
  try {
    torch_lmdb::detail::check_mdb(ENOSPC, "mdb_txn_commit", "/data/db");
  } catch (const DiskFullError& e) {
    EXPECT_EQ(e.code(), ENOSPC);
    EXPECT_EQ(e.path(), "/data/db");
  }
}
