// A sample's fields held against a database's schema (conform.h).
#include "torch_lmdb/detail/conform.h"
#include "torch_lmdb/detail/record_format.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace torch_lmdb {
namespace detail {
namespace {

std::string dtype_name_or(at::ScalarType t) {
  try {
    return dtype_name(t);
  } catch (const c10::Error&) {
    return c10::toString(t);
  }
}

// Sample `index`'s field `f` checked against its schema field `s`; returns
// true when a size differed (it is then -1 in `s`).
bool conform_field(FieldSchema& s, const Field& f, size_t index) {
  TORCH_CHECK_VALUE(f.tensor.defined(), "field '", f.name, "' of sample ", index, " holds an undefined tensor");
  TORCH_CHECK_TYPE(f.kind == s.kind, "field '", s.name, "' of sample ", index, " is a ", kind_name(f.kind),
                   " but earlier samples stored a ", kind_name(s.kind));
  TORCH_CHECK_TYPE(f.tensor.scalar_type() == s.dtype, "field '", s.name, "' of sample ", index, " has dtype ",
                   dtype_name_or(f.tensor.scalar_type()), " but earlier samples stored ", dtype_name(s.dtype));
  TORCH_CHECK_VALUE(f.tensor.dim() == static_cast<int64_t>(s.shape.size()), "field '", s.name, "' of sample ",
                    index, " has ", f.tensor.dim(), " dims but earlier samples have ", s.shape.size());
  bool widened = false;
  for (size_t d = 0; d < s.shape.size(); ++d) {
    if (s.shape[d] != -1 && s.shape[d] != f.tensor.size(static_cast<int64_t>(d))) {
      s.shape[d] = -1;
      widened = true;
    }
  }
  return widened;
}

}  // namespace

std::vector<FieldSchema> schema_of_first(const std::vector<Field>& fields, size_t index) {
  TORCH_CHECK_VALUE(!fields.empty(), "sample ", index, " has no fields");
  std::vector<FieldSchema> schema;
  for (const Field& f : fields) {
    for (const auto& s : schema)
      TORCH_CHECK_VALUE(s.name != f.name, "sample ", index, " has field '", f.name, "' twice");
    TORCH_CHECK_VALUE(f.tensor.defined(), "field '", f.name, "' of sample ", index, " holds an undefined tensor");
    dtype_code(f.tensor.scalar_type());  // TypeError for unsupported dtypes
    schema.push_back(FieldSchema{f.name, f.kind, f.tensor.scalar_type(), f.tensor.sizes().vec()});
  }
  return schema;
}

void conform_fields(std::vector<FieldSchema>& schema, const std::vector<Field>& fields, size_t index,
                    const std::string& path, std::vector<Field>& ordered, bool* widened) {
  // Only built on the error paths (TORCH_CHECK evaluates its message lazily).
  auto names = [&] {
    std::string out;
    for (const auto& s : schema) out += (out.empty() ? "" : ", ") + s.name;
    return out;
  };
  TORCH_CHECK_VALUE(fields.size() == schema.size(), "sample ", index, " of '", path, "' has ", fields.size(),
                    " fields but the database stores ", schema.size(), ": ", names());
  ordered.clear();
  for (size_t i = 0; i < schema.size(); ++i) {
    FieldSchema& s = schema[i];
    const Field* f = (fields[i].name == s.name) ? &fields[i] : nullptr;
    if (f == nullptr) {
      auto it = std::find_if(fields.begin(), fields.end(), [&](const Field& x) { return x.name == s.name; });
      TORCH_CHECK_VALUE(it != fields.end(), "sample ", index, " of '", path, "' has no field '", s.name,
                        "'; the database stores: ", names());
      f = &*it;
    }
    if (conform_field(s, *f, index)) *widened = true;
    ordered.push_back(*f);
  }
}

}  // namespace detail
}  // namespace torch_lmdb
