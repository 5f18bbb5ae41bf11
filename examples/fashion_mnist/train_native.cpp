// Fashion-MNIST in native LibTorch, the same CNN trained twice side by side:
// from torch_lmdb (StackedDataset: one C++ call per batch) and from LibTorch's
// own torch::data::datasets::MNIST reader (IDX files, Stack<> collation).
//
//   train_fmnist --data DIR [--epochs 2] [--batch-size 64] [--workers 2]
//                [--limit-train N] [--limit-test N]   (train/test on the first N images only)
//
// DIR holds train.lmdb, test.lmdb and idx/ (written by convert_idx.py). First
// checks that both readers yield identical samples, then for each reader
// prints the data-loading time of one pass, per-epoch loss and test
// accuracy, and a final "RESULT {json}" line.
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

struct Options {
  std::string data;
  int epochs = 2;
  int64_t batch_size = 64;
  size_t workers = 2;
  size_t limit_train = 0, limit_test = 0;  // 0 = all
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: train_fmnist --data DIR [--epochs N] [--batch-size N] [--workers N] "
                  "[--limit-train N] [--limit-test N]\n");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument("missing value after " + arg);
    std::string value = argv[++i];
    if (arg == "--data") o.data = value;
    else if (arg == "--epochs") o.epochs = std::stoi(value);
    else if (arg == "--batch-size") o.batch_size = std::stol(value);
    else if (arg == "--workers") o.workers = std::stoul(value);
    else if (arg == "--limit-train") o.limit_train = std::stoul(value);
    else if (arg == "--limit-test") o.limit_test = std::stoul(value);
    else throw std::invalid_argument("unknown option " + arg);
  }
  if (o.data.empty()) throw std::invalid_argument("--data is required");
  return o;
}

struct NetImpl : torch::nn::Module {
  NetImpl() {
    c1 = register_module("c1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 5).padding(2)));
    c2 = register_module("c2", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 5).padding(2)));
    f1 = register_module("f1", torch::nn::Linear(32 * 7 * 7, 128));
    f2 = register_module("f2", torch::nn::Linear(128, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(c1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(c2->forward(x)), 2);
    return f2->forward(torch::relu(f1->forward(x.flatten(1))));
  }
  torch::nn::Conv2d c1{nullptr}, c2{nullptr};
  torch::nn::Linear f1{nullptr}, f2{nullptr};
};
TORCH_MODULE(Net);

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Both loaders yield (images float [B, 1, 28, 28] in [0, 1], labels int64 [B]).
struct FromLmdb {
  static std::pair<torch::Tensor, torch::Tensor> unpack(torch_lmdb::Sample& b) {
    return {b["image"].to(torch::kFloat).div_(255), b["label"]};
  }
};
struct FromMnist {
  static std::pair<torch::Tensor, torch::Tensor> unpack(torch::data::Example<>& b) { return {b.data, b.target}; }
};

struct Result {
  double load_s = 0, train_s = 0, accuracy = 0;
  std::vector<double> losses;
};

template <typename Unpack, typename TrainLoader, typename TestLoader>
Result run(const char* name, TrainLoader& train, TestLoader& test, const Options& o) {
  Result r;
  auto t0 = std::chrono::steady_clock::now();
  int64_t seen = 0;
  for (auto& b : *train) seen += Unpack::unpack(b).first.size(0);
  r.load_s = since(t0);
  std::printf("[%s] data loading: one pass over %lld images in %.2f s (%.0f images/s)\n", name,
              static_cast<long long>(seen), r.load_s, seen / r.load_s);
  torch::manual_seed(0);  // identical initial weights for both readers
  Net net;
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-3));
  auto t_train = std::chrono::steady_clock::now();
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    double total = 0;
    int64_t count = 0;
    for (auto& b : *train) {
      auto [x, y] = Unpack::unpack(b);
      auto loss = torch::cross_entropy_loss(net->forward(x), y);
      opt.zero_grad();
      loss.backward();
      opt.step();
      total += loss.template item<double>() * x.size(0);
      count += x.size(0);
    }
    r.losses.push_back(total / count);
    std::printf("[%s] epoch %d: loss %.4f\n", name, epoch + 1, r.losses.back());
    std::fflush(stdout);
  }
  r.train_s = since(t_train);
  torch::NoGradGuard no_grad;
  net->eval();
  int64_t correct = 0, total = 0;
  for (auto& b : *test) {
    auto [x, y] = Unpack::unpack(b);
    correct += net->forward(x).argmax(1).eq(y).sum().template item<int64_t>();
    total += x.size(0);
  }
  r.accuracy = static_cast<double>(correct) / total;
  std::printf("[%s] test accuracy %.4f (%lld images), training %.1f s\n", name, r.accuracy,
              static_cast<long long>(total), r.train_s);
  return r;
}

