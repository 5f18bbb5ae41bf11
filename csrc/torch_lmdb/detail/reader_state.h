// torch_lmdb/detail/reader_state.h -- internal: what a Reader holds (Reader::State),
// shared by reader.cpp and lookup.cpp. Not installed.
//
// Contract
// - Set up once by Reader's constructor, then read-only but for the
//   environments, which a forked child reopens once (current_envs(), under
//   reopen_mutex), and the io_* counters (atomics).
// - Thread safety: every member may be used from any thread.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "torch_lmdb/detail/decode.h"
#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/reader.h"

namespace torch_lmdb {
namespace detail {
class ShardCache;  // stage.h
}  // namespace detail

struct Reader::State {
  static inline std::atomic<uint64_t> next_id{1};
  const uint64_t id = next_id++;  // names this reader's schema in per-thread caches
  std::vector<std::string> paths;
  ReaderOptions options;
  std::vector<size_t> offsets;           // offsets[i] = first global index of file i; back() = size
  std::vector<FieldSchema> stored;       // every stored field
  std::vector<FieldSchema> schema;       // the selected ones
  std::vector<char> keep;                // per stored field: selected?
  std::vector<std::string> meta_json;
  std::vector<uint32_t> per_value;       // per file: records per LMDB value (metadata samples_per_value)
  bool complete = true;

  // Environments of the current process (reopened after fork).
  std::atomic<uint64_t> generation{0};
  std::mutex reopen_mutex;
  std::vector<std::shared_ptr<Env>> envs;
  // Staged datasets (ReaderOptions::cache_dir): their leases last as long as the State.
  std::vector<std::shared_ptr<detail::ShardCache>> staged;
  std::shared_ptr<detail::BufferPool> buffers;
  // Reader::io_stats().
  mutable std::atomic<uint64_t> io_batches{0}, io_page_request_batches{0}, io_pages{0}, io_pages_ahead{0},
      io_request_pages_calls{0}, io_direct_records{0},
      io_window_records{0}, io_window_bytes{0};

  EnvOptions env_options() const {
    EnvOptions o;
    o.readonly = true;
    o.lock = options.lock;
    o.os_readahead = options.os_readahead;
    o.max_readers = options.max_readers;
    o.warn = options.warn;
    return o;
  }

  const std::vector<std::shared_ptr<Env>>& current_envs() {
    const uint64_t gen = fork_generation();
    if (generation.load(std::memory_order_acquire) == gen) return envs;
    std::lock_guard<std::mutex> guard(reopen_mutex);
    if (generation.load(std::memory_order_acquire) != gen) {
      // A forked child: open our own handles; the parent's are dropped
      // without being closed (Env's destructor checks the owner pid).
      std::vector<std::shared_ptr<Env>> fresh;
      for (const auto& p : paths) fresh.push_back(Env::open(p, env_options()));
      envs.swap(fresh);
      generation.store(gen, std::memory_order_release);
    }
    return envs;
  }

  std::pair<size_t, uint64_t> locate(size_t index) const {
    TORCH_CHECK_INDEX(index < offsets.back(), "index ", index,
                      " out of range for dataset of size ", offsets.back(), " at '",
                      paths.size() == 1 ? paths[0] : paths[0] + "' (+" + std::to_string(paths.size() - 1) + " files", "'");
    const auto it = std::upper_bound(offsets.begin(), offsets.end(), index);
    const size_t file = static_cast<size_t>(it - offsets.begin()) - 1;
    return {file, index - offsets[file]};
  }
};

}  // namespace torch_lmdb
