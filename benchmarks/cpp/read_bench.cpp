// Native read benchmark over an existing torch_lmdb database; one mode per
// process (LMDB forbids opening one environment twice in a process).
//
//   torch_lmdb_bench_read --path DB --mode memcpy|raw|get_batch|get_stack|loader [--threads T]
//                         [--batch B] [--order shuffled|sequential|block] [--seconds S] [--pad 1]
//                         (block: loader, block shuffle of 1024-sample blocks, 4 a window)
//                         [--cold 1]  (loader: no warm-up, at most one epoch)
//                         [--batches-ahead N]  (loader: finished batches queued ahead; default
//                         LoaderOptions::batches_ahead; --prefetch N is its old name)
//                         [--verify 0|1]  (get_batch, get_stack, loader: ReaderOptions::verify;
//                         default: the reader's default)
//                         [--keep-cache 0|1 --direct-reads 0|1]  (ReaderOptions::keep_cache,
//                         direct_reads)
//                         [--cache-dir DIR --cache-limit BYTES]  (ReaderOptions: --path may be
//                         a URL; loader mode reads a dataset larger than the limit in shard windows)
//
//   memcpy     the ceiling: every sample's tensor bytes gathered in the same
//              order from an in-memory copy into a reused buffer.
//   raw        liblmdb alone: T threads, each with its own read txn per batch,
//              mdb_get + memcpy of every value into a reused buffer (the floor
//              of any LMDB reader); T=0 runs on the calling thread.
//   get_batch  torch_lmdb::StackedDataset through make_data_loader, T workers.
//   get_stack  torch_lmdb::Dataset + torch_lmdb::Stack through make_data_loader.
//   loader     torch_lmdb::make_loader (BatchStream), T reader threads, a new
//              order each epoch; batches of every epoch, seed 0.
//
// Prints one JSON object: samples/s, bytes/s (value bytes), CPU us per sample,
// the page faults (major, minor) during the measurement.
#include <lmdb.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <torch_lmdb/torch_lmdb.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Args {
  std::string path, mode = "get_batch", order = "shuffled";
  size_t threads = 0, batch = 256;
  bool pad = false;
  size_t batches_ahead = 0;  // loader mode: batches queued ahead (0: the LoaderOptions default)
  bool cold = false;  // loader mode: no warm-up epoch, one epoch at most (the file evicted by the caller)
  double seconds = 2.0;
  int verify = -1;  // -1: ReaderOptions' default
  std::string cache_dir;
  uint64_t cache_limit = 0;
  int keep_cache = -1, direct_reads = -1;  // -1: ReaderOptions' defaults
};

torch_lmdb::ReaderOptions reader_options(const Args& a) {
  torch_lmdb::ReaderOptions o;
  if (a.verify >= 0) o.verify = a.verify == 1;
  if (a.keep_cache >= 0) o.keep_cache = a.keep_cache == 1;
  if (a.direct_reads >= 0) o.direct_reads = a.direct_reads == 1;
  o.cache_dir = a.cache_dir;
  o.cache_limit = a.cache_limit;
  return o;
}

// CPU seconds and page faults of the process so far. Major faults in a warm
// measurement mean pages of the file left the page cache during it.
struct Usage {
  double cpu = 0, major_faults = 0, minor_faults = 0;
};

Usage usage() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return {u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec),
          static_cast<double>(u.ru_majflt), static_cast<double>(u.ru_minflt)};
}

void check(int rc, const char* what) {
  if (rc != MDB_SUCCESS) throw std::runtime_error(std::string(what) + ": " + mdb_strerror(rc));
}

std::vector<size_t> order(size_t n, const std::string& kind, unsigned seed) {
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), size_t{0});
  if (kind == "shuffled") std::shuffle(idx.begin(), idx.end(), std::mt19937_64(seed));
  return idx;
}

struct Measure {
  double samples = 0, bytes = 0, wall = 0;
  Usage used;  // during the measurement

  void finish(const Usage& start) {
    const Usage end = usage();
    used = {end.cpu - start.cpu, end.major_faults - start.major_faults, end.minor_faults - start.minor_faults};
  }
};

