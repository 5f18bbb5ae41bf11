#include "torch_lmdb/detail/windows.h"

#include "torch_lmdb/loader.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <numeric>

namespace torch_lmdb {
namespace detail {

namespace {

// Bytes of the `shards` largest shards.
uint64_t largest(std::vector<uint64_t> sizes, size_t shards) {
  std::sort(sizes.begin(), sizes.end(), std::greater<uint64_t>());
  return std::accumulate(sizes.begin(), sizes.begin() + static_cast<ptrdiff_t>(std::min(shards, sizes.size())),
                         uint64_t{0});
}

}  // namespace

WindowChoice choose_shard_window(const std::vector<uint64_t>& sizes, uint64_t limit, size_t window,
                                 int64_t predownload, const std::string& source) {
  const size_t n = sizes.size();
  TORCH_CHECK_VALUE(n > 0, "'", source, "' has no shards");
  if (window == 0) {  // the largest window the cache holds twice, with a shard to spare
    window = 1;
    while (window < n && largest(sizes, 2 * (window + 1) + 1) <= limit) ++window;
  }
  window = std::min(window, n);
  WindowChoice c;
  c.window = window;
  c.predownload = predownload < 0 ? std::max<size_t>(1, std::min(window, n - window)) : static_cast<size_t>(predownload);
  // A batch that straddles two windows holds the shards of both (as do
  // reader threads, or DataLoader workers, that are in two windows at once).
  const size_t shards = std::min(n, 2 * window);
  const uint64_t need = largest(sizes, shards);
  TORCH_CHECK_VALUE(limit >= need, "cache_limit ", limit, " bytes is too small for '", source,
                    "' with shard_window=", window, ": a batch that straddles two windows of ", window,
                    " shards holds both, which needs at least ", need, " bytes (its ", shards,
                    " largest shards); ", largest(sizes, std::min(n, 2 * window + c.predownload)),
                    " bytes also fetch the next ", c.predownload,
                    " shards ahead. Raise cache_limit or lower shard_window");
  return c;
}

std::vector<int64_t> shard_window_order(const std::vector<uint64_t>& counts, size_t window, uint64_t seed,
                                        bool shuffle, std::vector<int64_t>* visit) {
  TORCH_CHECK_VALUE(window > 0, "shard_window must be positive, got ", window);
  std::vector<int64_t> offsets{0};
  for (uint64_t c : counts) offsets.push_back(offsets.back() + static_cast<int64_t>(c));
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(offsets.back()));
  std::vector<int64_t> shards(counts.size());
  if (!shuffle) {
    std::iota(shards.begin(), shards.end(), int64_t{0});
    for (int64_t i = 0; i < offsets.back(); ++i) order.push_back(i);
  } else {
    // torch.Generator().manual_seed(seed & (2**63 - 1)), then randperm draws
    // in the order Python's shard_window_order makes them.
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed & uint64_t{0x7FFFFFFFFFFFFFFF});
    const auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor v = at::randperm(static_cast<int64_t>(counts.size()), gen, opts);
    std::copy(v.data_ptr<int64_t>(), v.data_ptr<int64_t>() + v.numel(), shards.begin());
    for (size_t w = 0; w < shards.size(); w += window) {
      std::vector<int64_t> idx;
      for (size_t j = w; j < std::min(shards.size(), w + window); ++j)
        for (int64_t i = offsets[static_cast<size_t>(shards[j])]; i < offsets[static_cast<size_t>(shards[j]) + 1]; ++i)
          idx.push_back(i);
      at::Tensor p = at::randperm(static_cast<int64_t>(idx.size()), gen, opts);
      const int64_t* pp = p.data_ptr<int64_t>();
      for (int64_t j = 0; j < p.numel(); ++j) order.push_back(idx[static_cast<size_t>(pp[j])]);
    }
  }
  if (visit != nullptr) *visit = std::move(shards);
  return order;
}

ShardWindows::ShardWindows(std::shared_ptr<ShardCache> cache, ReaderOptions sub, WindowChoice choice)
    : cache_(std::move(cache)), sub_(std::move(sub)), choice_(choice) {
  for (const StagedShard& s : cache_->shards()) {
    counts_.push_back(s.num_samples);
    offsets_.push_back(offsets_.back() + s.num_samples);
  }
  sub_.cache_dir.clear();
  sub_.cache_limit = 0;
  sub_.lock = 0;  // staged copies: read-only, no lock file
  window_of_.assign(counts_.size(), 0);
}

ShardWindows::~ShardWindows() { release_all(); }

void ShardWindows::check_first() {
  const std::string local = cache_->acquire(0);
  try {
    Reader first(local, sub_);
  } catch (...) {
    cache_->release(0, /*unread=*/true);
    throw;
  }
  cache_->release(0, /*unread=*/true);
}

size_t windows_size(const ShardWindows& windows) { return windows.size(); }

