#include "torch_lmdb/detail/record_format.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

// Packed values (record_format.h): up to kMaxSamplesPerValue records under one LMDB key.

namespace torch_lmdb {

bool packed_record(const void* data, size_t size, size_t slot, size_t max_records, const char** record,
                   size_t* record_size, PackedColumns* columns) noexcept {
  const char* p = static_cast<const char*>(data);
  if (size < packed_header_bytes(0)) return false;
  uint32_t magic = 0, n = 0;
  std::memcpy(&magic, p, 4);
  std::memcpy(&n, p + 4, 4);
  if ((magic != kPackMagic && magic != kColumnPackMagic) || n == 0 || n > max_records || slot >= n) return false;
  size_t header = packed_header_bytes(n);
  if (size < header) return false;
  const char* section = nullptr;
  uint32_t section_size = 0;
  if (magic == kColumnPackMagic) {  // u32 section size, the column section, then the records
    if (size - header < 4) return false;
    std::memcpy(&section_size, p + header, 4);
    if (section_size > size - header - 4) return false;
    section = p + header + 4;
    header += 4 + static_cast<size_t>(section_size);
  }
  uint32_t begin = 0, end = 0;
  if (slot > 0) std::memcpy(&begin, p + 8 + 4 * (slot - 1), 4);
  std::memcpy(&end, p + 8 + 4 * slot, 4);
  if (end < begin || end > size - header) return false;
  *record = p + header + begin;
  *record_size = end - begin;
  if (columns != nullptr) {
    *columns = PackedColumns{};
    if (section != nullptr) *columns = PackedColumns{section, section_size, n, static_cast<uint32_t>(slot)};
  }
  return true;
}

void append_packed(const char* records, const std::vector<size_t>& ends, std::string& out) {
  TORCH_CHECK(!ends.empty() && ends.size() <= kMaxSamplesPerValue && ends.back() <= UINT32_MAX,
              "a packed value holds 1 to ", kMaxSamplesPerValue, " records of at most 4 GiB in all");
  const uint32_t n = static_cast<uint32_t>(ends.size());
  const size_t at = out.size();
  out.resize(at + packed_header_bytes(n));
  char* h = &out[at];
  std::memcpy(h, &kPackMagic, 4);
  std::memcpy(h + 4, &n, 4);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t e = static_cast<uint32_t>(ends[i]);
    std::memcpy(h + 8 + 4 * i, &e, 4);
  }
  out.append(records, ends.back());
}

}  // namespace torch_lmdb
