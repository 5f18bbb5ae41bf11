// Threads sharing torch_lmdb objects. Suite names contain "Concurrent" so
// that `make test-tsan` (ThreadSanitizer) runs exactly these; they also run
// in the ordinary and ASan/UBSan ctest runs.
#include <torch/types.h>

#include <atomic>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

using namespace torch_lmdb;
using torch_lmdb_test::make_sample;
using torch_lmdb_test::TempDir;
using torch_lmdb_test::write_dataset;

namespace {

// Runs body(t) on `n` threads and joins them.
template <class F>
void on_threads(size_t n, F body) {
  std::vector<std::thread> threads;
  for (size_t t = 0; t < n; ++t) threads.emplace_back(body, t);
  for (auto& th : threads) th.join();
}

// Checks that row j of `batch` is sample indices[j] of the standard dataset;
// returns the number of mismatches (gtest assertions are thread-safe, but a
// count keeps the failure output short).
size_t batch_mismatches(const Batch& batch, const std::vector<size_t>& indices, int64_t width = 16) {
  size_t bad = 0;
  const at::Tensor index = batch.tensors["index"];
  const at::Tensor x = batch.tensors["x"];
  if (index.size(0) != static_cast<int64_t>(indices.size())) return indices.size() + 1;
  for (size_t j = 0; j < indices.size(); ++j) {
    const Sample want = make_sample(static_cast<int64_t>(indices[j]), width);
    if (index[j].item<int64_t>() != static_cast<int64_t>(indices[j]) || !torch::equal(x[j], want["x"])) ++bad;
  }
  return bad;
}

}  // namespace

TEST(ConcurrentReader, ManyThreadsReadBatchesAndSamplesThroughOneReader) {
  TempDir tmp;
  write_dataset(tmp.sub("r"), 257);
  const Reader reader(tmp.sub("r"));
  std::atomic<size_t> mismatches{0}, reads{0};
  on_threads(6, [&](size_t t) {
    std::mt19937_64 rng(t);
    const Reader copy = reader;  // copies share the environment (odd threads use one)
    const Reader& r = (t % 2) ? copy : reader;
    for (int round = 0; round < 30; ++round) {
      std::vector<size_t> indices(1 + rng() % 24);
      for (auto& i : indices) i = rng() % 257;
      if (round % 3 == 0) {  // a run of consecutive indices (the cursor path)
        const size_t first = rng() % (257 - indices.size());
        for (size_t j = 0; j < indices.size(); ++j) indices[j] = first + j;
      }
      mismatches += batch_mismatches(r.read_batch(indices), indices);
      const size_t i = rng() % 257;
      const Sample s = r.get(i);
      if (s["index"].item<int64_t>() != static_cast<int64_t>(i) || !torch::equal(s["x"], make_sample(i)["x"]))
        ++mismatches;
      reads += indices.size() + 1;
    }
  });
  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_GT(reads.load(), 6u * 30u);
}

TEST(ConcurrentStream, SeveralReaderThreadsYieldEveryBatchInOrder) {
  TempDir tmp;
  write_dataset(tmp.sub("s"), 203);
  const Reader reader(tmp.sub("s"));
  StreamOptions o;
  o.batch_size = 8;
  o.order = SampleOrder::Shuffle;
  o.seed = 5;
  o.threads = 4;
  o.batches_ahead = 3;
  BatchStream stream(reader, o);
  ASSERT_EQ(stream.size(), 26u);
  size_t k = 0, mismatches = 0;
  std::vector<int> seen(203, 0);
  while (auto batch = stream.next()) {
    const auto want = stream.batch_indices(k++);
    mismatches += batch_mismatches(*batch, want);
    for (size_t i : want) ++seen[i];
  }
  EXPECT_EQ(k, 26u);
  EXPECT_EQ(mismatches, 0u);
  for (size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i], 1) << "sample " << i;
  // Streams dropped mid-epoch while their threads read.
  for (int i = 0; i < 10; ++i) {
    BatchStream early(reader, o);
    ASSERT_TRUE(early.next().has_value());
  }
}

// A Writer and Readers of the same path in one process: reader threads open
// the growing database again and again and read every sample they see while
// the writer commits and grows its map (64 KiB at the start). Needs the env
// sharing of the "Environments, revised" design (a remap only while no read
// transaction of the process is live).
TEST(ConcurrentWriterReader, ReaderThreadsReadWhileTheWriterCommitsAndGrowsTheMap) {
  TempDir tmp;
  const std::string path = tmp.sub("wr");
  constexpr int64_t kWidth = 1024;  // 4 KiB samples
  constexpr size_t kSamples = 600;
  WriterOptions wo;
  wo.map_size = 64 << 10;
  wo.commit_every = 25;
  Writer writer(path, wo);
  for (int64_t i = 0; i < 25; ++i) writer.write(make_sample(i, kWidth));
  writer.flush();
  // The "incomplete database" warnings of the readers that open it while it
  // is written are expected; they go nowhere (not through glog from 3 threads).
  ReaderOptions quiet;
  quiet.warn = [](const std::string&) {};
  std::atomic<bool> done{false};
  std::atomic<size_t> mismatches{0}, rounds{0}, errors{0};
  std::string first_error;
  std::mutex error_mutex;
  std::thread reading([&] {
    on_threads(3, [&](size_t t) {
      do {  // at least one round per thread
        try {
          const Reader r(path, quiet);
          const size_t n = r.size();
          for (size_t first = t; first < n; first += 32) {
            std::vector<size_t> indices;
            for (size_t i = first; i < std::min(n, first + 32); ++i) indices.push_back(i);
            mismatches += batch_mismatches(r.read_batch(indices), indices, kWidth);
          }
          ++rounds;
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> guard(error_mutex);
          if (errors++ == 0) first_error = e.what();
        }
      } while (!done.load());
    });
  });
  for (size_t i = 25; i < kSamples; ++i) {
    writer.write(make_sample(static_cast<int64_t>(i), kWidth));
    if (i % 25 == 24) writer.flush();
  }
  writer.close();
  done = true;
  reading.join();
  EXPECT_EQ(errors.load(), 0u) << first_error;
  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_GE(rounds.load(), 3u);
  const Reader after(path);
  EXPECT_EQ(after.size(), kSamples);
  EXPECT_TRUE(after.complete());
}
