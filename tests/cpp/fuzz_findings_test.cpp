// Regression tests of what `make fuzz` found (tests/fuzz): each input class
// that got past torch_lmdb's checks, reduced to a hand-made case.
#include <sys/stat.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "test_util.h"
#include "torch_lmdb/detail/meta.h"

using namespace torch_lmdb;

namespace {

// A one-field record (float32 "x", no checksum) of shape `sizes`; the sizes
// are patched into the bytes afterwards, so they need not be a real tensor's.
std::string record_with_sizes(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> zero_shape(sizes.size(), 1);
  zero_shape.back() = 0;
  std::string bytes;
  encode_record({Field{"x", FieldKind::Tensor, torch::empty(zero_shape)}}, /*checksum=*/false, bytes);
  // magic, version, flags, count (12) + name length (8) + "x" + kind, dtype, ndim (3)
  const size_t at = 12 + 8 + 1 + 3;
  std::memcpy(&bytes[at], sizes.data(), sizes.size() * sizeof(int64_t));
  return bytes;
}

// A database directory's data.mdb, whole.
std::string data_file(const std::string& dir) {
  std::ifstream in(dir + "/data.mdb", std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A new database directory holding `bytes` as its data.mdb.
void write_data_file(const std::string& dir, const std::string& bytes) {
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  std::ofstream(dir + "/data.mdb", std::ios::binary) << bytes;
}

}  // namespace

// record_fuzz: a zero-size field whose other sizes multiply past 2^63 parsed,
// and to_tensor()'s at::empty then raised LibTorch's "Storage size
// calculation overflowed" without the path or index.
TEST(FuzzFindings, ZeroSizeFieldWhoseOtherSizesOverflowIsCorrupted) {
  const std::string path = "db";
  const RecordContext ctx{&path, 3};
  std::vector<FieldView> views;
  const std::string bad = record_with_sizes({int64_t{1} << 40, int64_t{1} << 40, 0});
  try {
    parse_record(bad.data(), bad.size(), true, ctx, views);
    ADD_FAILURE() << "a shape [2^40, 2^40, 0] was accepted";
  } catch (const CorruptedError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'db' index 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("overflow 64 bits"), std::string::npos) << msg;
  }
  RecordTemplate tmpl;
  EXPECT_THROW(parse_record_cached(bad.data(), bad.size(), true, ctx, views, tmpl), CorruptedError);
  // Large but representable zero-size shapes stay readable.
  const std::string ok = record_with_sizes({int64_t{1} << 20, int64_t{1} << 20, 0});
  parse_record(ok.data(), ok.size(), true, ctx, views);
  ASSERT_EQ(views.size(), 1u);
  const at::Tensor t = to_tensor(views[0]);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{int64_t{1} << 20, int64_t{1} << 20, 0}));
  EXPECT_EQ(t.numel(), 0);
}

// A record of the cached layout whose compressed payload (not part of the
// layout) has a damaged Blosc header: the template hit must refuse it as the
// full parse does, not hand out a view that only decoding would catch.
TEST(FuzzFindings, CachedParseChecksTheBloscHeaderOfACompressedPayload) {
  const std::vector<Compression> lz4{Compression{Codec::BloscLZ4, 5}};
  EncodeOptions o;
  o.checksum = false;
  o.compression = &lz4;
  std::string good, bad;
  append_record({Field{"x", FieldKind::Tensor, torch::arange(4096, torch::kFloat)}}, o, good);
  bad = good;
  std::vector<FieldView> views;
  const std::string path = "p";
  const RecordContext ctx{&path, 3};
  RecordTemplate tmpl;
  parse_record_cached(good.data(), good.size(), false, ctx, views, tmpl);  // remembers the layout
  ASSERT_EQ(views.size(), 1u);
  ASSERT_EQ(views[0].codec, Codec::BloscLZ4);
  const size_t header = static_cast<size_t>(views[0].data - good.data());
  bad[header + 4] ^= 0x40;  // the Blosc frame's decompressed length
  EXPECT_THROW(parse_record(bad.data(), bad.size(), false, ctx, views), CorruptedError);
  EXPECT_THROW(parse_record_cached(bad.data(), bad.size(), false, ctx, views, tmpl), CorruptedError);
  EXPECT_TRUE(parse_record_cached(good.data(), good.size(), false, ctx, views, tmpl));  // the layout still hits
}

