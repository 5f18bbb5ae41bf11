// The only file that includes pybind11 / <torch/extension.h>: a thin module
// (torch_lmdb._C) over the C++ library. The GIL is released around every
// read, decode, copy and write.
#include <torch/extension.h>

#include <memory>
#include <mutex>
#include <optional>

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

py::object field_to_py(const std::string& bytes, FieldKind kind) {
  if (kind == FieldKind::Str) return py::str(bytes.data(), bytes.size());
  return py::bytes(bytes.data(), bytes.size());
}

py::object field_to_py(const Field& f) {
  if (f.kind == FieldKind::Tensor) return py::cast(f.tensor);
  const char* p = static_cast<const char*>(f.tensor.data_ptr());
  const size_t n = static_cast<size_t>(f.tensor.numel());
  if (f.kind == FieldKind::Str) return py::str(p, n);
  return py::bytes(p, n);
}

struct PyReader {
  std::shared_ptr<WarningSink> sink = std::make_shared<WarningSink>();
  std::unique_ptr<Reader> reader;

  PyReader(std::vector<std::string> paths, bool verify, std::optional<bool> lock, bool readahead,
           unsigned max_readers, std::vector<std::string> fields) {
    ReaderOptions o;
    o.verify = verify;
    o.lock = lock.has_value() ? (*lock ? 1 : 0) : -1;
    o.readahead = readahead;
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
    for (const auto& f : fields) out[py::str(f.name)] = field_to_py(f);
    return out;
  }

