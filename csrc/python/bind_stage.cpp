// torch_lmdb._C.ShardCache and the staging helpers (detail/stage.h): a shard
// directory at a URL or on a shared file system, staged to a local cache.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "torch_lmdb/detail/stage.h"

namespace py = pybind11;
using torch_lmdb::detail::ShardCache;
using torch_lmdb::detail::StageOptions;

void bind_stage(py::module_& m) {
  m.def("is_url", &torch_lmdb::detail::is_url, py::arg("path"));
  m.def("parse_bytes", &torch_lmdb::detail::parse_bytes, py::arg("text"));
  m.def("file_xxh3", &torch_lmdb::detail::file_xxh3, py::arg("path"), py::call_guard<py::gil_scoped_release>());

  py::class_<ShardCache>(m, "ShardCache")
      .def(py::init([](const std::string& source, const std::string& cache_dir, uint64_t cache_limit,
                       unsigned transfers, unsigned retries, unsigned hash_retries, double stall_seconds,
                       double manifest_ttl) {
             StageOptions o;
             o.cache_dir = cache_dir;
             o.cache_limit = cache_limit;
             o.transfers = transfers;
             o.retries = retries;
             o.hash_retries = hash_retries;
             o.stall_seconds = stall_seconds;
             o.manifest_ttl = manifest_ttl;
             py::gil_scoped_release release;
             return new ShardCache(source, o);
           }),
           py::arg("source"), py::arg("cache_dir"), py::arg("cache_limit") = 0, py::arg("transfers") = 4,
           py::arg("retries") = 6, py::arg("hash_retries") = 2, py::arg("stall_seconds") = 30.0,
           py::arg("manifest_ttl") = 60.0)
      .def_property_readonly("source", &ShardCache::source)
      .def_property_readonly("local_dir", &ShardCache::local_dir)
      .def_property_readonly("manifest_json", &ShardCache::manifest_json)
      .def("shards",
           [](const ShardCache& c) {
             py::list out;
             for (const auto& s : c.shards()) {
               py::dict d;
               d["path"] = s.path;
               d["num_samples"] = s.num_samples;
               d["size"] = s.size;
               d["data_xxh3_64"] = s.hash;
               out.append(d);
             }
             return out;
           })
      .def("total_bytes", &ShardCache::total_bytes)
      .def("acquire", &ShardCache::acquire, py::arg("shard"), py::call_guard<py::gil_scoped_release>())
      .def("release", &ShardCache::release, py::arg("shard"), py::arg("unread") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("acquire_all", &ShardCache::acquire_all, py::call_guard<py::gil_scoped_release>())
      .def("prefetch", &ShardCache::prefetch, py::arg("shards"), py::call_guard<py::gil_scoped_release>())
      .def("cached_bytes", &ShardCache::cached_bytes, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const ShardCache& c) {
        const auto s = c.stats();
        py::dict d;
        d["bytes_fetched"] = s.bytes_fetched;
        d["shards_fetched"] = s.shards_fetched;
        d["fetch_seconds"] = s.fetch_seconds;
        d["cache_hits"] = s.cache_hits;
        d["evictions"] = s.evictions;
        d["retries"] = s.retries;
        d["hash_failures"] = s.hash_failures;
        d["prefetch_skipped"] = s.prefetch_skipped;
        d["cache_scans"] = s.cache_scans;
        return d;
      });
}
