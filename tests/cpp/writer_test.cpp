// Writer: map growth, crash consistency, modes, schema checks, metadata.
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/types.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "test_util.h"

using namespace torch_lmdb;
using torch_lmdb_test::make_sample;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

TEST(Writer, GrowsTheMapFrom64KiB) {
  TempDir tmp;
  const std::string path = tmp.sub("g");
  WriterOptions o;
  o.map_size = 64 << 10;
  o.commit_every = 50;
  size_t final_map = 0;
  {
    Writer w(path, o);
    EXPECT_EQ(w.map_size(), size_t{64} << 10);
    for (int64_t i = 0; i < 300; ++i) w.write(make_sample(i, 4096));  // 16 KiB each
    final_map = w.map_size();
    w.close();
  }
  EXPECT_GE(final_map, size_t{300} * 16384);
  Reader r(path, ReaderOptions{true});
  ASSERT_EQ(r.size(), 300u);
  EXPECT_TRUE(r.complete());
  for (size_t i = 0; i < 300; i += 37) EXPECT_TRUE(torch::equal(r.get(i)["x"], make_sample(i, 4096)["x"]));
  EXPECT_TRUE(torch::equal(r.get(299)["x"], make_sample(299, 4096)["x"]));
}

TEST(Writer, WithoutAutoGrowAFullMapRaisesMapFullErrorAgainAndKeepsTheCommittedPrefix) {
  TempDir tmp;
  const std::string path = tmp.sub("f");
  WriterOptions o;
  o.map_size = 256 << 10;
  o.commit_every = 4;
  o.auto_grow = false;
  {
    Writer w(path, o);
    int64_t written = 0;
    try {
      for (; written < 1000; ++written) w.write(make_sample(written, 4096));
      FAIL() << "expected MapFullError";
    } catch (const MapFullError& e) {
      EXPECT_NE(std::string(e.what()).find("auto_grow"), std::string::npos);
    }
    // The failed commit (on the committer thread) is raised by every later call.
    EXPECT_THROW(w.write(make_sample(written, 4096)), MapFullError);
    EXPECT_THROW(w.flush(), MapFullError);
    EXPECT_THROW(w.close(), MapFullError);
    EXPECT_TRUE(w.closed());  // closed anyway: its files and lock are released
    EXPECT_NO_THROW(w.close());
    EXPECT_EQ(w.committed() % 4, 0u);
  }  // the destructor neither throws nor commits more
  {
    // The failed close released the writer's lock: appending works again.
    WriterOptions a;
    a.append = true;
    Writer again(path, a);
    EXPECT_GT(again.size(), 0u);
    again.close();
  }
  Reader r(path, ReaderOptions{true});
  EXPECT_TRUE(r.complete());
  EXPECT_GT(r.size(), 0u);
  EXPECT_EQ(r.size() % 4, 0u);
  for (size_t i = 0; i < r.size(); ++i) EXPECT_EQ(r.get(i)["index"].item<int64_t>(), int64_t(i));
}

// A commit whose write(2)s fail half way (the process's file size limit:
// EFBIG, as a full disk gives ENOSPC) raises an error naming the file, from
// every later call, and the commits before it stay readable. The commit fails
// while its early-writeback thread runs (writer.cpp: EarlyWriteback).
TEST(Writer, ACommitThatCannotWriteRaisesAndKeepsTheCommittedPrefix) {
  TempDir tmp;
  const std::string path = tmp.sub("fsize");
  WriterOptions o;
  o.commit_every = 64;  // 64 samples of 16 KiB: ~1.3 MiB per commit
  struct rlimit unlimited {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &unlimited), 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);  // write(2) returns EFBIG instead of killing
  {
    Writer w(path, o);
    for (int64_t i = 0; i < 64; ++i) w.write(make_sample(i, 4096));
    w.flush();
    struct stat st {};
    ASSERT_EQ(::stat((path + "/data.mdb").c_str(), &st), 0);
    struct rlimit limited = unlimited;
    limited.rlim_cur = static_cast<rlim_t>(st.st_size) + (256 << 10);  // room for a fifth of a commit
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
    bool raised = false;
    try {
      for (int64_t i = 64; i < 128; ++i) w.write(make_sample(i, 4096));
      w.flush();
    } catch (const Error& e) {
      raised = true;
      EXPECT_NE(std::string(e.what()).find("mdb_txn_commit"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &unlimited), 0);
    EXPECT_TRUE(raised);
    EXPECT_THROW(w.write(make_sample(128, 4096)), Error);
    EXPECT_THROW(w.close(), Error);
    EXPECT_EQ(w.committed(), 64u);
  }
  ::signal(SIGXFSZ, old_handler);
  Reader r(path, ReaderOptions{true});
  ASSERT_EQ(r.size(), 64u);
  EXPECT_FALSE(r.complete());
  for (size_t i = 0; i < 64; ++i) EXPECT_TRUE(torch::equal(r.get(i)["x"], make_sample(int64_t(i), 4096)["x"]));
}

