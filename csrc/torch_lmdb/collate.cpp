#include "torch_lmdb/collate.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace torch_lmdb {

Sample Stack::apply_batch(std::vector<Sample> samples) {
  TORCH_CHECK_VALUE(!samples.empty(), "Stack needs at least one sample");
  const Sample& first = samples[0];
  Sample out;
  for (const auto& item : first) {
    const std::string& name = item.key();
    const at::Tensor& ref = item.value();
    std::vector<at::Tensor> parts;
    parts.reserve(samples.size());
    bool varies = false;
    std::vector<int64_t> max_shape = ref.sizes().vec();
    for (size_t i = 0; i < samples.size(); ++i) {
      const at::Tensor* t = samples[i].find(name);
      TORCH_CHECK_VALUE(t != nullptr, "sample ", i, " of the batch has no field '", name, "'");
      TORCH_CHECK_VALUE(t->dim() == ref.dim(), "field '", name, "' has ", t->dim(),
                        " dims in sample ", i, " of the batch but ", ref.dim(), " in sample 0");
      TORCH_CHECK_TYPE(t->scalar_type() == ref.scalar_type(), "field '", name, "' has dtype ",
                       t->scalar_type(), " in sample ", i, " but ", ref.scalar_type(), " in sample 0");
      if (t->sizes() != ref.sizes()) {
        const bool pad = pad_all_ || pad_fields_.count(name) > 0;
        TORCH_CHECK_VALUE(pad, "field '", name, "' has shape ", t->sizes(), " in sample ", i,
                          " of the batch but ", ref.sizes(),
                          " in sample 0; use Stack(/*pad_all=*/true) to pad it");
        varies = true;
        for (int64_t d = 0; d < ref.dim(); ++d) max_shape[d] = std::max(max_shape[d], t->size(d));
      }
      parts.push_back(*t);
    }
    if (!varies) {
      out.insert(name, at::stack(parts));
      continue;
    }
    std::vector<int64_t> shape{static_cast<int64_t>(parts.size())};
    shape.insert(shape.end(), max_shape.begin(), max_shape.end());
    at::Tensor batch = at::full(shape, pad_value_, ref.options());
    at::Tensor lengths = at::empty({static_cast<int64_t>(parts.size()), ref.dim()}, at::kLong);
    auto len = lengths.accessor<int64_t, 2>();
    for (size_t i = 0; i < parts.size(); ++i) {
      at::Tensor slot = batch[static_cast<int64_t>(i)];
      for (int64_t d = 0; d < ref.dim(); ++d) {
        slot = slot.narrow(d, 0, parts[i].size(d));
        len[static_cast<int64_t>(i)][d] = parts[i].size(d);
      }
      slot.copy_(parts[i]);
    }
    out.insert(name, std::move(batch));
    out.insert(name + "_lengths", std::move(lengths));
  }
  return out;
}

torch::data::Example<> ToExample::apply(Sample sample) {
  auto names = [&] {
    std::string s;
    for (const auto& k : sample.keys()) s += (s.empty() ? "" : ", ") + k;
    return s;
  };
  const at::Tensor* data = sample.find(data_);
  TORCH_CHECK_VALUE(data != nullptr, "ToExample: no field '", data_, "' in the sample; fields: ", names());
  const at::Tensor* target = sample.find(target_);
  TORCH_CHECK_VALUE(target != nullptr, "ToExample: no field '", target_, "' in the sample; fields: ", names());
  return {*data, *target};
}

}  // namespace torch_lmdb