// Runs `body(worker, workers, order, &samples, &bytes)` on T threads (0 = the
// calling thread), one sample order per epoch, until a.seconds have passed.
template <typename Body>
Measure run_epochs(const Args& a, size_t n, Body body) {
  const size_t workers = std::max<size_t>(1, a.threads);
  Measure m;
  unsigned epoch = 0;
  const Usage start = usage();
  auto t0 = std::chrono::steady_clock::now();
  do {
    const auto idx = order(n, a.order, epoch++);
    std::vector<size_t> done(workers, 0);
    std::vector<double> bytes(workers, 0);
    if (a.threads == 0) {
      body(0, workers, idx, &done[0], &bytes[0]);
    } else {
      std::vector<std::thread> pool;
      for (size_t w = 0; w < workers; ++w)
        pool.emplace_back([&, w] { body(w, workers, idx, &done[w], &bytes[w]); });
      for (auto& t : pool) t.join();
    }
    for (size_t w = 0; w < workers; ++w) m.samples += done[w], m.bytes += bytes[w];
    m.wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (m.wall < a.seconds);
  m.finish(start);
  return m;
}

// liblmdb alone: the floor of any reader of this file.
Measure run_raw(const Args& a) {
  MDB_env* env = nullptr;
  check(mdb_env_create(&env), "mdb_env_create");
  check(mdb_env_set_maxdbs(env, 4), "mdb_env_set_maxdbs");
  check(mdb_env_set_maxreaders(env, 256), "mdb_env_set_maxreaders");
  check(mdb_env_open(env, a.path.c_str(), MDB_RDONLY | MDB_NOTLS | MDB_NORDAHEAD, 0644), "mdb_env_open");
  MDB_txn* txn = nullptr;
  MDB_dbi dbi;
  check(mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn), "mdb_txn_begin");
  check(mdb_dbi_open(txn, "samples", 0, &dbi), "mdb_dbi_open");
  MDB_stat st;
  check(mdb_stat(txn, dbi, &st), "mdb_stat");
  check(mdb_txn_commit(txn), "mdb_txn_commit");  // keeps the dbi handle (an abort would discard it)
  const size_t n = st.ms_entries;
  auto body = [&](size_t w, size_t workers, const std::vector<size_t>& idx, size_t* done, double* bytes) {
    MDB_txn* t = nullptr;
    check(mdb_txn_begin(env, nullptr, MDB_RDONLY, &t), "mdb_txn_begin");
    mdb_txn_reset(t);
    // A page-aligned destination placed half a page away from the source
    // within the page (what torch_lmdb does too): avoids 4K aliasing.
    std::vector<char> storage;
    for (size_t start = w * a.batch; start < idx.size(); start += workers * a.batch) {
      check(mdb_txn_renew(t), "mdb_txn_renew");
      const size_t stop = std::min(idx.size(), start + a.batch);
      size_t offset = 0;
      char* buffer = nullptr;
      for (size_t i = start; i < stop; ++i) {
        uint64_t k = idx[i];
        unsigned char key_bytes[8];
        for (int b = 7; b >= 0; --b, k >>= 8) key_bytes[b] = static_cast<unsigned char>(k & 0xff);
        MDB_val key{8, key_bytes}, value;
        check(mdb_get(t, dbi, &key, &value), "mdb_get");
        if (buffer == nullptr) {
          const size_t need = (stop - start) * value.mv_size * 2 + 8192;
          if (storage.size() < need) storage.assign(need, 0);
          const uintptr_t base = (reinterpret_cast<uintptr_t>(storage.data()) + 4095) / 4096 * 4096;
          buffer = reinterpret_cast<char*>(base + (reinterpret_cast<uintptr_t>(value.mv_data) + 2048) % 4096);
        }
        if (offset + value.mv_size > storage.size() - 8192) offset = 0;  // a sink: overwrite when full
        std::memcpy(buffer + offset, value.mv_data, value.mv_size);
        offset += value.mv_size;
        *bytes += value.mv_size;
      }
      mdb_txn_reset(t);
      *done += stop - start;
    }
    mdb_txn_abort(t);
  };
  {  // warm-up epoch, as the loaders get: maps the file's pages into this process
    size_t d = 0;
    double b = 0;
    body(0, 1, order(n, "sequential", 0), &d, &b);
  }
  const Measure m = run_epochs(a, n, body);
  mdb_env_close(env);
  return m;
}

// The memcpy ceiling: each sample's payload (the bytes of its tensors) gathered
// in the same order from an in-memory copy of the dataset into a reused,
// page-aligned destination, T threads (0 = the calling thread).
Measure run_memcpy(const Args& a) {
  torch_lmdb::Reader reader(a.path);
  size_t row = 0;
  for (const auto& f : reader.schema()) {
    size_t bytes = c10::elementSize(f.dtype);
    for (int64_t d : f.shape) {
      if (d < 0) throw std::invalid_argument("memcpy mode needs fixed shapes");
      bytes *= static_cast<size_t>(d);
    }
    row += bytes;
  }
  const size_t n = reader.size();
  std::vector<char> source(n * row + 4096, 1);
  auto body = [&](size_t w, size_t workers, const std::vector<size_t>& idx, size_t* done, double* bytes) {
    std::vector<char> storage(a.batch * row + 8192, 0);
    char* dst = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(storage.data()) + 4095) / 4096 * 4096 + 2048);
    for (size_t start = w * a.batch; start < idx.size(); start += workers * a.batch) {
      const size_t stop = std::min(idx.size(), start + a.batch);
      for (size_t i = start; i < stop; ++i) std::memcpy(dst + (i - start) * row, source.data() + idx[i] * row, row);
      *done += stop - start;
      *bytes += (stop - start) * row;
    }
  };
  return run_epochs(a, n, body);
}