TEST(Writer, FlushWaitsForTheCommitterAndCountsCommittedSamples) {
  TempDir tmp;
  WriterOptions o;
  o.commit_every = 3;
  Writer w(tmp.sub("c"), o);
  for (int64_t i = 0; i < 10; ++i) w.write(make_sample(i, 1024));
  EXPECT_EQ(w.size(), 10u);
  EXPECT_LE(w.committed(), 9u);  // the tenth sample is still pending
  w.flush();
  EXPECT_EQ(w.committed(), 10u);
  w.close();
  Reader r(tmp.sub("c"), ReaderOptions{true});
  ASSERT_EQ(r.size(), 10u);
  for (size_t i = 0; i < 10; ++i) EXPECT_TRUE(torch::equal(r.get(i)["x"], make_sample(i, 1024)["x"]));
}

TEST(Writer, KilledWriterLeavesAConsistentPrefix) {
  TempDir tmp;
  const std::string path = tmp.sub("k");
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    WriterOptions o;
    o.commit_every = 7;
    o.map_size = 128 << 10;  // also grow while being killed
    Writer w(path, o);
    for (int64_t i = 0;; ++i) w.write(make_sample(i, 1024));
  }
  // Let it write and grow for a while, then kill it mid-flight.
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  size_t n = 0;
  {
    Reader r(path, ReaderOptions{/*verify=*/true});
    EXPECT_FALSE(r.complete());
    n = r.size();
    ASSERT_GT(n, 7u);
    EXPECT_EQ(n % 7, 0u);
    for (size_t i = 0; i < n; ++i) {
      auto s = r.get(i);
      ASSERT_EQ(s["index"].item<int64_t>(), int64_t(i));
      ASSERT_TRUE(torch::equal(s["x"], make_sample(i, 1024)["x"]));
    }
  }  // readers closed: a writer may take the path again
  // Appending after the crash continues at the committed count.
  {
    WriterOptions o;
    o.append = true;
    Writer w(path, o);
    EXPECT_EQ(w.write(make_sample(n, 1024)), n);
    w.close();
  }
  Reader again(path);
  EXPECT_TRUE(again.complete());
  EXPECT_EQ(again.size(), n + 1);
}

TEST(Writer, ModesAndOneWriterAtATime) {
  TempDir tmp;
  const std::string path = tmp.sub("m");
  write_dataset(path, 5);
  EXPECT_THROW(Writer{path}, InvalidDatabaseError);  // "w" never overwrites data
  WriterOptions append;
  append.append = true;
  {
    Writer w(path, append);
    EXPECT_EQ(w.size(), 5u);
    EXPECT_THROW(Writer(path, append), LockError);
    EXPECT_EQ(w.write(make_sample(5)), 5u);
    EXPECT_EQ(w.write(make_sample(6)), 6u);
    w.close();
    EXPECT_TRUE(w.closed());
  }
  Reader r(path);
  ASSERT_EQ(r.size(), 7u);
  EXPECT_EQ(r.get(6)["index"].item<int64_t>(), 6);
}

TEST(Writer, SchemaIsEnforcedWithTheFieldAndIndexNamed) {
  TempDir tmp;
  Writer w(tmp.sub("s"));
  w.write(make_sample(0));
  Sample wrong_dtype;
  wrong_dtype.insert("index", torch::tensor(1));
  wrong_dtype.insert("x", torch::zeros({16}, torch::kDouble));
  try {
    w.write(wrong_dtype);
    FAIL();
  } catch (const c10::TypeError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("field 'x' of sample 1"), std::string::npos) << m;
  }
  Sample missing;
  missing.insert("index", torch::tensor(1));
  missing.insert("y", torch::zeros({16}));
  EXPECT_THROW(w.write(missing), c10::ValueError);
  // Same fields in another order are accepted and stored in schema order.
  Sample reordered;
  reordered.insert("x", torch::ones({3}));
  reordered.insert("index", torch::tensor(int64_t{1}));
  EXPECT_EQ(w.write(reordered), 1u);
  w.close();
  Reader r(tmp.sub("s"));
  EXPECT_EQ(r.schema()[1].shape, (std::vector<int64_t>{-1}));
  EXPECT_EQ(r.get(1).keys(), (std::vector<std::string>{"index", "x"}));
}

TEST(Writer, MetadataDescribesTheDatabase) {
  TempDir tmp;
  WriterOptions o;
  o.user_json = R"({"source": "unit test", "n": 3})";
  write_dataset(tmp.sub("meta"), 4, 0, o);
  Reader r(tmp.sub("meta"));
  const std::string m = r.metadata_json();
  for (const char* key : {"\"format\":\"torch_lmdb\"", "\"format_version\":2", "\"num_samples\":4",
                          "\"complete\":true", "\"checksum\":\"xxh3_64\"", "\"byte_order\":\"little\"",
                          "\"created_with\"", "\"source\":\"unit test\"", "\"dtype\":\"float32\""})
    EXPECT_NE(m.find(key), std::string::npos) << key << " not in " << m;
  EXPECT_THROW(Writer(tmp.sub("bad"), WriterOptions{false, 0, 0, 0, true, true, "[1]"}), c10::ValueError);
}

TEST(Writer, ForkedChildCannotUseTheParentsWriter) {
  TempDir tmp;
  Writer w(tmp.sub("p"));
  w.write(make_sample(0));
  const pid_t pid = fork();
  if (pid == 0) {
    try {
      w.write(make_sample(1));
    } catch (const c10::Error&) {
      _exit(0);
    }
    _exit(1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  w.close();
  EXPECT_EQ(Reader(tmp.sub("p")).size(), 1u);
}