  py::dict get_batch(const std::vector<int64_t>& indices, bool pad, std::vector<std::string> pad_fields,
                     double pad_value, py::object allocator) {
    std::vector<size_t> idx(indices.begin(), indices.end());
    BatchOptions o;
    o.pad = pad;
    o.pad_fields = std::move(pad_fields);
    o.pad_value = pad_value;
    if (!allocator.is_none()) {
      o.allocate = [allocator](at::IntArrayRef shape, at::ScalarType dtype) {
        py::gil_scoped_acquire gil;
        py::object t = allocator(py::cast(shape.vec()), py::str(dtype_name(dtype)));
        return t.cast<at::Tensor>();
      };
    }
    Batch batch;
    {
      py::gil_scoped_release nogil;
      batch = reader->read_batch(idx, o);
    }
    py::dict out;
    for (const auto& name : batch.order) {
      if (const at::Tensor* t = batch.tensors.find(name)) {
        out[py::str(name)] = *t;
        if (const at::Tensor* len = batch.tensors.find(name + "_lengths"))
          out[py::str(name + "_lengths")] = *len;
        continue;
      }
      for (const auto& b : batch.blobs) {
        if (b.name != name) continue;
        py::list values;
        for (const auto& v : b.values) values.append(field_to_py(v, b.kind));
        out[py::str(name)] = values;
      }
    }
    return out;
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

struct PyWriter {
  std::unique_ptr<Writer> writer;
  std::string path;

  Writer& get() {
    TORCH_CHECK_VALUE(writer != nullptr, "the writer of '", path, "' is closed");
    return *writer;
  }

  PyWriter(const std::string& path, bool append, size_t map_size, size_t commit_every, size_t commit_bytes,
           bool checksum, bool auto_grow, const std::string& user_json) {
    WriterOptions o;
    o.append = append;
    o.map_size = map_size;
    o.commit_every = commit_every;
    o.commit_bytes = commit_bytes;
    o.checksum = checksum;
    o.auto_grow = auto_grow;
    o.user_json = user_json;
    this->path = path;
    py::gil_scoped_release nogil;
    writer = std::make_unique<Writer>(path, std::move(o));
  }

  // fields: list of (name, kind, tensor or bytes)
  size_t write(const py::list& items) {
    std::vector<Field> fields;
    fields.reserve(items.size());
    for (const auto& item : items) {
      auto tup = item.cast<py::tuple>();
      Field f;
      f.name = tup[0].cast<std::string>();
      f.kind = static_cast<FieldKind>(tup[1].cast<int>());
      if (f.kind == FieldKind::Tensor) {
        f.tensor = tup[2].cast<at::Tensor>();
      } else {
        char* data = nullptr;
        Py_ssize_t len = 0;
        if (PyBytes_AsStringAndSize(tup[2].ptr(), &data, &len) != 0) throw py::error_already_set();
        f.tensor = at::empty({static_cast<int64_t>(len)}, at::kByte);
        if (len > 0) std::memcpy(f.tensor.data_ptr(), data, static_cast<size_t>(len));
      }
      fields.push_back(std::move(f));
    }
    Writer& w = get();
    py::gil_scoped_release nogil;
    return w.write(fields);
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_lmdb C++ core (use the torch_lmdb package, not this module)";
  m.attr("__version__") = TORCH_LMDB_VERSION;
  m.attr("FORMAT_VERSION") = kFormatVersion;

  static py::exception<Error> base(m, "Error", PyExc_RuntimeError);
  static py::exception<MapFullError> map_full(m, "MapFullError", base.ptr());
  static py::exception<ReadersFullError> readers_full(m, "ReadersFullError", base.ptr());
  static py::exception<NotFoundError> not_found(m, "NotFoundError", base.ptr());
  static py::exception<CorruptedError> corrupted(m, "CorruptedError", base.ptr());
  static py::exception<InvalidDatabaseError> invalid(m, "InvalidDatabaseError", base.ptr());
  static py::exception<LockError> lock(m, "LockError", base.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const MapFullError& e) {
      PyErr_SetString(map_full.ptr(), e.what());
    } catch (const ReadersFullError& e) {
      PyErr_SetString(readers_full.ptr(), e.what());
    } catch (const NotFoundError& e) {
      PyErr_SetString(not_found.ptr(), e.what());
    } catch (const CorruptedError& e) {
      PyErr_SetString(corrupted.ptr(), e.what());
    } catch (const InvalidDatabaseError& e) {
      PyErr_SetString(invalid.ptr(), e.what());
    } catch (const LockError& e) {
      PyErr_SetString(lock.ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(base.ptr(), e.what());
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

  py::class_<PyReader>(m, "Reader")
      .def(py::init<std::vector<std::string>, bool, std::optional<bool>, bool, unsigned,
                    std::vector<std::string>>(),
           py::arg("paths"), py::arg("verify") = false, py::arg("lock") = py::none(),
           py::arg("readahead") = false, py::arg("max_readers") = 1024,
           py::arg("fields") = std::vector<std::string>())
      .def("__len__", [](const PyReader& r) { return r.reader->size(); })
      .def("get", &PyReader::get, py::arg("index"))
      .def("get_batch", &PyReader::get_batch, py::arg("indices"), py::arg("pad") = false,
           py::arg("pad_fields") = std::vector<std::string>(), py::arg("pad_value") = 0.0,
           py::arg("allocator") = py::none())
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

  py::class_<PyWriter>(m, "Writer")
      .def(py::init<const std::string&, bool, size_t, size_t, size_t, bool, bool, const std::string&>(),
           py::arg("path"), py::arg("append") = false, py::arg("map_size") = 0, py::arg("commit_every") = 0,
           py::arg("commit_bytes") = 0, py::arg("checksum") = true, py::arg("auto_grow") = true,
           py::arg("user_json") = "")
      .def("write", &PyWriter::write, py::arg("fields"))
      .def("flush", [](PyWriter& w) { Writer& x = w.get(); py::gil_scoped_release nogil; x.flush(); })
      .def("close", [](PyWriter& w) {
        if (!w.writer) return;
        py::gil_scoped_release nogil;
        w.writer->close();
      })
      .def("abandon", [](PyWriter& w) {
        // Commit what was written without marking the database complete.
        py::gil_scoped_release nogil;
        w.writer.reset();
      })
      .def("set_user_metadata", [](PyWriter& w, const std::string& j) { w.get().set_user_metadata(j); })
      .def("__len__", [](PyWriter& w) { return w.get().size(); })
      .def_property_readonly("committed", [](PyWriter& w) { return w.get().committed(); })
      .def_property_readonly("map_size", [](PyWriter& w) { return w.get().map_size(); })
      .def_property_readonly("closed", [](const PyWriter& w) { return !w.writer || w.writer->closed(); });
}