void ShardWindows::release_all() {
  std::map<size_t, Held> held;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    held.swap(held_);
  }
  for (auto& [k, h] : held) {
    h.reader.reset();
    cache_->release(k);
  }
}

std::vector<int64_t> ShardWindows::start_epoch(uint64_t seed, bool shuffle) {
  std::vector<int64_t> visit;
  std::vector<int64_t> order = shard_window_order(counts_, choice_.window, seed, shuffle, &visit);
  std::lock_guard<std::mutex> lock(mutex_);
  visit_ = visit;
  for (size_t j = 0; j < visit_.size(); ++j) window_of_[static_cast<size_t>(visit_[j])] = j / choice_.window;
  for (auto& [k, h] : held_) h.window = window_of_[k];
  latest_ = 0;
  ahead_for_ = SIZE_MAX;
  in_flight_.clear();
  return order;
}

std::pair<size_t, size_t> ShardWindows::locate(size_t index) const {
  TORCH_CHECK_INDEX(index < size(), "index ", index, " out of range for dataset of size ", size());
  const size_t k = static_cast<size_t>(std::upper_bound(offsets_.begin(), offsets_.end(), index) - offsets_.begin()) - 1;
  return {k, index - offsets_[k]};
}

std::shared_ptr<Reader> ShardWindows::hold(size_t k, size_t window) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = held_.find(k);
    if (it != held_.end()) return it->second.reader;
  }
  // Outside the mutex: acquiring may wait for another thread's batch to end
  // and release its window's shards.
  const std::string local = cache_->acquire(k);
  std::shared_ptr<Reader> reader;
  try {
    reader = std::make_shared<Reader>(local, sub_);
  } catch (...) {
    cache_->release(k);
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto [it, inserted] = held_.emplace(k, Held{reader, window});
  if (!inserted) cache_->release(k);  // another thread held it meanwhile: one lease
  return it->second.reader;
}

void ShardWindows::done(const std::vector<size_t>& windows) {
  std::vector<std::pair<size_t, std::shared_ptr<Reader>>> drop;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t w : windows)
      if (--in_flight_[w] == 0) in_flight_.erase(w);
    for (auto it = held_.begin(); it != held_.end();) {
      const size_t w = it->second.window;
      if (w < latest_ && in_flight_.count(w) == 0) {
        drop.emplace_back(it->first, std::move(it->second.reader));
        it = held_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& [k, reader] : drop) {
    reader.reset();
    cache_->release(k);
  }
}

namespace {

// The parts' tensors of one field, concatenated in part order; shapes that
// differ past dim 0 (padded per part) padded to the largest.
at::Tensor concat(const std::vector<at::Tensor>& parts, const std::string& name, const BatchOptions& o) {
  std::vector<int64_t> shape = parts[0].sizes().vec();
  bool same = true;
  int64_t rows = 0;
  for (const at::Tensor& t : parts) {
    rows += t.size(0);
    TORCH_CHECK_VALUE(t.dim() == parts[0].dim() && t.scalar_type() == parts[0].scalar_type(), "field '", name,
                      "' has other dims or dtypes in two shards of the batch");
    for (int64_t d = 1; d < t.dim(); ++d) {
      same = same && t.size(d) == shape[static_cast<size_t>(d)];
      shape[static_cast<size_t>(d)] = std::max(shape[static_cast<size_t>(d)], t.size(d));
    }
  }
  if (same) return at::cat(parts);
  const bool pad = o.pad || std::find(o.pad_fields.begin(), o.pad_fields.end(), name) != o.pad_fields.end();
  TORCH_CHECK_VALUE(pad, "field '", name, "' has shape ", parts[0].sizes().slice(1), " in one shard of the batch and ",
                    at::IntArrayRef(shape).slice(1), " in another; pad it (BatchOptions::pad)");
  shape[0] = rows;
  at::Tensor out = at::full(shape, o.pad_value, parts[0].options());
  int64_t at_row = 0;
  for (const at::Tensor& t : parts) {
    at::Tensor slot = out.narrow(0, at_row, t.size(0));
    for (int64_t d = 1; d < t.dim(); ++d) slot = slot.narrow(d, 0, t.size(d));
    slot.copy_(t);
    at_row += t.size(0);
  }
  return out;
}

}  // namespace

