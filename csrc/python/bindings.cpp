// With bind_writer.cpp, the only files that include pybind11 /
// <torch/extension.h>: a thin module (torch_lmdb._C) over the C++ library.
// The GIL is released around every read, decode, copy and write.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>

#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/shm_slabs.h"
#include "torch_lmdb/detail/windows.h"
#include "torch_lmdb/torch_lmdb.h"

namespace py = pybind11;
using namespace torch_lmdb;

namespace {

// Collects warnings from C++ so the Python layer can issue warnings.warn.
struct WarningSink {
  std::mutex mutex;
  std::vector<std::string> messages;
  std::function<void(const std::string&)> callback() {
    return [this](const std::string& m) {
      std::lock_guard<std::mutex> g(mutex);
      messages.push_back(m);
    };
  }
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> g(mutex);
    std::vector<std::string> out;
    out.swap(messages);
    return out;
  }
};

// A str field's bytes as a Python str; bytes that are not UTF-8 (a damaged
// record read without verify) raise CorruptedError naming the field and where.
py::object decode_str(const char* p, size_t n, const std::string& name, const std::string& where) {
  PyObject* text = PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(n), "strict");
  if (text == nullptr) {
    PyErr_Clear();
    throw CorruptedError("str field '" + name + "' of " + where + " is not valid UTF-8 (a damaged record; " +
                             "read with verify=True or run `torch-lmdb verify`)",
                         0, where);
  }
  return py::reinterpret_steal<py::object>(text);
}

// A field name from a record; not UTF-8: CorruptedError.
py::str name_to_py(const std::string& name, const std::string& where) {
  return decode_str(name.data(), name.size(), "<name>", where);
}

py::object field_to_py(const std::string& bytes, FieldKind kind, const std::string& name, const std::string& where) {
  if (kind == FieldKind::Str) return decode_str(bytes.data(), bytes.size(), name, where);
  return py::bytes(bytes.data(), bytes.size());
}

py::object field_to_py(const Field& f, const std::string& where) {
  if (f.kind == FieldKind::Tensor) return py::cast(f.tensor);
  const char* p = static_cast<const char*>(f.tensor.data_ptr());
  const size_t n = static_cast<size_t>(f.tensor.numel());
  if (f.kind == FieldKind::Str) return decode_str(p, n, f.name, where);
  return py::bytes(p, n);
}

// A collated batch as a dict: tensors, `<name>_lengths`, str/bytes lists.
py::dict batch_to_py(const Batch& batch, const std::string& where) {
  py::dict out;
  for (const auto& name : batch.order) {
    if (const at::Tensor* t = batch.tensors.find(name)) {
      out[py::str(name)] = *t;
      if (const at::Tensor* len = batch.tensors.find(name + "_lengths")) out[py::str(name + "_lengths")] = *len;
      continue;
    }
    for (const auto& b : batch.blobs) {
      if (b.name != name) continue;
      py::list values;
      for (const auto& v : b.values) values.append(field_to_py(v, b.kind, b.name, where));
      out[py::str(name)] = values;
    }
  }
  return out;
}

// The core's messages name C++ options; Python users get the Python names.
static std::string python_wording(std::string text) {
  static const std::pair<const char*, const char*> kNames[] = {
      {"set BatchOptions::pad (or name it in BatchOptions::pad_fields)",
       "pass pad=True (or pad=[names]) to LMDBDataset, get_batch, iter_batches or make_loader (a drop-in "
       "DataLoader: collate_fn=ds.collate)"},
  };
  for (const auto& [cpp, py] : kNames) {
    for (size_t at = text.find(cpp); at != std::string::npos; at = text.find(cpp, at + std::strlen(py)))
      text.replace(at, std::strlen(cpp), py);
  }
  return text;
}

// Runs a read of the core, its ValueErrors reworded for Python.
template <typename F>
auto python_errors(F&& read) {
  try {
    return read();
  } catch (const c10::ValueError& e) {
    throw py::value_error(python_wording(e.what_without_backtrace()));
  }
}

