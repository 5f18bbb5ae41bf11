// torch_lmdb/collate.h -- batch transforms for Samples.
//
// - Stack: std::vector<Sample> -> Sample of stacked tensors. Fields must have
//   equal shapes (ValueError naming the field and the two shapes) unless
//   padding is asked for, which pads to the largest shape with `pad_value`
//   and adds "<name>_lengths" (int64 [B, ndim]).
// - ToExample(data, target): Sample -> torch::data::Example<> so existing
//   training loops that expect `batch.data` / `batch.target` work unchanged:
//     auto loader = torch::data::make_data_loader(
//         ds.map(torch_lmdb::ToExample("image", "label"))
//           .map(torch::data::transforms::Stack<>()), 64);
// Both are stateless and thread-safe.
#pragma once

#include <torch/data/example.h>
#include <torch/data/transforms/base.h>
#include <torch/data/transforms/collate.h>

#include <set>
#include <string>
#include <vector>

#include "torch_lmdb/record.h"

namespace torch_lmdb {

class Stack : public torch::data::transforms::Collation<Sample> {
 public:
  Stack() = default;
  /// pad_all: pad every field whose shape varies; pad_fields: only these.
  explicit Stack(bool pad_all, std::set<std::string> pad_fields = {}, double pad_value = 0)
      : pad_all_(pad_all), pad_fields_(std::move(pad_fields)), pad_value_(pad_value) {}

  Sample apply_batch(std::vector<Sample> samples) override;

 private:
  bool pad_all_ = false;
  std::set<std::string> pad_fields_;
  double pad_value_ = 0;
};

class ToExample : public torch::data::transforms::Transform<Sample, torch::data::Example<>> {
 public:
  ToExample(std::string data_field, std::string target_field)
      : data_(std::move(data_field)), target_(std::move(target_field)) {}
  /// ValueError naming the missing field and the available ones.
  torch::data::Example<> apply(Sample sample) override;

 private:
  std::string data_;
  std::string target_;
};

}  // namespace torch_lmdb