template <typename Loader, typename Count>
Measure run_loader(Loader& loader, const Args& a, Count count) {
  if (!a.cold) {
    for (auto& b : *loader) (void)b;  // warm-up epoch
  }
  Measure m;
  const Usage start = usage();
  auto t0 = std::chrono::steady_clock::now();
  do {
    for (auto& b : *loader) {
      auto [samples, bytes] = count(b);
      m.samples += samples;
      m.bytes += bytes;
      // Cold: stop at the budget within the first epoch (a second one would read cached pages).
      if (a.cold && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >= a.seconds) break;
    }
    m.wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (!a.cold && m.wall < a.seconds);
  m.finish(start);
  return m;
}

std::pair<double, double> tensor_bytes(const torch_lmdb::Sample& batch) {
  double bytes = 0, samples = 0;
  for (const auto& item : batch) {
    bytes += item.value().nbytes();
    samples = item.value().size(0);
  }
  return {samples, bytes};
}

template <typename Sampler, typename Dataset>
Measure run_mode(Dataset&& ds, size_t n, const Args& a) {
  auto opts = torch::data::DataLoaderOptions().batch_size(a.batch).workers(a.threads).enforce_ordering(false);
  auto loader = torch::data::make_data_loader(std::forward<Dataset>(ds), Sampler(n), opts);
  return run_loader(loader, a, [](const torch_lmdb::Sample& b) { return tensor_bytes(b); });
}

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--path") a.path = v;
    else if (k == "--mode") a.mode = v;
    else if (k == "--threads") a.threads = std::stoul(v);
    else if (k == "--batch") a.batch = std::stoul(v);
    else if (k == "--order") a.order = v;
    else if (k == "--seconds") a.seconds = std::stod(v);
    else if (k == "--pad") a.pad = v == "1";
    else if (k == "--cold") a.cold = v == "1";
    else if (k == "--cache-dir") a.cache_dir = v;
    else if (k == "--keep-cache") a.keep_cache = v == "1" ? 1 : 0;
    else if (k == "--direct-reads") a.direct_reads = v == "1" ? 1 : 0;
    else if (k == "--cache-limit") a.cache_limit = std::stoull(v);
    else if (k == "--batches-ahead" || k == "--prefetch") a.batches_ahead = std::stoul(v);
    else if (k == "--verify") a.verify = v == "1" ? 1 : 0;
    else throw std::invalid_argument("unknown option " + k);
  }
  if (a.path.empty()) throw std::invalid_argument("--path is required");
  torch::set_num_threads(1);
  Measure m;
  if (a.mode == "raw") {
    m = run_raw(a);
  } else if (a.mode == "memcpy") {
    m = run_memcpy(a);
  } else {
    namespace samplers = torch::data::samplers;
    const bool shuffled = a.order == "shuffled" || a.order == "block";
    if (a.mode == "get_batch") {
      torch_lmdb::BatchOptions bo;
      bo.pad = a.pad;
      torch_lmdb::StackedDataset ds(a.path, reader_options(a), bo);
      const size_t n = *ds.size();
      m = shuffled ? run_mode<samplers::RandomSampler>(std::move(ds), n, a)
                   : run_mode<samplers::SequentialSampler>(std::move(ds), n, a);
    } else if (a.mode == "get_stack") {
      torch_lmdb::Dataset ds(a.path, reader_options(a));
      const size_t n = *ds.size();
      m = shuffled ? run_mode<samplers::RandomSampler>(ds.map(torch_lmdb::Stack(a.pad)), n, a)
                   : run_mode<samplers::SequentialSampler>(ds.map(torch_lmdb::Stack(a.pad)), n, a);
    } else if (a.mode == "loader") {
      torch_lmdb::LoaderOptions lo;
      lo.batch_size = a.batch;
      lo.shuffle = shuffled;
      lo.threads = std::max<size_t>(a.threads, 1);
      if (a.batches_ahead > 0) lo.batches_ahead = a.batches_ahead;
      lo.batch.pad = a.pad;
      lo.reader = reader_options(a);
      if (a.order == "block") lo.block_size = 1024;  // (4 blocks a window)
      auto loader = torch_lmdb::make_loader(a.path, lo);
      m = run_loader(loader, a, [](const torch_lmdb::Batch& b) { return tensor_bytes(b.tensors); });
    } else {
      throw std::invalid_argument("unknown mode " + a.mode);
    }
  }
  std::printf("{\"mode\": \"%s\", \"threads\": %zu, \"batch\": %zu, \"order\": \"%s\", \"samples_per_s\": %.1f, "
              "\"bytes_per_s\": %.1f, \"cpu_us_per_sample\": %.3f, \"major_faults\": %.0f, \"minor_faults\": %.0f}\n",
              a.mode.c_str(), a.threads, a.batch, a.order.c_str(), m.samples / m.wall, m.bytes / m.wall,
              1e6 * m.used.cpu / m.samples, m.used.major_faults, m.used.minor_faults);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "torch_lmdb_bench_read: error: %s\n", e.what());
  return 1;
}
