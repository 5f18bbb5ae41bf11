// The radio-localization model of train.py, trained natively in LibTorch from
// the same torch_lmdb shards with torch_lmdb::make_loader (reader threads
// read shuffled batches ahead; a new order every epoch).
//
//   train_native --train a.lmdb,b.lmdb --val c.lmdb [--epochs 5] [--batch-size 256]
//                [--workers 2] [--lr 0.002] [--seed 0]
//
// Prints per-epoch loss and median localization error (metres), the error of
// predicting the mean position, data-loading samples/s (a loader-only pass),
// and a final "RESULT {json}" line.
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Same scaling as common.py.
constexpr double kCirOffset = 20.0, kCirScale = 20.0, kRssiOffset = 80.0, kRssiScale = 20.0;

struct Options {
  std::vector<std::string> train, val;
  int epochs = 5;
  int64_t batch_size = 256;
  size_t workers = 2;
  double lr = 0.002;
  int seed = 0;
};

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: train_native --train A.lmdb,B.lmdb --val C.lmdb [--epochs N] [--batch-size N] "
                  "[--workers N] [--lr X] [--seed N]\n");
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument("missing value after " + arg);
    std::string value = argv[++i];
    if (arg == "--train") o.train = split(value);
    else if (arg == "--val") o.val = split(value);
    else if (arg == "--epochs") o.epochs = std::stoi(value);
    else if (arg == "--batch-size") o.batch_size = std::stol(value);
    else if (arg == "--workers") o.workers = std::stoul(value);
    else if (arg == "--lr") o.lr = std::stod(value);
    else if (arg == "--seed") o.seed = std::stoi(value);
    else throw std::invalid_argument("unknown option " + arg);
  }
  if (o.train.empty() || o.val.empty()) throw std::invalid_argument("--train and --val are required");
  return o;
}

struct NetImpl : torch::nn::Module {
  NetImpl(int64_t in) {
    l1 = register_module("l1", torch::nn::Linear(in, 256));
    l2 = register_module("l2", torch::nn::Linear(256, 256));
    l3 = register_module("l3", torch::nn::Linear(256, 3));
  }
  torch::Tensor forward(torch::Tensor x) {
    return l3->forward(torch::relu(l2->forward(torch::relu(l1->forward(x)))));
  }
  torch::nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
};
TORCH_MODULE(Net);

torch::Tensor features(const torch_lmdb::Sample& b) {
  auto cir = (b["cir"] - kCirOffset) / kCirScale;
  auto rssi = (b["rssi"] + kRssiOffset) / kRssiScale;
  return torch::cat({cir.flatten(1), rssi}, 1);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median_error(Net& net, torch_lmdb::Loader& loader, const torch::Tensor& scale) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> errors;
  for (auto& batch : loader) {
    const auto& b = batch.tensors;
    errors.push_back((net->forward(features(b)) * scale - b["position"]).norm(2, {1}));
  }
  return torch::cat(errors).median().item<double>();
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  torch::manual_seed(o.seed);
  torch_lmdb::LoaderOptions lo;
  lo.fields = {"cir", "rssi", "position"};
  lo.batch_size = static_cast<size_t>(o.batch_size);
  lo.threads = o.workers;
  lo.seed = static_cast<uint64_t>(o.seed);
  auto train_loader = torch_lmdb::make_loader(o.train, lo);
  lo.shuffle = false;
  auto val_loader = torch_lmdb::make_loader(o.val, lo);
  const size_t n_train = train_loader->reader().size();
  // The simulator's configuration travels in the database metadata: user.config for the
  // generator's own shards, user.source_attrs.config (the store's root attributes) for a
  // database converted from the Zarr store.
  const auto user = nlohmann::json::parse(train_loader->reader().metadata_json(0)).at("user");
  const auto config = user.contains("config") ? user.at("config") : user.at("source_attrs").at("config");
  const int64_t num_bs = config.at("num_bs"), num_taps = config.at("num_taps");
  const auto scale = torch::tensor(config.at("area").get<std::vector<float>>());
  const int64_t in = num_bs * num_taps + num_bs;

  auto t0 = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> positions;
  for (auto& b : *train_loader) positions.push_back(b.tensors["position"]);
  const double load_rate = n_train / seconds_since(t0);
  auto all = torch::cat(positions);
  auto mean = all.mean(0);
  std::vector<torch::Tensor> val_pos;
  for (auto& b : *val_loader) val_pos.push_back(b.tensors["position"]);
  const double baseline = (torch::cat(val_pos) - mean).norm(2, {1}).median().item<double>();
  std::printf("torch_lmdb::make_loader: %zu training samples, %zu reader threads: "
              "data loading %.0f samples/s; predicting the mean position: median error %.2f m\n",
              n_train, o.workers, load_rate, baseline);

  Net net(in);
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(o.lr));
  std::vector<double> losses, errors;
  auto t_train = std::chrono::steady_clock::now();
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    double total = 0;
    int64_t count = 0;
    auto t_epoch = std::chrono::steady_clock::now();
    for (auto& batch : *train_loader) {
      const auto& b = batch.tensors;
      auto pred = net->forward(features(b));
      auto loss = torch::mse_loss(pred, b["position"] / scale);
      opt.zero_grad();
      loss.backward();
      opt.step();
      total += loss.item<double>() * pred.size(0);
      count += pred.size(0);
    }
    losses.push_back(total / count);
    errors.push_back(median_error(net, *val_loader, scale));
    std::printf("epoch %d: loss %.5f  median error %.2f m  (%.0f samples/s with training)\n", epoch + 1,
                losses.back(), errors.back(), count / seconds_since(t_epoch));
    std::fflush(stdout);
  }
  const double train_s = seconds_since(t_train);
  auto list = [](const std::vector<double>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
  };
  std::printf("RESULT {\"stage\": \"train\", \"loader\": \"native C++ torch_lmdb::make_loader\", \"num_workers\": %zu, "
              "\"load_samples_per_s\": %.1f, \"losses\": %s, \"median_errors_m\": %s, \"baseline_error_m\": %.4f, "
              "\"train_seconds\": %.3f}\n",
              o.workers, load_rate, list(losses).c_str(), list(errors).c_str(), baseline, train_s);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_native: error: %s\n", e.what());
  return 1;
}
