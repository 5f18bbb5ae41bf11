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
  if (nbytes != v.nbytes)
    return "Blosc frame decompresses to " + std::to_string(nbytes) + " bytes, not the " + std::to_string(v.nbytes) +
           " of its shape";
  size_t checked = 0;
  if (blosc_cbuffer_validate(v.data, static_cast<size_t>(v.stored), &checked) != 0 || checked != v.nbytes)
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
  int csize = 0;
  if (c.codec != Codec::None && nbytes >= kMinCompressBytes &&
      nbytes <= static_cast<uint64_t>(BLOSC_MAX_BUFFERSIZE)) {
    if (scratch.size() < nbytes) scratch.resize(nbytes);
    csize = blosc_compress_ctx(c.level, BLOSC_SHUFFLE, shuffle_typesize(t.scalar_type()),
                               static_cast<size_t>(nbytes), t.data_ptr(), &scratch[0],
                               static_cast<size_t>(nbytes), blosc_compressor(c.codec), 0, 1);
    TORCH_CHECK(csize >= 0, "field '", f.name, "': Blosc (", codec_name(c.codec), ") failed with code ", csize);
  }
  return csize;
}

}  // namespace detail
}  // namespace torch_lmdb
