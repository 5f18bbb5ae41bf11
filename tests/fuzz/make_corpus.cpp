// Writes the seed corpus of the fuzz targets: `fuzz_make_corpus DIR` fills
// DIR/record (encoded records), DIR/meta (metadata values) and DIR/open
// (data.mdb files of small databases, one of them packed). `make fuzz-corpus` runs it into
// tests/fuzz/corpus; the files are committed so that a fuzz run starts from
// valid inputs of every kind.
#include <sys/stat.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/meta.h"
#include "torch_lmdb/detail/columns.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/torch_lmdb.h"

using namespace torch_lmdb;

namespace {

void put(const std::string& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + file);
}

std::string slurp(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<Field> text_fields(const std::string& s) {
  at::Tensor bytes = torch::empty({static_cast<int64_t>(s.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), s.data(), s.size());
  return {Field{"label", FieldKind::Str, bytes}, Field{"blob", FieldKind::Bytes, bytes.flip(0)},
          Field{"y", FieldKind::Tensor, torch::tensor(int64_t{3})}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  for (const char* d : {"", "/record", "/meta", "/open", "/tmp"}) ::mkdir((root + d).c_str(), 0755);

  // record: one record per dtype, a few shapes, str/bytes, with and without checksum.
  const std::vector<at::ScalarType> dtypes{at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong,
                                           at::kHalf, at::kBFloat16, at::kFloat, at::kDouble,
                                           at::kComplexFloat, at::kComplexDouble};
  int n = 0;
  std::string rec;
  for (auto dtype : dtypes) {
    const at::Tensor t = torch::arange(6).reshape({2, 3}).to(dtype);
    encode_record({Field{"x", FieldKind::Tensor, t}, Field{"i", FieldKind::Tensor, torch::tensor(int64_t{n})}},
                  n % 2 == 0, rec);
    put(root + "/record/dtype-" + std::to_string(n++), rec);
  }
  encode_record({Field{"empty", FieldKind::Tensor, torch::zeros({0, 4})},
                 Field{"scalar", FieldKind::Tensor, torch::tensor(1.5)}},
                true, rec);
  put(root + "/record/shapes", rec);
  encode_record(text_fields("hello"), true, rec);
  put(root + "/record/text", rec);
  // Version 2 records with Blosc payloads (LZ4 and Zstd, a complex field, a
  // raw small one, str) and a version 1 record.
  for (const char* codec : {"lz4", "zstd"}) {
    const std::vector<Compression> c(3, parse_compression(codec, "seed"));
    EncodeOptions eo;
    eo.compression = &c;
    for (bool checksum : {false, true}) {
      eo.checksum = checksum;
      rec.clear();
      append_record({Field{"cir", FieldKind::Tensor, torch::complex(torch::arange(64.0f), torch::ones({64}))},
                     Field{"small", FieldKind::Tensor, torch::arange(3)},
                     Field{"s", FieldKind::Str, torch::full({40}, 'a', torch::kByte)}},
                    eo, rec);
      put(root + "/record/blosc-" + codec + (checksum ? "-sum" : ""), rec);
    }
  }
  {
    EncodeOptions eo;
    eo.version = 1;
    rec.clear();
    append_record({Field{"x", FieldKind::Tensor, torch::arange(6)}}, eo, rec);
    put(root + "/record/version1", rec);
  }

  // Compact records (format version 4) of record_fuzz's schema: cir, small, s, m.
  for (const char* codec : {"none", "lz4", "zstd"}) {
    const std::vector<Compression> c(4, parse_compression(codec, "seed"));
    EncodeOptions eo;
    eo.version = kCompactFormatVersion;
    eo.compression = &c;
    rec.clear();
    append_record({Field{"cir", FieldKind::Tensor, torch::complex(torch::arange(64.0f), torch::ones({64}))},
                   Field{"small", FieldKind::Tensor, torch::arange(3)},
                   Field{"s", FieldKind::Str, torch::full({40}, 'a', torch::kByte)},
                   Field{"m", FieldKind::Tensor, torch::zeros({5, 3})}},
                  eo, rec);
    put(root + "/record/compact-" + codec, rec);
  }

  {  // a packed value (format version 3) of three records
    std::string records;
    std::vector<size_t> ends;
    for (int64_t i = 0; i < 3; ++i) {
      append_record({Field{"x", FieldKind::Tensor, torch::arange(5 + i)}}, true, records);
      ends.push_back(records.size());
    }
    rec.clear();
    append_packed(records.data(), ends, rec);
    put(root + "/record/packed", rec);
  }
  {  // a columnar packed value (format version 5) of 16 compact records (the fuzz target's schema)
    const std::vector<FieldSchema> schema{{"cir", FieldKind::Tensor, at::kComplexFloat, {-1}},
                                          {"small", FieldKind::Tensor, at::kLong, {-1}},
                                          {"s", FieldKind::Str, at::kByte, {-1}},
                                          {"m", FieldKind::Tensor, at::kFloat, {-1, 3}}};
    const std::vector<Compression> codecs(4, parse_compression("lz4", "fuzz"));
    EncodeOptions eo;
    eo.version = kCompactFormatVersion;
    eo.compression = &codecs;
    std::string records;
    std::vector<size_t> ends;
    for (int64_t i = 0; i < 16; ++i) {
      append_record({Field{"cir", FieldKind::Tensor, torch::zeros({4}, torch::kComplexFloat)},
                     Field{"small", FieldKind::Tensor, torch::arange(i % 4 + 2)},
                     Field{"s", FieldKind::Str, torch::full({3}, 'a', torch::kByte)},
                     Field{"m", FieldKind::Tensor, torch::full({2, 3}, static_cast<float>(i % 3))}},
                    eo, records);
      ends.push_back(records.size());
    }
    rec.clear();
    std::vector<int64_t> delta;
    const std::string path = "corpus";
    torch_lmdb::detail::append_columnar(records.data(), ends, schema, codecs, path, 0, rec, delta);
    uint32_t magic = 0;
    std::memcpy(&magic, rec.data(), 4);
    if (magic != kColumnPackMagic) throw std::runtime_error("the columnar seed has no columns");
    put(root + "/record/columnar", rec);
  }
  {  // a compact record whose fields say "in a column", outside any columnar value
    // (an input libFuzzer found: such views have no bytes until resolved)
    static const unsigned char bytes[] = {0x54, 0x4c, 0x4d, 0x44, 0x04, 0x00, 0x01, 0x00, 0x04, 0x03,
                                          0x04, 0x03, 0x03, 0x00, 0x03, 0x61, 0x61, 0x50, 0x00, 0x18,
                                          0x00, 0x5e, 0x88, 0xbb, 0x45, 0x29, 0x14, 0xba, 0xc5};
    put(root + "/record/compact-unresolved-column", std::string(reinterpret_cast<const char*>(bytes), sizeof bytes));
  }

  // meta: a whole table as Reader::metadata_json gives it, and single values.
  const std::string db = root + "/tmp/db";
  {
    WriterOptions o;
    o.user_json = R"({"source": "seed", "attrs": {"a": [1, 2.5, "x", null, true]}})";
    Writer w(db, o);
    for (int64_t i = 0; i < 3; ++i) {
      Sample s;
      s.insert("x", torch::arange(4, torch::kFloat) + i);
      s.insert("v", torch::ones({i + 1}, torch::kInt));
      w.write(s);
    }
    w.close();
  }
  put(root + "/meta/table", Reader(db).metadata_json());
  put(root + "/meta/schema", torch_lmdb::detail::Json::parse(Reader(db).metadata_json())["schema"].dump());
  put(root + "/meta/nested", std::string(20, '[') + "\"a\\\"]\"" + std::string(20, ']'));
  put(root + "/meta/number", "18446744073709551615");
  std::system(("rm -rf '" + db + "'").c_str());

  // open: small databases (fixed and varying shapes; str/bytes fields; no checksum).
  // db3: packed values (format version 3) of Blosc-compressed records.
  for (int k = 0; k < 4; ++k) {
    const std::string path = root + "/tmp/db" + std::to_string(k);
    WriterOptions o;
    o.checksum = k != 2;
    if (k == 3) {
      o.compression = "lz4";
      o.samples_per_value = 3;
    }
    o.map_size = size_t{1} << 20;
    Writer w(path, o);
    for (int64_t i = 0; i < 4 + 4 * k; ++i) {
      if (k == 1) {
        w.write(text_fields("sample " + std::to_string(i)));
      } else {
        Sample s;
        s.insert("x", torch::arange(3 + (k ? i : 0), torch::kFloat) + i);
        s.insert("index", torch::tensor(i));
        w.write(s);
      }
    }
    w.close();
    put(root + "/open/db" + std::to_string(k), slurp(path + "/data.mdb"));
  }
  {  // just the 152 bytes LMDB reads of a meta page, page size 0 (an input libFuzzer found:
     // LMDB read its second meta page at offset 0 as well, then divided by the page size)
    std::string meta = slurp(root + "/open/db0").substr(0, 152);
    std::memset(&meta[40], 0, 4);
    put(root + "/open/meta-page-size-0-152-bytes", meta);
  }
  {  // the newest commit's root of the table of tables overwritten (an input class libFuzzer
     // found: LMDB's mdb_dbi_open then searched it forever)
    std::string db = slurp(root + "/open/db0");
    uint64_t txn0 = 0, txn1 = 0, main_root = 0;
    std::memcpy(&txn0, &db[144], 8);
    std::memcpy(&txn1, &db[4096 + 144], 8);
    std::memcpy(&main_root, &db[(txn1 > txn0 ? 4096 : 0) + 128], 8);
    static const unsigned char header[16] = {0x72, 0x65, 0x64, 0x20, 0x74, 0x65, 0x78, 0x74,
                                             0x00, 0x00, 0x65, 0x22, 0x06, 0x00, 0x00, 0x00};
    std::memcpy(&db[main_root * 4096], header, sizeof header);
    put(root + "/open/main-root-not-a-page", db);
  }
  std::system(("rm -rf '" + root + "/tmp'").c_str());
  return 0;
}
