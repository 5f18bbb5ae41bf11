// Blosc 1 for record payloads (blosc_codec.h).
#include "torch_lmdb/detail/blosc_codec.h"

#include <blosc.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <string>

namespace torch_lmdb {
namespace detail {
namespace {

// Blosc's compressor name and the name its header reports (blosc_cbuffer_complib).
const char* blosc_compressor(Codec c) { return c == Codec::BloscZstd ? BLOSC_ZSTD_COMPNAME : BLOSC_LZ4_COMPNAME; }
const char* blosc_lib(Codec c) { return c == Codec::BloscZstd ? BLOSC_ZSTD_LIBNAME : BLOSC_LZ4_LIBNAME; }

// The element size Blosc shuffles by: a complex number's component (the real
// parts' bytes then group with each other, as in numcodecs for complex arrays
// stored as pairs of floats).
size_t shuffle_typesize(at::ScalarType t) {
  const size_t size = c10::elementSize(t);
  return at::isComplexType(t) ? size / 2 : size;
}

}  // namespace

std::string blosc_problem(const FieldView& v) {
  if (v.stored < BLOSC_MIN_HEADER_LENGTH)
    return "compressed payload of " + std::to_string(v.stored) + " bytes is shorter than a Blosc header";
  size_t nbytes = 0, cbytes = 0, blocksize = 0;
  blosc_cbuffer_sizes(v.data, &nbytes, &cbytes, &blocksize);
  if (cbytes != v.stored)
    return "Blosc frame declares " + std::to_string(cbytes) + " bytes in a payload of " + std::to_string(v.stored);
  const uint64_t expected = v.column_bytes != 0 ? v.column_bytes : v.nbytes;
  if (nbytes != expected)
    return "Blosc frame decompresses to " + std::to_string(nbytes) + " bytes, not the " + std::to_string(expected) +
           (v.column_bytes != 0 ? " of its column" : " of its shape");
  size_t checked = 0;
  if (blosc_cbuffer_validate(v.data, static_cast<size_t>(v.stored), &checked) != 0 || checked != expected)
    return "invalid Blosc header";
  const char* lib = blosc_cbuffer_complib(v.data);
  if (lib == nullptr || std::strcmp(lib, blosc_lib(v.codec)) != 0)
    return std::string("Blosc frame compressed with ") + (lib ? lib : "an unknown compressor") + ", not " +
           codec_name(v.codec);
  return {};
}

// Compresses the `nbytes` bytes of `t` into `scratch`; returns the frame's
// size, or 0 to store the payload raw. A frame is kept only when it is
// smaller than the raw bytes: Blosc gives up (returns 0) when the output
// does not fit in `nbytes`.
int compress_payload(const Field& f, const at::Tensor& t, const Compression& c, uint64_t nbytes,
                     std::string& scratch) {
  if (nbytes < kMinCompressBytes) return 0;
  const int csize = compress_block(t.data_ptr(), static_cast<size_t>(nbytes), t.scalar_type(), c, scratch);
  TORCH_CHECK(csize >= 0, "field '", f.name, "': Blosc (", codec_name(c.codec), ") failed with code ", csize);
  return csize;
}

int compress_block(const void* data, size_t nbytes, at::ScalarType t, const Compression& c, std::string& scratch) {
  if (c.codec == Codec::None || nbytes == 0 || nbytes > static_cast<size_t>(BLOSC_MAX_BUFFERSIZE)) return 0;
  if (scratch.size() < nbytes) scratch.resize(nbytes);
  return blosc_compress_ctx(c.level, BLOSC_SHUFFLE, shuffle_typesize(t), nbytes, data, &scratch[0], nbytes,
                            blosc_compressor(c.codec), 0, 1);
}

}  // namespace detail
}  // namespace torch_lmdb