// open_fuzz: a meta page with page size 0 (flags, magic and version intact)
// made LMDB's mdb_env_open divide by zero (SIGFPE). Every page size that is
// not a power of two from 512 to 64 KiB, in either meta page, is refused
// before LMDB reads it; the database itself opens as before.
TEST(FuzzFindings, AMetaPageWithABadPageSizeIsCorruptedNotSIGFPE) {
  torch_lmdb_test::TempDir tmp;
  const std::string original = tmp.sub("ok");
  torch_lmdb_test::write_dataset(original, 5);
  const std::string bytes = data_file(original);
  uint32_t psize = 0;
  std::memcpy(&psize, &bytes[40], 4);
  ASSERT_EQ(psize, 4096u);
  int n = 0;
  for (size_t meta_offset : {size_t{0}, size_t{4096}}) {
    for (uint32_t bad : {0u, 1u, 3000u, 131072u}) {
      const std::string path = tmp.sub("bad" + std::to_string(n++));
      std::string damaged = bytes;
      std::memcpy(&damaged[meta_offset + 40], &bad, 4);
      write_data_file(path, damaged);
      try {
        Reader r(path);
        ADD_FAILURE() << "page size " << bad << " in the meta page at " << meta_offset << " was accepted";
      } catch (const CorruptedError& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find(path + "/data.mdb"), std::string::npos) << msg;
        EXPECT_NE(msg.find("page size of " + std::to_string(bad)), std::string::npos) << msg;
      }
    }
  }
  // open_fuzz again: a file of just one meta page's 152 bytes (all LMDB reads
  // of it) with page size 0, so LMDB read its second meta page at offset 0 too.
  for (size_t length : {size_t{152}, size_t{159}}) {
    const std::string path = tmp.sub("short" + std::to_string(length));
    std::string damaged = bytes.substr(0, length);
    const uint32_t zero = 0;
    std::memcpy(&damaged[40], &zero, 4);
    write_data_file(path, damaged);
    ReaderOptions o;
    o.lock = 0;
    try {
      Reader r(path, o);
      ADD_FAILURE() << "a " << length << "-byte file with page size 0 was accepted";
    } catch (const CorruptedError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path + "/data.mdb"), std::string::npos) << msg;
      EXPECT_NE(msg.find("page size of 0"), std::string::npos) << msg;
    }
  }
  EXPECT_EQ(Reader(original).size(), 5u);
}

// open_fuzz: a damaged root page of LMDB's table of tables (where
// mdb_dbi_open looks for "samples" and "meta") made that search loop forever.
// A root whose header is not its own, or past the commit's last page, is
// refused at open with CorruptedError naming the file, and by verify's check.
TEST(FuzzFindings, ADamagedRootOfTheTableOfTablesIsCorruptedNotAHang) {
  torch_lmdb_test::TempDir tmp;
  const std::string original = tmp.sub("ok");
  torch_lmdb_test::write_dataset(original, 5);
  const std::string bytes = data_file(original);
  uint64_t txn[2], roots[2], last[2];
  for (int m = 0; m < 2; ++m) {
    std::memcpy(&txn[m], &bytes[m * 4096 + 144], 8);
    std::memcpy(&roots[m], &bytes[m * 4096 + 128], 8);
    std::memcpy(&last[m], &bytes[m * 4096 + 136], 8);
  }
  const int newest = txn[1] > txn[0] ? 1 : 0;
  const uint64_t root = roots[newest];
  ASSERT_LE(root, last[newest]);
  uint64_t pgno = 0;
  std::memcpy(&pgno, &bytes[root * 4096], 8);
  ASSERT_EQ(pgno, root);  // (the layout this test edits)
  const std::vector<std::pair<std::string, std::function<void(std::string&)>>> damage{
      {"page number", [&](std::string& b) { b[root * 4096] ^= 0x40; }},
      {"flags", [&](std::string& b) { b[root * 4096 + 10] = 0x65; b[root * 4096 + 11] = 0x22; }},
      {"lower bound", [&](std::string& b) { b[root * 4096 + 12] = 6; b[root * 4096 + 13] = 0; }},
      {"upper bound", [&](std::string& b) { b[root * 4096 + 14] = 0; b[root * 4096 + 15] = 0x20; }},
      {"past the last page", [&](std::string& b) {
         const uint64_t far = last[newest] + 5;
         std::memcpy(&b[newest * 4096 + 128], &far, 8);
       }}};
  int n = 0;
  for (const auto& [what, edit] : damage) {
    const std::string path = tmp.sub("root" + std::to_string(n++));
    std::string damaged = bytes;
    edit(damaged);
    write_data_file(path, damaged);
    const std::string problem = torch_lmdb::detail::meta_pages_problem(path + "/data.mdb");
    EXPECT_NE(problem.find("table of tables"), std::string::npos) << what << ": " << problem;
    ReaderOptions o;
    o.lock = 0;
    try {
      Reader r(path, o);
      ADD_FAILURE() << "a root of the table of tables with a damaged " << what << " was accepted";
    } catch (const CorruptedError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path + "/data.mdb"), std::string::npos) << msg;
      EXPECT_NE(msg.find("table of tables"), std::string::npos) << msg;
    }
  }
  EXPECT_EQ(torch_lmdb::detail::meta_pages_problem(original + "/data.mdb"), "");
  EXPECT_EQ(Reader(original).size(), 5u);
}

// record_fuzz: a name length up to the bytes left before the length field
// was read moved the record's stream past its end (a negative-size read
// under ASan). Every length that runs past the body is corrupted.
TEST(FuzzFindings, NameLengthPastTheEndOfTheRecordIsCorrupted) {
  const std::string path = "db";
  const RecordContext ctx{&path, 4};
  std::vector<FieldView> views;
  std::string good;
  encode_record({Field{"x", FieldKind::Tensor, torch::ones({3})}}, /*checksum=*/false, good);
  const size_t at = 12;  // magic, version, flags, count; then field 0's name length
  const size_t left = good.size() - at;  // the bytes from the length field to the end
  for (uint64_t name_len : {uint64_t{left - 8} + 1, uint64_t{left - 4}, uint64_t{left}, uint64_t{left} + 3}) {
    std::string bad = good;
    std::memcpy(&bad[at], &name_len, 8);
    try {
      parse_record(bad.data(), bad.size(), false, ctx, views);
      FAIL() << "name length " << name_len << " parsed";
    } catch (const CorruptedError& e) {
      EXPECT_NE(std::string(e.what()).find("index 4"), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(parse_record(good.data(), good.size(), false, ctx, views));
}