struct PyReader {
  std::shared_ptr<WarningSink> sink = std::make_shared<WarningSink>();
  std::unique_ptr<Reader> reader;

  PyReader(std::vector<std::string> paths, bool verify, std::optional<bool> lock, bool os_readahead,
           unsigned max_readers, std::vector<std::string> fields, size_t page_request_bytes, bool keep_cache,
           const std::string& page_requests, unsigned decode_threads, bool direct_reads) {
    ReaderOptions o;
    o.decode_threads = decode_threads;
    if (page_requests == "auto") {
      o.page_requests = PageRequests::Auto;
    } else if (page_requests == "always") {
      o.page_requests = PageRequests::Always;
    } else if (page_requests == "never") {
      o.page_requests = PageRequests::Never;
    } else {
      throw py::value_error("page_requests must be 'auto', 'always' or 'never', got '" + page_requests + "'");
    }
    o.page_request_bytes = page_request_bytes;
    o.keep_cache = keep_cache;
    o.direct_reads = direct_reads;
    o.verify = verify;
    o.lock = lock.has_value() ? (*lock ? 1 : 0) : -1;
    o.os_readahead = os_readahead;
    o.max_readers = max_readers;
    o.fields = std::move(fields);
    auto s = sink;
    o.warn = [s](const std::string& m) { s->callback()(m); };
    py::gil_scoped_release nogil;
    reader = std::make_unique<Reader>(std::move(paths), std::move(o));
  }

  py::dict get(int64_t index) {
    std::vector<Field> fields;
    {
      py::gil_scoped_release nogil;
      fields = reader->get_fields(static_cast<size_t>(index));
    }
    py::dict out;
    const std::string where = "'" + reader->paths()[0] + "'" + (reader->paths().size() > 1 ? " (+ more files)" : "") +
                              " index " + std::to_string(index);
    for (const auto& f : fields) out[name_to_py(f.name, where)] = field_to_py(f, where);
    return out;
  }

  // `slabs` (a worker's SlabPool) serves the output tensors in C++; when it
  // has no free slab, `allocator(shape, dtype_name)` (Python, with the GIL)
  // does; neither: ordinary tensors.
  py::dict get_batch(const std::vector<int64_t>& indices, bool pad, std::vector<std::string> pad_fields,
                     double pad_value, py::object allocator, SlabPool* slabs) {
    std::vector<size_t> idx(indices.begin(), indices.end());
    BatchOptions o;
    o.pad = pad;
    o.pad_fields = std::move(pad_fields);
    o.pad_value = pad_value;
    std::function<at::Tensor(at::IntArrayRef, at::ScalarType)> from_python;
    if (!allocator.is_none()) {
      from_python = [allocator](at::IntArrayRef shape, at::ScalarType dtype) {
        py::gil_scoped_acquire gil;
        py::object t = allocator(py::cast(shape.vec()), py::str(dtype_name(dtype)));
        return t.cast<at::Tensor>();
      };
    }
    if (slabs != nullptr) {
      o.allocate = [slabs, from_python](at::IntArrayRef shape, at::ScalarType dtype) {
        at::Tensor t = slabs->allocate(shape, dtype);
        if (t.defined()) return t;
        return from_python ? from_python(shape, dtype) : at::empty(shape, at::TensorOptions().dtype(dtype));
      };
    } else {
      o.allocate = from_python;
    }
    Batch batch;
    {
      py::gil_scoped_release nogil;
      batch = python_errors([&] { return reader->read_batch(idx, o); });
    }
    return batch_to_py(batch, "a batch of '" + reader->paths()[0] + "'");
  }

  py::list schema() const {
    py::list out;
    for (const auto& f : reader->schema()) {
      py::dict d;
      d["name"] = f.name;
      d["kind"] = kind_name(f.kind);
      d["dtype"] = dtype_name(f.dtype);
      d["shape"] = f.shape;
      out.append(d);
    }
    return out;
  }
};

SampleOrder order_from_name(const std::string& order) {
  if (order == "sequential") return SampleOrder::Sequential;
  if (order == "shuffle") return SampleOrder::Shuffle;
  if (order == "block") return SampleOrder::BlockShuffle;
  throw py::value_error("order must be 'sequential', 'shuffle' or 'block', got '" + order + "'");
}