// A few training steps with a throwaway network: the first training in a
// process pays one-time costs (intra-op thread pool, allocator, kernels'
// first use) that would otherwise all land on whichever reader runs first.
// The pass runs to its end (LibTorch's loader refuses a new pass while one
// is unfinished); batches after the first `steps` are only read.
template <typename Unpack, typename TrainLoader>
void warm_up(TrainLoader& train, int steps) {
  Net net;
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-3));
  for (auto& b : *train) {
    if (steps-- <= 0) continue;
    auto [x, y] = Unpack::unpack(b);
    auto loss = torch::cross_entropy_loss(net->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
}

std::string json(const char* name, const Result& r) {
  std::string losses = "[";
  for (size_t i = 0; i < r.losses.size(); ++i) losses += (i ? ", " : "") + std::to_string(r.losses[i]);
  losses += "]";
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "{\"loader\": \"%s\", \"load_seconds\": %.4f, \"train_seconds\": %.3f, \"test_accuracy\": %.4f, "
                "\"losses\": %s}",
                name, r.load_s, r.train_s, r.accuracy, losses.c_str());
  return buf;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  using torch::data::datasets::MNIST;
  namespace samplers = torch::data::samplers;
  torch_lmdb::StackedDataset lmdb_train(o.data + "/train.lmdb"), lmdb_test(o.data + "/test.lmdb");
  MNIST mnist_train(o.data + "/idx", MNIST::Mode::kTrain), mnist_test(o.data + "/idx", MNIST::Mode::kTest);

  // Identical samples: every image and label of both readers.
  for (auto [lmdb, mnist] : {std::pair{&lmdb_train, &mnist_train}, std::pair{&lmdb_test, &mnist_test}}) {
    if (*lmdb->size() != *mnist->size())
      throw std::runtime_error("the LMDB and IDX datasets differ in size");
    std::vector<size_t> all(*lmdb->size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    auto batch = lmdb->get_batch(all);
    if (!batch["image"].to(torch::kFloat).div(255).equal(mnist->images()) || !batch["label"].equal(mnist->targets()))
      throw std::runtime_error("the LMDB and IDX readers return different samples");
  }
  std::printf("identical samples: %zu training and %zu test images compared\n", *lmdb_train.size(),
              *lmdb_test.size());

  auto opts = torch::data::DataLoaderOptions().batch_size(o.batch_size).workers(o.workers);
  auto test_opts = torch::data::DataLoaderOptions().batch_size(1000).workers(o.workers);
  // LibTorch's MNIST reader insists on the full files: limits are applied by the samplers.
  const size_t n_train = o.limit_train ? std::min(o.limit_train, *lmdb_train.size()) : *lmdb_train.size();
  const size_t n_test = o.limit_test ? std::min(o.limit_test, *lmdb_test.size()) : *lmdb_test.size();
  auto lt = torch::data::make_data_loader(std::move(lmdb_train), samplers::RandomSampler(n_train), opts);
  auto le = torch::data::make_data_loader(std::move(lmdb_test), samplers::SequentialSampler(n_test), test_opts);
  auto mt = torch::data::make_data_loader(mnist_train.map(torch::data::transforms::Stack<>()),
                                          samplers::RandomSampler(n_train), opts);
  auto me = torch::data::make_data_loader(mnist_test.map(torch::data::transforms::Stack<>()),
                                          samplers::SequentialSampler(n_test), test_opts);

  warm_up<FromLmdb>(lt, 20);  // both readers, before either is timed
  warm_up<FromMnist>(mt, 20);
  auto a = run<FromLmdb>("torch_lmdb", lt, le, o);
  auto b = run<FromMnist>("LibTorch MNIST", mt, me, o);
  std::printf("RESULT {\"stage\": \"fashion_mnist\", \"runs\": [%s, %s]}\n", json("torch_lmdb", a).c_str(),
              json("LibTorch MNIST", b).c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_fmnist: error: %s\n", e.what());
  return 1;
}
