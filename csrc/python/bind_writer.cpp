// torch_lmdb._C.Writer: samples from Python dicts to Fields without
// Python-level work (numpy arrays and buffers viewed in place, scalars and
// strings converted in C++), written with the GIL released.
#include <torch/extension.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "torch_lmdb/torch_lmdb.h"

namespace py = pybind11;
using namespace torch_lmdb;

namespace {

// The common values of a sample (torch tensors, C-contiguous native numpy
// arrays and scalars, bool/int/float, str, bytes) become Fields here, viewing
// the Python objects' memory (the writer copies it before write() returns).
// Anything else goes through the Python converter (torch_lmdb.writer._field),
// which defines the behaviour and the error messages for every other type.

// numpy's ndarray type and the scalar types with a torch dtype, looked up
// once (none without numpy). Other numpy scalars (datetime64, bytes_, ...)
// export their raw bytes as a buffer, so only these are read as buffers.
struct NumpyTypes {
  PyTypeObject* ndarray = nullptr;
  std::vector<PyTypeObject*> scalars;
  static const NumpyTypes& get() {
    static const NumpyTypes types = [] {
      NumpyTypes t;
      PyObject* np = PyImport_ImportModule("numpy");
      if (np == nullptr) {
        PyErr_Clear();
        return t;
      }
      auto type = [np](const char* name) {
        PyObject* o = PyObject_GetAttrString(np, name);  // a new reference, kept for the process
        if (o == nullptr || !PyType_Check(o)) {
          PyErr_Clear();
          return static_cast<PyTypeObject*>(nullptr);
        }
        return reinterpret_cast<PyTypeObject*>(o);
      };
      t.ndarray = type("ndarray");
      for (const char* name : {"bool_", "int8", "uint8", "int16", "int32", "int64", "float16", "float32",
                               "float64", "complex64", "complex128"})
        if (PyTypeObject* s = type(name)) t.scalars.push_back(s);
      Py_DECREF(np);
      return t;
    }();
    return types;
  }
  bool is_array_or_scalar(PyObject* value) const {
    if (ndarray != nullptr && PyObject_TypeCheck(value, ndarray)) return true;
    return std::find(scalars.begin(), scalars.end(), Py_TYPE(value)) != scalars.end();
  }
};

// A buffer format of native byte order to its dtype; nullopt for the rest.
std::optional<at::ScalarType> buffer_dtype(const char* format, Py_ssize_t itemsize) {
  if (format == nullptr) return std::nullopt;
  const uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  if (*format == '@' || *format == '=' || (*format == '<' && little)) ++format;
  std::optional<at::ScalarType> t;
  const bool one = format[0] != '\0' && format[1] == '\0';
  if (one) {
    switch (format[0]) {
      case '?': t = at::kBool; break;
      case 'b': t = at::kChar; break;
      case 'B': t = at::kByte; break;
      case 'h': t = at::kShort; break;
      case 'i': t = at::kInt; break;
      case 'l': case 'q': t = at::kLong; break;
      case 'e': t = at::kHalf; break;
      case 'f': t = at::kFloat; break;
      case 'd': t = at::kDouble; break;
      default: break;
    }
  } else if (format[0] == 'Z' && format[1] != '\0' && format[2] == '\0') {
    if (format[1] == 'f') t = at::kComplexFloat;
    if (format[1] == 'd') t = at::kComplexDouble;
  }
  if (!t || static_cast<Py_ssize_t>(c10::elementSize(*t)) != itemsize) return std::nullopt;
  return t;
}

// What the Fields of one sample point into: buffers (numpy) and str/bytes
// objects whose memory the Fields view without a copy. Held -- a reference
// each -- until the sample has been written, because the GIL is released
// during the write and another thread may then replace the values in the
// sample dict (dropping the dict's references). Destroyed with the GIL held.
struct HeldValues {
  std::vector<Py_buffer> views;
  std::vector<py::object> objects;
  ~HeldValues() {
    for (Py_buffer& v : views) PyBuffer_Release(&v);
  }
};

// Fills `f` from a value of a common type; false: use the Python converter.
bool fast_field(PyObject* value, Field& f, HeldValues& held) {
  if (THPVariable_Check(value)) {
    const at::Tensor& t = THPVariable_Unpack(value);
    f.kind = FieldKind::Tensor;
    f.tensor = t.requires_grad() ? t.detach() : t;
    return true;
  }
  if (PyBool_Check(value)) {
    f.kind = FieldKind::Tensor;
    f.tensor = at::scalar_tensor(value == Py_True, at::kBool);
    return true;
  }
  if (PyLong_CheckExact(value)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;  // the Python converter says why
    }
    f.kind = FieldKind::Tensor;
    f.tensor = at::scalar_tensor(static_cast<int64_t>(v), at::kLong);
    return true;
  }
  if (PyFloat_CheckExact(value)) {
    f.kind = FieldKind::Tensor;
    f.tensor = at::scalar_tensor(PyFloat_AS_DOUBLE(value), at::kDouble);
    return true;
  }
  if (PyUnicode_Check(value)) {
    Py_ssize_t len = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(value, &len);  // cached by the str object
    if (utf8 == nullptr) {
      PyErr_Clear();
      return false;
    }
    held.objects.push_back(py::reinterpret_borrow<py::object>(value));
    f.kind = FieldKind::Str;
    f.tensor = at::from_blob(const_cast<char*>(utf8), {static_cast<int64_t>(len)}, at::kByte);
    return true;
  }
  if (PyBytes_CheckExact(value)) {
    held.objects.push_back(py::reinterpret_borrow<py::object>(value));
    f.kind = FieldKind::Bytes;
    f.tensor = at::from_blob(PyBytes_AS_STRING(value), {static_cast<int64_t>(PyBytes_GET_SIZE(value))}, at::kByte);
    return true;
  }
  if (!NumpyTypes::get().is_array_or_scalar(value) || !PyObject_CheckBuffer(value)) return false;
  Py_buffer view;
  if (PyObject_GetBuffer(value, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
    PyErr_Clear();  // e.g. not C-contiguous: the Python converter copies it
    return false;
  }
  const auto dtype = buffer_dtype(view.format, view.itemsize);
  if (!dtype || view.ndim > kMaxDims) {
    PyBuffer_Release(&view);
    return false;
  }
  std::vector<int64_t> shape(view.shape, view.shape + view.ndim);
  held.views.push_back(view);
  f.kind = FieldKind::Tensor;
  f.tensor = at::from_blob(view.buf, shape, *dtype);
  return true;
}

// A field name (str) as UTF-8; ValueError naming the field (its ascii
// repr) when it cannot be encoded (a lone surrogate, say).
std::string field_name(const py::handle& name) {
  Py_ssize_t len = 0;
  const char* utf8 = PyUnicode_Check(name.ptr()) ? PyUnicode_AsUTF8AndSize(name.ptr(), &len) : nullptr;
  if (utf8 != nullptr) return std::string(utf8, static_cast<size_t>(len));
  PyErr_Clear();
  PyObject* ascii = PyObject_ASCII(name.ptr());
  const char* text = ascii != nullptr ? PyUnicode_AsUTF8(ascii) : nullptr;
  const std::string shown = text != nullptr ? text : "?";
  Py_XDECREF(ascii);
  PyErr_Clear();
  throw py::value_error("field name " + shown + " cannot be stored: field names must be str encodable as UTF-8");
}

// A sample (dict) to Fields: the fast path per value, else `convert(name,
// value)` -> (name, kind, tensor or bytes).
//
// Contract: called with the GIL held, and it touches CPython (so it lives
// here, not in the library). On return each Field's tensor views memory that
// `held` (or the tensor itself) keeps alive: keep `held` until the Fields are
// written, and destroy it with the GIL held. Errors: TypeError/ValueError/
// OverflowError from the converter, ValueError for names not encodable as
// UTF-8; `fields` is then partially filled and must be discarded.
void sample_fields(const py::dict& sample, const py::handle& convert, std::vector<Field>& fields,
                   HeldValues& held) {
  fields.clear();
  fields.reserve(sample.size());
  for (const auto& item : sample) {
    Field f;
    if (PyUnicode_Check(item.first.ptr()) && fast_field(item.second.ptr(), f, held)) {
      f.name = field_name(item.first);
      fields.push_back(std::move(f));
      continue;
    }
    auto tup = convert(item.first, item.second).cast<py::tuple>();
    f.name = field_name(tup[0]);
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
}

struct PyWriter {
  std::unique_ptr<Writer> writer;
  std::string path;
  std::vector<Field> fields;  // reused from sample to sample

  Writer& get() {
    TORCH_CHECK_VALUE(writer != nullptr, "the writer of '", path, "' is closed");
    return *writer;
  }

  PyWriter(const std::string& path, bool append, size_t map_size, size_t commit_every, size_t commit_bytes,
           bool checksum, bool auto_grow, const std::string& user_json, const std::string& compression,
           const std::map<std::string, std::string>& field_compression, int format_version,
           size_t samples_per_value, size_t compress_threads) {
    WriterOptions o;
    o.samples_per_value = samples_per_value;
    o.compress_threads = compress_threads;
    o.compression = compression;
    o.field_compression = field_compression;
    o.format_version = format_version;
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

  size_t write(const py::dict& sample, const py::handle& convert) {
    Writer& w = get();
    HeldValues held;
    sample_fields(sample, convert, fields, held);
    size_t index = 0;
    {
      py::gil_scoped_release nogil;
      index = w.write(fields);
    }
    fields.clear();  // drop the views before the buffers are released
    return index;
  }

  // Writes every sample of an iterable of dicts; returns how many.
  size_t write_many(const py::iterable& samples, const py::handle& convert) {
    Writer& w = get();
    size_t count = 0;
    for (const py::handle sample : samples) {
      if (!PyDict_Check(sample.ptr())) {
        throw py::type_error(std::string("a sample must be a dict of field name to value, got ") +
                             Py_TYPE(sample.ptr())->tp_name + " (sample " + std::to_string(w.size()) + ")");
      }
      write(py::reinterpret_borrow<py::dict>(sample), convert);
      ++count;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();  // Ctrl-C between samples
    }
    return count;
  }
};

}  // namespace

void bind_writer(py::module_& m) {
  py::class_<PyWriter>(m, "Writer")
      .def(py::init<const std::string&, bool, size_t, size_t, size_t, bool, bool, const std::string&,
                    const std::string&, const std::map<std::string, std::string>&, int, size_t, size_t>(),
           py::arg("path"), py::arg("append") = false, py::arg("map_size") = 0, py::arg("commit_every") = 0,
           py::arg("commit_bytes") = 0, py::arg("checksum") = true, py::arg("auto_grow") = true,
           py::arg("user_json") = "", py::arg("compression") = "",
           py::arg("field_compression") = std::map<std::string, std::string>(),
           py::arg("format_version") = 0, py::arg("samples_per_value") = 0, py::arg("compress_threads") = 0)
      .def("write", &PyWriter::write, py::arg("sample"), py::arg("convert"))
      .def("write_many", &PyWriter::write_many, py::arg("samples"), py::arg("convert"))
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
      .def("set_shard", [](PyWriter& w, const std::string& id, size_t index, size_t count) {
        w.get().set_shard(id, index, count);
      })
      .def("__len__", [](PyWriter& w) { return w.get().size(); })
      .def_property_readonly("committed", [](PyWriter& w) { return w.get().committed(); })
      .def_property_readonly("map_size", [](PyWriter& w) { return w.get().map_size(); })
      .def_property_readonly("closed", [](const PyWriter& w) { return !w.writer || w.writer->closed(); });
}
