// Quick C++ read benchmark: StackedDataset (get_batch, one allocation per
// field) vs Dataset + Stack (per-sample tensors), random sampler, through
// LibTorch's make_data_loader with 0 and 2 worker threads.
//   torch_lmdb_bench_read [samples=20000] [sample_bytes=16384] [batch=256]
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

template <typename Loader>
double run(Loader& loader, size_t n) {
  for (auto& b : *loader) (void)b;  // warm-up epoch
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    auto t = std::chrono::steady_clock::now();
    for (auto& b : *loader) (void)b;
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
  }
  return n / best;
}

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::stoul(argv[1]) : 20000;
  const int64_t bytes = argc > 2 ? std::stol(argv[2]) : 16384;
  const size_t batch = argc > 3 ? std::stoul(argv[3]) : 256;
  torch::set_num_threads(1);
  const std::string path = std::filesystem::temp_directory_path() / "torch_lmdb_read_bench";
  std::filesystem::remove_all(path);
  {
    torch_lmdb::Writer w(path);
    for (size_t i = 0; i < n; ++i) {
      torch_lmdb::Sample s;
      s.insert("x", torch::randn({bytes / 4}));
      s.insert("y", torch::tensor(static_cast<int64_t>(i)));
      w.write(s);
    }
    w.close();
  }
  std::printf("%zu samples of %lld bytes, random order, batch %zu\n", n, static_cast<long long>(bytes), batch);
  std::printf("| workers | get_batch (StackedDataset) samples/s | get + Stack samples/s | ratio |\n|---|---|---|---|\n");
  for (int workers : {0, 2}) {
    auto opts = torch::data::DataLoaderOptions().batch_size(batch).workers(workers).enforce_ordering(false);
    torch_lmdb::StackedDataset stacked(path);
    auto fast = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(stacked, opts);
    const double a = run(fast, n);
    torch_lmdb::Dataset ds(path);
    auto slow = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(ds.map(torch_lmdb::Stack()), opts);
    const double b = run(slow, n);
    std::printf("| %d | %.0f | %.0f | %.2f |\n", workers, a, b, a / b);
  }
  std::filesystem::remove_all(path);
  return 0;
}
