// Writes a small regression dataset with torch_lmdb::Writer, then trains a
// tiny model on it with torch_lmdb::make_loader (2 reader threads, shuffled).
// Exits non-zero unless the loss falls (the install test runs this).
//
//   train_tiny <database directory>
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "tiny.lmdb";
  std::filesystem::remove_all(path);
  torch::manual_seed(0);

  // y = x . w_true + 0.5 + noise
  const auto w_true = torch::tensor({1.5f, -2.0f, 0.5f, 3.0f});
  {
    torch_lmdb::Writer writer(path);
    for (int i = 0; i < 2048; ++i) {
      torch_lmdb::Sample s;
      auto x = torch::randn({4});
      s.insert("x", x);
      s.insert("y", (x * w_true).sum().unsqueeze(0) + 0.5 + 0.01 * torch::randn({1}));
      writer.write(s);
    }
    writer.close();  // marks the database complete
  }

  torch_lmdb::LoaderOptions options;
  options.batch_size = 64;
  options.threads = 2;  // reader threads read shuffled batches ahead
  auto loader = torch_lmdb::make_loader(path, options);

  torch::nn::Linear model(4, 1);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05));
  double first = 0, last = 0;
  for (int epoch = 0; epoch < 5; ++epoch) {
    double total = 0;
    int batches = 0;
    for (auto& batch : *loader) {
      opt.zero_grad();
      auto loss = torch::mse_loss(model->forward(batch.tensors["x"]), batch.tensors["y"]);
      loss.backward();
      opt.step();
      total += loss.item<double>();
      ++batches;
    }
    last = total / batches;
    if (epoch == 0) first = last;
    std::printf("epoch %d  loss %.5f\n", epoch, last);
  }
  if (!(last < first * 0.1)) {
    std::fprintf(stderr, "loss did not fall: %.5f -> %.5f\n", first, last);
    return 1;
  }
  std::printf("ok: loss fell from %.5f to %.5f\n", first, last);
  return 0;
}
