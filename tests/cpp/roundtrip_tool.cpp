// Cross-language check used by tests/python/test_interop.py:
//   torch_lmdb_roundtrip write PATH N   writes N samples of a fixed recipe
//   torch_lmdb_roundtrip check PATH N   verifies N samples of that recipe
// Recipe of sample i: "i" int64 scalar, "x" float32 [3, 4] = arange(12) * i,
// "name" str "sample-<i>", "raw" bytes of i % 7 zero bytes.
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <cstdio>
#include <cstring>

using namespace torch_lmdb;

static std::vector<Field> recipe(int64_t i) {
  std::string name = "sample-" + std::to_string(i);
  at::Tensor text = at::empty({static_cast<int64_t>(name.size())}, at::kByte);
  std::memcpy(text.data_ptr(), name.data(), name.size());
  return {{"i", FieldKind::Tensor, torch::tensor(i)},
          {"x", FieldKind::Tensor, (torch::arange(12, torch::kFloat) * static_cast<float>(i)).view({3, 4})},
          {"name", FieldKind::Str, text},
          {"raw", FieldKind::Bytes, torch::zeros({i % 7}, torch::kByte)}};
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s write|check PATH N\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1], path = argv[2];
  const int64_t n = std::atoll(argv[3]);
  try {
    if (mode == "write") {
      Writer w(path);
      for (int64_t i = 0; i < n; ++i) w.write(recipe(i));
      w.close();
      return 0;
    }
    Reader r(path, ReaderOptions{/*verify=*/true});
    if (static_cast<int64_t>(r.size()) != n) {
      std::fprintf(stderr, "size %zu != %lld\n", r.size(), static_cast<long long>(n));
      return 1;
    }
    for (int64_t i = 0; i < n; ++i) {
      auto got = r.get_fields(static_cast<size_t>(i));
      auto want = recipe(i);
      if (got.size() != want.size()) return 1;
      for (size_t f = 0; f < got.size(); ++f) {
        if (got[f].name != want[f].name || got[f].kind != want[f].kind ||
            !torch::equal(got[f].tensor, want[f].tensor)) {
          std::fprintf(stderr, "sample %lld field %s differs\n", static_cast<long long>(i), got[f].name.c_str());
          return 1;
        }
      }
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
