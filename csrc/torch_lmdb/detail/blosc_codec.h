#pragma once
// Internal (not installed): Blosc 1 frames of record payloads, for record.cpp.
// - blosc_problem() checks a stored frame's header against its FieldView
//   before anything is decompressed: lengths, and the codec the record names.
// - compress_payload() compresses one field's payload with its codec, or
//   leaves it raw when Blosc does not make it smaller.
// - compress_block() compresses a column of a columnar packed value.
// All are thread-safe (Blosc is called through its *_ctx functions).
#include <cstdint>
#include <string>

#include "torch_lmdb/detail/record_format.h"

namespace torch_lmdb {
namespace detail {

/// Empty when the stored Blosc frame of `v` (its header: lengths, codec) may
/// be decompressed, else what is wrong with it.
std::string blosc_problem(const FieldView& v);

/// Compresses the `nbytes` bytes of `t` (field `f`'s stored tensor) into
/// `scratch`; returns the frame's size, or 0 to store the payload raw. A frame
/// is kept only when it is smaller than the raw bytes: Blosc gives up
/// (returns 0) when the output does not fit in `nbytes`. Throws c10::Error
/// when Blosc fails.
int compress_payload(const Field& f, const at::Tensor& t, const Compression& c, uint64_t nbytes,
                     std::string& scratch);

/// The same for `nbytes` bytes at `data` whose elements are of dtype `t`
/// (uint8 for str/bytes), whatever their size (a column: detail/columns.h).
int compress_block(const void* data, size_t nbytes, at::ScalarType t, const Compression& c, std::string& scratch);

}  // namespace detail
}  // namespace torch_lmdb