// Mixtures (mixture.h) and selections (selection.h): the rules live in the core;
// Python's Mixture and LMDBDataset.select/filter call these.
at::Tensor indices_to_tensor(const std::vector<uint64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

std::vector<uint64_t> tensor_to_indices(const at::Tensor& t, const char* what) {
  TORCH_CHECK_TYPE(t.dim() == 1 && t.scalar_type() == at::kLong, what, " must be a 1-dim int64 tensor, got ",
                   t.scalar_type(), " of shape ", t.sizes());
  const at::Tensor c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK_INDEX(p[i] >= 0, what, " position ", i, ": index ", p[i], " is negative");
  return std::vector<uint64_t>(p, p + c.numel());
}

void bind_compose(py::module_& m) {
  py::class_<Selection>(m, "Selection")
      .def(py::init([](const at::Tensor& indices, size_t num_samples, bool allow_duplicates) {
             return Selection(tensor_to_indices(indices, "a selection"), num_samples, allow_duplicates);
           }),
           py::arg("indices"), py::arg("num_samples"), py::arg("allow_duplicates") = false)
      .def("__len__", &Selection::size)
      .def("indices", [](const Selection& s) { return indices_to_tensor(s.indices()); })
      .def("sorted", &Selection::sorted);
  m.def("selection_path", &selection_path, py::arg("path"), py::arg("name"));
  m.def("list_selections", &list_selections, py::arg("path"));
  m.def("data_identity", [](const PyReader& r) { return data_identity(*r.reader); }, py::arg("reader"));
  m.def("save_selection", [](const std::string& file, const Selection& s, uint64_t n, uint64_t identity) {
    py::gil_scoped_release nogil;
    save_selection(file, s, n, identity);
  }, py::arg("file"), py::arg("selection"), py::arg("num_samples"), py::arg("identity"));
  m.def("load_selection", [](const std::string& file, uint64_t n, uint64_t identity) {
    py::gil_scoped_release nogil;
    return load_selection(file, n, identity);
  }, py::arg("file"), py::arg("num_samples"), py::arg("identity"));

  py::class_<MixtureSource>(m, "MixtureSource")
      .def(py::init([](std::vector<std::string> names, std::vector<size_t> sizes, std::vector<double> weights,
                       size_t epoch_size, bool stratified, size_t block_size, std::vector<size_t> offsets,
                       std::vector<std::optional<Selection>> selections) {
             MixtureSource m;
             m.rule.names = std::move(names);
             m.rule.sizes = std::move(sizes);
             m.rule.weights = std::move(weights);
             m.rule.epoch_size = epoch_size;
             m.rule.stratified = stratified;
             m.rule.block_size = block_size;
             m.offsets = std::move(offsets);
             m.selections = std::move(selections);
             return m;
           }),
           py::arg("names"), py::arg("sizes"), py::arg("weights"), py::arg("epoch_size"), py::arg("stratified"),
           py::arg("block_size"), py::arg("offsets"), py::arg("selections"));
  py::class_<MixtureOrder>(m, "MixtureOrder")
      .def(py::init([](std::vector<std::string> names, std::vector<size_t> sizes, std::vector<double> weights,
                       size_t epoch_size, bool stratified, size_t block_size, bool shuffle, uint64_t seed,
                       uint64_t epoch) {
             MixtureOptions o;
             o.names = std::move(names);
             o.sizes = std::move(sizes);
             o.weights = std::move(weights);
             o.epoch_size = epoch_size;
             o.stratified = stratified;
             o.block_size = block_size;
             o.shuffle = shuffle;
             return python_errors([&] { return MixtureOrder(std::move(o), seed, epoch); });
           }),
           py::arg("names"), py::arg("sizes"), py::arg("weights"), py::arg("epoch_size"), py::arg("stratified"),
           py::arg("block_size"), py::arg("shuffle"), py::arg("seed"), py::arg("epoch"))
      .def("__len__", &MixtureOrder::size)
      .def("weights", &MixtureOrder::weights)
      .def("cursors", &MixtureOrder::cursors, py::arg("position"))
      .def("locate", [](const MixtureOrder& o, size_t first, size_t count) {
        at::Tensor source = at::empty({static_cast<int64_t>(count)}, at::kLong);
        at::Tensor sample = at::empty({static_cast<int64_t>(count)}, at::kLong);
        {
          py::gil_scoped_release nogil;
          o.locate(first, count, source.data_ptr<int64_t>(), sample.data_ptr<int64_t>());
        }
        return py::make_tuple(source, sample);
      }, py::arg("first"), py::arg("count"), "(source, sample) int64 tensors of positions [first, first + count)");
  m.def("permute", &permute, py::arg("n"), py::arg("key"), py::arg("x"));
  m.def("rank_batches", &rank_batches, py::arg("n"), py::arg("batch_size"), py::arg("rank"), py::arg("world_size"),
        py::arg("start"), py::arg("drop_last"), "rank_plan's number of batches, in O(1) (stream.h)");
  m.def("rank_batch", [](size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last,
                         size_t k) {
    const RankBatch b = rank_batch(n, batch_size, rank, world_size, start, drop_last, k);
    return py::make_tuple(b.first, b.count, b.position_after, b.pad_index);
  }, py::arg("n"), py::arg("batch_size"), py::arg("rank"), py::arg("world_size"), py::arg("start"),
     py::arg("drop_last"), py::arg("k"), "(first, count, position_after, pad_index) of batch k alone (stream.h)");
}

// The Python classes of torch_lmdb's errors, one per row of errors.h's
// TORCH_LMDB_ERROR_CLASSES, made by register_errors (kept for the process's
// life, as the module holds them).
struct PyErrorClasses {
  PyObject* base = nullptr;  // torch_lmdb._C.Error
#define TORCH_LMDB_PY_FIELD(Class, os_errno, summary) PyObject* Class = nullptr;
  TORCH_LMDB_ERROR_CLASSES(TORCH_LMDB_PY_FIELD)
#undef TORCH_LMDB_PY_FIELD
};
PyErrorClasses py_errors;

// The exception class torch_lmdb._C.<name>, a subclass of `base` (and of
// OSError when `os_errno` is not 0), set on the module.
PyObject* make_error_class(py::module_& m, const char* name, PyObject* base, int os_errno, const char* doc) {
  const std::string qualified = m.attr("__name__").cast<std::string>() + "." + name;
  PyObject* bases = os_errno != 0 ? PyTuple_Pack(2, base, PyExc_OSError) : PyTuple_Pack(1, base);
  if (bases == nullptr) throw py::error_already_set();
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  Py_DECREF(bases);
  if (type == nullptr) throw py::error_already_set();
  m.attr(name) = py::reinterpret_borrow<py::object>(type);
  return type;
}

// Raises `e` as the Python class `type`; an OSError one (os_errno not 0) gets
// errno, strerror and filename (the database), as Python users catch OSErrors.
void raise_as(PyObject* type, const Error& e, int os_errno) {
  if (os_errno == 0) {
    PyErr_SetString(type, e.what());
    return;
  }
  py::object exc = py::reinterpret_borrow<py::object>(type)(py::str(e.what()));
  exc.attr("errno") = os_errno;
  exc.attr("strerror") = py::str(e.what());
  exc.attr("filename") = py::str(e.path());
  PyErr_SetObject(type, exc.ptr());
}

// The exception classes of torch_lmdb._C (read from the one table of
// errors.h; their names in ERROR_CLASSES, for torch_lmdb/__init__.py) and
// the translation of C++ errors to them and to Python's built-in classes.
void register_errors(py::module_& m) {
  py_errors.base = make_error_class(m, "Error", PyExc_RuntimeError, 0, nullptr);
  py::list names;
  names.append("Error");
#define TORCH_LMDB_PY_CLASS(Class, os_errno, summary)                                   \
  py_errors.Class = make_error_class(m, #Class, py_errors.base, os_errno, summary); \
  names.append(#Class);
  TORCH_LMDB_ERROR_CLASSES(TORCH_LMDB_PY_CLASS)
#undef TORCH_LMDB_PY_CLASS
  m.attr("ERROR_CLASSES") = py::tuple(names);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    }
#define TORCH_LMDB_PY_CATCH(Class, os_errno, summary) \
    catch (const Class& e) {                           \
      raise_as(py_errors.Class, e, os_errno);          \
    }
    TORCH_LMDB_ERROR_CLASSES(TORCH_LMDB_PY_CATCH)
#undef TORCH_LMDB_PY_CATCH
    catch (const Error& e) {
      raise_as(py_errors.base, e, 0);
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
}

void bind_reader(py::module_& m) {
  py::class_<PyReader>(m, "Reader")
      .def(py::init<std::vector<std::string>, bool, std::optional<bool>, bool, unsigned,
                    std::vector<std::string>, size_t, bool, std::string, unsigned, bool>(),
           py::arg("paths"), py::arg("verify") = true, py::arg("lock") = py::none(),
           py::arg("os_readahead") = false, py::arg("max_readers") = 1024,
           py::arg("fields") = std::vector<std::string>(), py::arg("page_request_bytes") = size_t{128} << 20,
           py::arg("keep_cache") = true, py::arg("page_requests") = "auto", py::arg("decode_threads") = 0,
           py::arg("direct_reads") = true)
      .def("io_stats",
           [](const PyReader& r) {
             const Reader::IoStats st = r.reader->io_stats();
             py::dict d;
             d["batches"] = st.batches;
             d["page_request_batches"] = st.page_request_batches;
             d["pages_requested"] = st.pages_requested;
             d["pages_requested_ahead"] = st.pages_requested_ahead;
             d["request_pages_calls"] = st.request_pages_calls;
             d["direct_records"] = st.direct_records;
             d["window_records"] = st.window_records;
             d["window_bytes"] = st.window_bytes;
             // The old names of the three renamed counters, for a release.
             d["lookahead_batches"] = st.page_request_batches;
             d["pages_prefetched"] = st.pages_requested_ahead;
             d["prefetches"] = st.request_pages_calls;
             return d;
           })
      .def("__len__", [](const PyReader& r) { return r.reader->size(); })
      .def("get", &PyReader::get, py::arg("index"))
      .def("get_batch", &PyReader::get_batch, py::arg("indices"), py::arg("pad") = false,
           py::arg("pad_fields") = std::vector<std::string>(), py::arg("pad_value") = 0.0,
           py::arg("allocator") = py::none(), py::arg("slabs") = nullptr)
      .def("schema", &PyReader::schema)
      .def("metadata_json", [](const PyReader& r, size_t file) { return r.reader->metadata_json(file); },
           py::arg("file") = 0)
      .def_property_readonly("paths", [](const PyReader& r) { return r.reader->paths(); })
      .def("file_sizes", [](const PyReader& r) { return r.reader->file_sizes(); })
      .def("reader_count", [](const PyReader& r, size_t file) { return r.reader->reader_count(file); },
           py::arg("file") = 0)
      .def_property_readonly("complete", [](const PyReader& r) { return r.reader->complete(); })
      .def("map_size", [](const PyReader& r, size_t file) { return r.reader->map_size(file); },
           py::arg("file") = 0)
      .def("take_warnings", [](PyReader& r) { return r.sink->take(); });

}

// BatchStream and the rules of an epoch's order (stream.h).
void bind_stream(py::module_& m) {
  py::class_<BatchStream>(m, "BatchStream")
      .def(py::init([](const PyReader& r, size_t batch_size, const std::string& order, uint64_t seed, bool drop_last,
                       size_t batches_ahead, size_t threads, size_t block_size, size_t window_blocks, bool pad,
                       std::vector<std::string> pad_fields, double pad_value, uint64_t epoch, size_t rank,
                       size_t world_size, size_t start, std::optional<Selection> selection,
                       std::optional<MixtureSource> mixture) {
             StreamOptions o;
             o.batch_size = batch_size;
             o.order = order_from_name(order);
             o.seed = seed;
             o.drop_last = drop_last;
             o.batches_ahead = batches_ahead;
             o.threads = threads;
             o.block_size = block_size;
             o.window_blocks = window_blocks;
             o.batch.pad = pad;
             o.batch.pad_fields = std::move(pad_fields);
             o.batch.pad_value = pad_value;
             o.epoch = epoch;
             o.rank = rank;
             o.world_size = world_size;
             o.start = start;
             o.selection = std::move(selection);
             o.mixture = std::move(mixture);
             const Reader reader = *r.reader;
             py::gil_scoped_release nogil;
             return std::make_unique<BatchStream>(reader, std::move(o));
           }),
           py::arg("reader"), py::arg("batch_size"), py::arg("order"), py::arg("seed"), py::arg("drop_last"),
           py::arg("batches_ahead"), py::arg("threads"), py::arg("block_size"), py::arg("window_blocks"), py::arg("pad"),
           py::arg("pad_fields"), py::arg("pad_value"), py::arg("epoch") = 0, py::arg("rank") = 0,
           py::arg("world_size") = 1, py::arg("start") = 0, py::arg("selection") = py::none(),
           py::arg("mixture") = py::none())
      .def("next", [](BatchStream& s) -> py::object {
        std::optional<Batch> b;
        {
          py::gil_scoped_release nogil;
          b = python_errors([&] { return s.next(); });
        }
        if (!b) return py::none();
        return batch_to_py(*b, "a batch of the stream");
      })
      .def("__len__", &BatchStream::size)
      .def("position", &BatchStream::position)
      .def("delivered", &BatchStream::delivered)
      .def("num_samples", &BatchStream::num_samples)
      .def("batch_indices", &BatchStream::batch_indices, py::arg("k"));
  m.def("epoch_seed", [](uint64_t seed, uint64_t epoch) { return epoch_seed(seed, epoch); }, py::arg("seed"),
        py::arg("epoch"), "the seed of an epoch's order (stream.h)");
  m.def("sample_order", [](size_t n, const std::string& order, uint64_t seed, size_t block_size,
                           size_t window_blocks) {
    const SampleOrder o = order_from_name(order);
    std::vector<size_t> v;
    {
      py::gil_scoped_release nogil;
      v = sample_order(n, o, seed, block_size, window_blocks);
    }
    at::Tensor t = at::empty({static_cast<int64_t>(n)}, at::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  }, py::arg("n"), py::arg("order"), py::arg("seed"), py::arg("block_size") = 1024, py::arg("window_blocks") = 4,
     "an epoch's sample order (int64 tensor), as BatchStream draws it");
  m.def("rank_plan", [](size_t n, size_t batch_size, size_t rank, size_t world_size, size_t start, bool drop_last) {
    const RankPlan p = rank_plan(n, batch_size, rank, world_size, start, drop_last);
    return py::make_tuple(p.first, p.count, p.position_after, p.pad_index);
  }, py::arg("n"), py::arg("batch_size"), py::arg("rank"), py::arg("world_size"), py::arg("start"),
     py::arg("drop_last"), "(first, count, position_after, pad_index) of a rank's batches (stream.h)");
  m.def("shard_window_order", [](const std::vector<uint64_t>& counts, size_t window, uint64_t seed, bool shuffle) {
    std::vector<int64_t> visit;
    std::vector<int64_t> order;
    {
      py::gil_scoped_release nogil;
      order = torch_lmdb::detail::shard_window_order(counts, window, seed, shuffle, &visit);
    }
    at::Tensor t = at::empty({static_cast<int64_t>(order.size())}, at::kLong);
    std::copy(order.begin(), order.end(), t.data_ptr<int64_t>());
    return py::make_tuple(t, visit);
  }, py::arg("counts"), py::arg("window"), py::arg("seed"), py::arg("shuffle") = true,
     "(sample order as an int64 tensor, shards in visiting order) of an epoch in shard windows (detail/windows.h)");
  m.def("choose_shard_window", [](const std::vector<uint64_t>& sizes, uint64_t limit, size_t window,
                                  int64_t predownload, const std::string& source) {
    const torch_lmdb::detail::WindowChoice c = torch_lmdb::detail::choose_shard_window(sizes, limit, window, predownload, source);
    return py::make_tuple(c.window, c.predownload);
  }, py::arg("sizes"), py::arg("limit"), py::arg("window"), py::arg("predownload"), py::arg("source"),
     "(shard_window, predownload) a cache of `limit` bytes allows (window 0, predownload -1: the defaults)");
}

// Worker-batch transport (csrc/torch_lmdb/detail/shm_slabs.h): a ticket crosses
// as (pid, slab, generation, fd or -1, nbytes, sizes, strides, offset, dtype).
void bind_slabs(py::module_& m) {
  py::class_<SlabPool>(m, "SlabPool")
      .def(py::init<size_t>(), py::arg("max_slabs"))
      .def("send", [](SlabPool& p, const at::Tensor& t) -> py::object {
        const auto ticket = p.send(t);
        if (!ticket) return py::none();
        return py::make_tuple(ticket->pid, ticket->slab, ticket->generation, ticket->fd, ticket->nbytes,
                              ticket->sizes, ticket->strides, ticket->storage_offset, dtype_name(ticket->dtype));
      }, py::arg("tensor"), "the ticket of a tensor of one of this pool's slabs, else None")
      .def("owns", &SlabPool::owns, py::arg("tensor"))
      .def("busy", &SlabPool::busy)
      .def("__len__", &SlabPool::size);
  m.def("slab_attach", [](int64_t pid, size_t slab, int fd) { SlabReceiver::instance().attach(pid, slab, fd); },
        py::arg("pid"), py::arg("slab"), py::arg("fd"), "maps a worker's slab; takes ownership of fd");
  m.def("slab_receive", [](int64_t pid, size_t slab, uint64_t generation, size_t nbytes, std::vector<int64_t> sizes,
                           std::vector<int64_t> strides, int64_t offset, const std::string& dtype) {
    SlabTicket t;
    t.pid = pid;
    t.slab = slab;
    t.generation = generation;
    t.nbytes = nbytes;
    t.sizes = std::move(sizes);
    t.strides = std::move(strides);
    t.storage_offset = offset;
    t.dtype = dtype_from_name(dtype);
    return SlabReceiver::instance().receive(t);
  });
  m.def("slab_count", [] { return SlabReceiver::instance().size(); },
        "worker batch buffers mapped in this process (a diagnostic)");
}

// Checks of a database's files and metadata that need no Reader.
void bind_checks(py::module_& m) {
  m.def("meta_pages_problem", [](const std::string& path) -> py::object {
          const std::string why = torch_lmdb::detail::meta_pages_problem(path + "/data.mdb");
          return why.empty() ? py::object(py::none()) : py::object(py::str(why));
        }, py::arg("path"),
        "why a database's data.mdb cannot be mapped safely (its meta pages, read without a map), or None");
  m.def("metadata_checksum", &torch_lmdb::metadata_checksum, py::arg("meta_json"),
        "xxh3-64 (16 hex digits) of a metadata JSON text, as a shard manifest stores it");
}

}  // namespace

// bind_writer.cpp: torch_lmdb._C.Writer.
void bind_writer(py::module_& m);
// bind_stage.cpp: torch_lmdb._C.ShardCache and the staging helpers.
void bind_stage(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_lmdb C++ core (use the torch_lmdb package, not this module)";
  m.attr("__version__") = TORCH_LMDB_VERSION;
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.attr("COMPACT_FORMAT_VERSION") = kCompactFormatVersion;
  m.attr("MAX_SAMPLES_PER_VALUE") = kMaxSamplesPerValue;
  m.attr("MAX_COMPRESS_THREADS") = kMaxCompressThreads;

  register_errors(m);
  bind_reader(m);
  bind_writer(m);
  bind_stage(m);
  bind_stream(m);
  bind_slabs(m);
  bind_checks(m);
  bind_compose(m);
}
