// torch_lmdb/dataset.h -- LibTorch datasets over torch_lmdb files.
//
// Contract
// - Dataset and StackedDataset hold a Reader: copying them is one shared_ptr
//   copy, which is what LibTorch's stateless DataLoader does for every worker
//   thread. All copies share the environments; all methods are thread-safe.
// - Fork: a copy used in a forked child reopens the files there (Reader).
// - Dataset::get_batch reads the whole batch in one read transaction and
//   returns one Sample per index (collate with torch_lmdb::Stack);
//   StackedDataset::get_batch returns the batch already stacked, with one
//   allocation per field and one copy per sample (the fast path).
#pragma once

#include <torch/data/datasets/base.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "torch_lmdb/reader.h"

namespace torch_lmdb {

/// A map-style dataset of Samples.
class Dataset : public torch::data::datasets::Dataset<Dataset, Sample> {
 public:
  /// `Dataset({"a.lmdb", "b.lmdb"})`, `Dataset({path})`, `Dataset("a.lmdb")`
  /// and `Dataset(paths_vector)` all compile and open those files.
  explicit Dataset(std::vector<std::string> paths, ReaderOptions options = {})
      : reader_(std::move(paths), std::move(options)) {}
  explicit Dataset(std::initializer_list<std::string> paths, ReaderOptions options = {})
      : reader_(std::vector<std::string>(paths), std::move(options)) {}
  explicit Dataset(const std::string& path, ReaderOptions options = {})
      : reader_(path, std::move(options)) {}
  explicit Dataset(Reader reader) : reader_(std::move(reader)) {}

  /// Sample `index`; c10::IndexError when out of range.
  Sample get(size_t index) override { return reader_.get(index); }
  /// One read transaction for the whole batch.
  std::vector<Sample> get_batch(at::ArrayRef<size_t> indices) override {
    return reader_.get_many(indices);
  }
  torch::optional<size_t> size() const override { return reader_.size(); }
  const Reader& reader() const { return reader_; }

 private:
  Reader reader_;
};

/// A batch dataset whose batches are stacked Samples ([B, ...] per field).
/// str/bytes fields are left out (a Sample holds tensors only); padded
/// fields get "<name>_lengths".
class StackedDataset : public torch::data::datasets::BatchDataset<StackedDataset, Sample> {
 public:
  /// Paths as for Dataset (braced lists, one path, a vector).
  explicit StackedDataset(std::vector<std::string> paths, ReaderOptions options = {},
                          BatchOptions batch_options = {})
      : reader_(std::move(paths), std::move(options)), batch_options_(std::move(batch_options)) {}
  explicit StackedDataset(std::initializer_list<std::string> paths, ReaderOptions options = {},
                          BatchOptions batch_options = {})
      : reader_(std::vector<std::string>(paths), std::move(options)),
        batch_options_(std::move(batch_options)) {}
  explicit StackedDataset(const std::string& path, ReaderOptions options = {},
                          BatchOptions batch_options = {})
      : reader_(path, std::move(options)), batch_options_(std::move(batch_options)) {}

  Sample get_batch(at::ArrayRef<size_t> indices) override {
    return reader_.read_batch(indices, batch_options_).tensors;
  }
  torch::optional<size_t> size() const override { return reader_.size(); }
  const Reader& reader() const { return reader_; }

 private:
  Reader reader_;
  BatchOptions batch_options_;
};

}  // namespace torch_lmdb