Batch ShardWindows::read(const std::vector<size_t>& indices, const BatchOptions& options) {
  // Group the batch by shard, in order of first appearance.
  std::vector<size_t> shards;
  std::map<size_t, std::vector<size_t>> where;   // shard -> batch positions
  std::map<size_t, std::vector<size_t>> locals;  // shard -> local indices
  for (size_t j = 0; j < indices.size(); ++j) {
    const auto [k, local] = locate(indices[j]);
    if (where.count(k) == 0) shards.push_back(k);
    where[k].push_back(j);
    locals[k].push_back(local);
  }
  std::vector<size_t> windows;
  std::map<size_t, size_t> window_of;  // shard -> its window this epoch
  std::vector<int64_t> current, ahead;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t k : shards) {
      const size_t w = window_of[k] = window_of_[k];
      if (std::find(windows.begin(), windows.end(), w) == windows.end()) windows.push_back(w);
    }
    for (size_t w : windows) {
      ++in_flight_[w];
      if (w > latest_ || ahead_for_ == SIZE_MAX) {
        latest_ = std::max(latest_, w);
        // A new window: its shards fetched together, the next window's first
        // ones ahead (skipped by the cache while it has no room for them).
        const size_t W = choice_.window;
        for (size_t j = w * W; j < std::min(visit_.size(), (w + 1) * W); ++j)
          if (held_.count(static_cast<size_t>(visit_[j])) == 0) current.push_back(visit_[j]);
      }
    }
    // Again now and then: a shard skipped for want of room fits once the window moves.
    const auto now = std::chrono::steady_clock::now();
    if (!visit_.empty() && (ahead_for_ != latest_ || now - ahead_at_ > std::chrono::milliseconds(50))) {
      const size_t W = choice_.window, from = (latest_ + 1) * W;
      for (size_t j = from; j < std::min(visit_.size(), from + choice_.predownload); ++j) ahead.push_back(visit_[j]);
      ahead_for_ = latest_;
      ahead_at_ = now;
    }
  }
  Batch out;
  try {
    if (!current.empty()) cache_->prefetch(std::vector<size_t>(current.begin(), current.end()));
    std::vector<Batch> parts;
    for (size_t k : shards) parts.push_back(hold(k, window_of[k])->read_batch(locals[k], options));
    if (!ahead.empty()) cache_->prefetch(std::vector<size_t>(ahead.begin(), ahead.end()));
    if (parts.size() == 1) {
      out = std::move(parts[0]);
    } else {
      std::vector<int64_t> from;  // batch position of each row of the concatenation
      for (size_t k : shards)
        for (size_t j : where[k]) from.push_back(static_cast<int64_t>(j));
      at::Tensor inverse = at::empty({static_cast<int64_t>(from.size())}, at::kLong);
      for (size_t r = 0; r < from.size(); ++r) inverse.data_ptr<int64_t>()[from[r]] = static_cast<int64_t>(r);
      out.order = parts[0].order;
      for (const auto& item : parts[0].tensors) {
        std::vector<at::Tensor> ts;
        for (const Batch& p : parts) {
          const at::Tensor* t = p.tensors.find(item.key());
          TORCH_CHECK_VALUE(t != nullptr, "field '", item.key(), "' is missing from one shard's part of the batch");
          ts.push_back(*t);
        }
        out.tensors.insert(item.key(), concat(ts, item.key(), options).index_select(0, inverse));
      }
      for (size_t b = 0; b < parts[0].blobs.size(); ++b) {
        Batch::Blobs blobs{parts[0].blobs[b].name, parts[0].blobs[b].kind, {}};
        std::vector<std::string> all;
        for (Batch& p : parts) for (auto& v : p.blobs.at(b).values) all.push_back(std::move(v));
        blobs.values.resize(all.size());
        for (size_t r = 0; r < all.size(); ++r) blobs.values[static_cast<size_t>(from[r])] = std::move(all[r]);
        out.blobs.push_back(std::move(blobs));
      }
    }
  } catch (...) {
    done(windows);
    throw;
  }
  done(windows);
  return out;
}

}  // namespace detail

// loader.h: a staged dataset larger than its cache_limit is read in shard windows.
std::unique_ptr<Loader> make_loader(const std::vector<std::string>& paths, LoaderOptions options) {
  ReaderOptions ro = options.reader;
  if (!options.fields.empty()) ro.fields = options.fields;
  if (paths.size() == 1 && !ro.cache_dir.empty() && ro.cache_limit != 0) {
    detail::StageOptions so;
    so.cache_dir = ro.cache_dir;
    so.cache_limit = ro.cache_limit;
    auto cache = std::make_shared<detail::ShardCache>(paths[0], so);
    if (cache->total_bytes() > ro.cache_limit) {
      std::vector<uint64_t> sizes;
      for (const auto& s : cache->shards()) sizes.push_back(s.size);
      const detail::WindowChoice choice =
          detail::choose_shard_window(sizes, ro.cache_limit, options.shard_window, options.predownload, paths[0]);
      auto windows = std::make_shared<detail::ShardWindows>(std::move(cache), std::move(ro), choice);
      windows->check_first();
      return std::make_unique<Loader>(std::move(windows), std::move(options));
    }
  }
  Reader reader(paths, std::move(ro));
  return std::make_unique<Loader>(std::move(reader), std::move(options));
}

}  // namespace torch_lmdb
