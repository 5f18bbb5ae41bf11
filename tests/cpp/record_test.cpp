// Record format: round trips of every dtype and shape, corruption handling.
#include <lmdb.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "test_util.h"
#include "torch_lmdb/detail/decode.h"
#define XXH_INLINE_ALL
#include <xxhash.h>

using namespace torch_lmdb;
using torch_lmdb_test::mutate_record;
using torch_lmdb_test::kAllDtypes;
using torch_lmdb_test::TempDir;

namespace {


at::Tensor random_of(at::IntArrayRef shape, at::ScalarType dtype) {
  if (dtype == at::kBool) return torch::rand(shape) > 0.5;
  if (at::isComplexType(dtype)) return torch::randn(shape, dtype);
  if (at::isFloatingType(dtype)) return torch::randn(shape).to(dtype);
  return torch::randint(-100, 100, shape).to(dtype);
}

std::vector<Field> variants_for(at::ScalarType dtype) {
  const int64_t big = (5 << 20) / c10::elementSize(dtype) / 64 + 1;  // > 4 MiB
  return {
      Field{"scalar", FieldKind::Tensor, random_of({}, dtype)},
      Field{"empty", FieldKind::Tensor, random_of({0, 3}, dtype)},
      Field{"noncontig", FieldKind::Tensor, random_of({5, 7}, dtype).t()},
      Field{"strided", FieldKind::Tensor, random_of({20}, dtype).slice(0, 0, 20, 3)},
      Field{"large", FieldKind::Tensor, random_of({big, 64}, dtype)},
  };
}

void expect_corrupted(const std::function<void()>& fn, const std::string& path, uint64_t index) {
  try {
    fn();
    FAIL() << "expected CorruptedError";
  } catch (const CorruptedError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("index " + std::to_string(index)), std::string::npos) << msg;
  }
}

}  // namespace

TEST(Record, EveryDtypeAndShapeRoundTrips) {
  TempDir tmp;
  const std::string path = tmp.sub("all.lmdb");
  std::vector<std::vector<Field>> written;
  {
    for (auto dtype : kAllDtypes) {
      auto fields = variants_for(dtype);
      fields.push_back(Field{"text", FieldKind::Str, torch::tensor({104, 195, 169}, torch::kByte)});
      fields.push_back(Field{"blob", FieldKind::Bytes, torch::empty({0}, torch::kByte)});
      // Schemas are per database: one database per dtype keeps this simple.
      Writer wd(path + "." + c10::toString(dtype));
      wd.write(fields);
      wd.close();
      written.push_back(fields);
    }
  }
  for (size_t d = 0; d < kAllDtypes.size(); ++d) {
    Reader r(path + "." + c10::toString(kAllDtypes[d]), ReaderOptions{/*verify=*/true});
    ASSERT_EQ(r.size(), 1u);
    auto got = r.get_fields(0);
    ASSERT_EQ(got.size(), written[d].size());
    for (size_t f = 0; f < got.size(); ++f) {
      SCOPED_TRACE(std::string(c10::toString(kAllDtypes[d])) + " " + got[f].name);
      EXPECT_EQ(got[f].name, written[d][f].name);
      EXPECT_EQ(got[f].kind, written[d][f].kind);
      EXPECT_EQ(got[f].tensor.scalar_type(), written[d][f].tensor.scalar_type());
      EXPECT_EQ(got[f].tensor.sizes(), written[d][f].tensor.sizes());
      EXPECT_TRUE(got[f].tensor.is_contiguous());
      EXPECT_TRUE(torch::equal(got[f].tensor, written[d][f].tensor));
    }
  }
}

TEST(Record, AppendedRecordsParseAndAFailedAppendLeavesTheBufferAsItWas) {
  std::vector<Field> a{{"x", FieldKind::Tensor, torch::randn({5})}};
  std::vector<Field> b{{"y", FieldKind::Tensor, torch::arange(7)}, {"s", FieldKind::Str, torch::tensor({65}, torch::kByte)}};
  std::string buf = "prefix";
  const size_t na = append_record(a, true, buf);
  const size_t nb = append_record(b, false, buf);
  ASSERT_EQ(buf.size(), 6 + na + nb);
  std::string alone;
  encode_record(b, false, alone);
  EXPECT_EQ(buf.substr(6 + na), alone);  // appending encodes exactly like encode_record
  std::vector<FieldView> views;
  const std::string path = "mem";
  RecordContext ctx{&path, 0};
  parse_record(buf.data() + 6, na, true, ctx, views);
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(std::memcmp(views[0].data, a[0].tensor.data_ptr(), 20), 0);
  // The second field fails after the first was written: nothing stays behind,
  // and the reused stream still works afterwards.
  std::vector<Field> bad{{"ok", FieldKind::Tensor, torch::ones({3})}, {"bad", FieldKind::Tensor, at::Tensor()}};
  const std::string before = buf;
  EXPECT_THROW(append_record(bad, true, buf), c10::ValueError);
  EXPECT_EQ(buf, before);
  append_record(a, true, buf);
  EXPECT_EQ(buf.substr(before.size()), buf.substr(6, na));
}

TEST(Record, ParserRejectsEveryTruncationWithoutCrashing) {
  std::vector<Field> fields{{"a", FieldKind::Tensor, torch::randn({3, 4})},
                            {"b", FieldKind::Str, torch::tensor({65, 66}, torch::kByte)}};
  std::string rec;
  encode_record(fields, /*checksum=*/true, rec);
  std::vector<FieldView> views;
  const std::string path = "mem";
  RecordContext ctx{&path, 7};
  parse_record(rec.data(), rec.size(), true, ctx, views);
  ASSERT_EQ(views.size(), 2u);
  for (size_t len = 0; len < rec.size(); ++len) {
    std::string cut = rec.substr(0, len);
    EXPECT_THROW(parse_record(cut.data(), cut.size(), false, ctx, views), CorruptedError) << len;
  }
  // Random bit flips: never a crash; with verification always an error.
  std::mt19937 rng(1);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bad = rec;
    bad[rng() % bad.size()] ^= static_cast<char>(1 << (rng() % 8));
    EXPECT_ANY_THROW(parse_record(bad.data(), bad.size(), true, ctx, views));
    try {
      parse_record(bad.data(), bad.size(), false, ctx, views);
    } catch (const Error&) {
    } catch (const c10::Error&) {
    }
  }
}

TEST(Record, CachedLayoutParsesLikeTheParserAndStillCatchesCorruption) {
  auto make = [](int64_t i, int64_t width, const char* label) {
    std::vector<Field> f{{"index", FieldKind::Tensor, torch::tensor(i)},
                         {"x", FieldKind::Tensor, torch::arange(width, torch::kFloat) + i},
                         {"s", FieldKind::Str, torch::tensor({int(label[0]), int(label[1])}, torch::kByte)}};
    std::string rec;
    encode_record(f, /*checksum=*/true, rec);
    return rec;
  };
  const std::string path = "mem";
  RecordContext ctx{&path, 3};
  RecordTemplate tmpl;
  std::vector<FieldView> cached, parsed;
  auto same = [&](const std::string& rec) {
    parse_record_cached(rec.data(), rec.size(), true, ctx, cached, tmpl);
    parse_record(rec.data(), rec.size(), true, ctx, parsed);
    ASSERT_EQ(cached.size(), parsed.size());
    for (size_t f = 0; f < parsed.size(); ++f) {
      EXPECT_EQ(cached[f].name, parsed[f].name);
      EXPECT_EQ(cached[f].data, parsed[f].data);
      EXPECT_EQ(cached[f].nbytes, parsed[f].nbytes);
      EXPECT_EQ(cached[f].dtype, parsed[f].dtype);
      EXPECT_EQ(cached[f].shape(), parsed[f].shape());
    }
  };
  same(make(1, 8, "ab"));          // parsed, layout remembered
  same(make(2, 8, "cd"));          // same layout, other data: from the template
  EXPECT_EQ(tmpl.size, make(2, 8, "cd").size());
  same(make(3, 9, "ab"));          // another shape: parsed again
  const std::string r9 = make(6, 9, "xy"), r8 = make(7, 8, "xy");
  EXPECT_TRUE(parse_record_cached(r9.data(), r9.size(), true, ctx, cached, tmpl));
  EXPECT_FALSE(parse_record_cached(r8.data(), r8.size(), true, ctx, cached, tmpl));
  std::string bad = make(4, 9, "ab");
  bad[bad.size() - 20] ^= 0x01;     // a payload flip: the cached path still verifies the checksum
  EXPECT_THROW(parse_record_cached(bad.data(), bad.size(), true, ctx, cached, tmpl), CorruptedError);
  std::string header = make(5, 9, "ab");
  header[0] ^= 0x01;                // a header flip: no match, the parser rejects it
  EXPECT_THROW(parse_record_cached(header.data(), header.size(), false, ctx, cached, tmpl), CorruptedError);
}

TEST(Record, UnsupportedDtypeNamesTheField) {
  std::string rec;
  // Quantized tensors: a dtype torch has that the format does not name.
  std::vector<Field> fields{
      {"q", FieldKind::Tensor, at::_empty_affine_quantized({2}, at::device(at::kCPU).dtype(at::kQUInt8), 0.1, 0)}};
  try {
    encode_record(fields, true, rec);
    FAIL();
  } catch (const c10::TypeError& e) {
    EXPECT_NE(std::string(e.what()).find("'q'"), std::string::npos);
  }
}

TEST(Corruption, TruncatedBitFlippedAndAbsurdRecordsNamePathAndIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("c.lmdb");
  torch_lmdb_test::write_dataset(path, 10);
  // Truncated record 3.
  mutate_record(path, 3, [](std::string& v) { v.resize(v.size() / 2); });
  // A payload bit flip in record 5: caught by the checksum when verifying.
  mutate_record(path, 5, [](std::string& v) { v[v.size() - 12] ^= 0x10; });
  // An absurd size in record 7 (shape of "x" = 2^50), checksum recomputed so
  // only the size validation can catch it; must not try to allocate.
  mutate_record(path, 7, [](std::string& v) {
    std::vector<Field> f{{"index", FieldKind::Tensor, torch::tensor(int64_t{7})},
                         {"x", FieldKind::Tensor, torch::zeros({16})}};
    std::string fresh;
    encode_record(f, false, fresh);
    const int64_t huge = int64_t{1} << 50;
    const size_t pos = fresh.size() - 16 * 4 - 8 - 1 - 8;  // x's only size, before codec + nbytes + payload
    std::memcpy(&fresh[pos], &huge, 8);
    v = fresh;
  });
  Reader r(path, ReaderOptions{/*verify=*/true});
  expect_corrupted([&] { r.get(3); }, path, 3);
  expect_corrupted([&] { r.get(5); }, path, 5);
  expect_corrupted([&] { r.get(7); }, path, 7);
  std::vector<size_t> batch{1, 7};
  expect_corrupted([&] { r.read_batch(batch); }, path, 7);
  // The good records still read.
  EXPECT_EQ(r.get(4).find("index")->item<int64_t>(), 4);
  // Verification is the default: a reader opened without options catches the flip.
  Reader by_default(path);
  expect_corrupted([&] { by_default.get(5); }, path, 5);
  std::vector<size_t> with_five{4, 5};
  expect_corrupted([&] { by_default.read_batch(with_five); }, path, 5);
  // With verification off the flipped payload bit goes unnoticed (documented).
  ReaderOptions unchecked;
  unchecked.verify = false;
  Reader fast(path, unchecked);
  EXPECT_NO_THROW(fast.get(5));
  EXPECT_NO_THROW(fast.read_batch(with_five));
  expect_corrupted([&] { fast.get(3); }, path, 3);
}

TEST(Errors, OutOfRangeIndexIsIndexError) {
  TempDir tmp;
  const std::string path = tmp.sub("i.lmdb");
  torch_lmdb_test::write_dataset(path, 3);
  Reader r(path);
  EXPECT_THROW(r.get(3), c10::IndexError);
  std::vector<size_t> idx{0, 99};
  EXPECT_THROW(r.read_batch(idx), c10::IndexError);
  try {
    r.get(5);
  } catch (const c10::IndexError& e) {
    EXPECT_NE(std::string(e.what()).find("out of range for dataset of size 3"), std::string::npos);
  }
}

TEST(Errors, MissingAndForeignDatabases) {
  TempDir tmp;
  EXPECT_THROW(Reader(tmp.sub("nope")), NotFoundError);
  // A plain LMDB without our tables.
  const std::string plain = tmp.sub("plain");
  ASSERT_EQ(system(("mkdir -p " + plain).c_str()), 0);
  MDB_env* env;
  mdb_env_create(&env);
  ASSERT_EQ(mdb_env_open(env, plain.c_str(), 0, 0644), 0);
  mdb_env_close(env);
  EXPECT_THROW(Reader{plain}, InvalidDatabaseError);
}

TEST(Corruption, RecordOffTheSchemaIsCaughtEveryTimeDespiteTheLayoutCache) {
  TempDir tmp;
  const std::string path = tmp.sub("s.lmdb");
  torch_lmdb_test::write_dataset(path, 6);
  // Record 4 re-encoded with a renamed field of the same length: same size,
  // valid on its own, but not what the schema says.
  mutate_record(path, 4, [](std::string& v) {
    Sample s = torch_lmdb_test::make_sample(4);
    std::vector<Field> f;
    for (const auto& item : s) f.push_back({item.key() == "x" ? "y" : item.key(), FieldKind::Tensor, item.value()});
    encode_record(f, true, v);
  });
  Reader r(path);
  for (int round = 0; round < 2; ++round) {
    EXPECT_NO_THROW(r.get(3));  // a good record first: the cache holds the good layout
    try {
      r.get(4);
      FAIL() << "record 4 read without error";
    } catch (const CorruptedError& e) {
      EXPECT_NE(std::string(e.what()).find("does not match the schema"), std::string::npos) << e.what();
    }
    EXPECT_THROW(r.get(4), CorruptedError);  // again, right after: the cache holds the bad layout now
    std::vector<size_t> idx{2, 4};
    EXPECT_THROW(r.read_batch(idx), CorruptedError);
  }
}

// ---- compact records (version 4): fields by schema position ------------------
namespace {

std::vector<FieldSchema> schema_of(const std::vector<Field>& fields) {
  std::vector<FieldSchema> out;
  for (const Field& f : fields) out.push_back(FieldSchema{f.name, f.kind, f.tensor.scalar_type(), f.tensor.sizes().vec()});
  return out;
}

std::string compact(const std::vector<Field>& fields, bool checksum = true,
                    const std::vector<Compression>* codecs = nullptr) {
  EncodeOptions o;
  o.checksum = checksum;
  o.version = kCompactFormatVersion;
  o.compression = codecs;
  std::string out;
  append_record(fields, o, out);
  return out;
}

}  // namespace

TEST(CompactRecord, EveryDtypeAndShapeRoundTripsAgainstTheSchema) {
  const std::string path = "mem";
  for (at::ScalarType dtype : kAllDtypes) {
    const auto fields = variants_for(dtype);
    const auto schema = schema_of(fields);
    std::vector<Compression> codecs(fields.size(), Compression{Codec::BloscLZ4, 5});
    const std::vector<Compression>* const choices[] = {nullptr, &codecs};
    for (const auto* c : choices) {
      const std::string rec = compact(fields, true, c);
      EXPECT_EQ(record_version(rec.data(), rec.size()), kCompactFormatVersion);
      std::vector<FieldView> views;
      parse_record(rec.data(), rec.size(), true, RecordContext{&path, 3}, views, &schema);
      ASSERT_EQ(views.size(), fields.size());
      for (size_t f = 0; f < fields.size(); ++f) {
        EXPECT_TRUE(views[f].name_equals(fields[f].name));
        EXPECT_EQ(views[f].dtype, dtype);
        const at::Tensor got = to_tensor(views[f]);
        EXPECT_TRUE(torch::equal(got, fields[f].tensor.contiguous())) << fields[f].name << " " << dtype;
      }
    }
  }
}

TEST(CompactRecord, HeaderIsAFewBytesPerField) {
  // Five fields with long names: a version 2 record spends 20 + name + 8 per dim
  // on each; a compact one a codec byte and a varint per dim.
  std::vector<Field> fields{{"channel_impulse_response", FieldKind::Tensor, torch::zeros({8, 64})},
                            {"received_power", FieldKind::Tensor, torch::zeros({8})},
                            {"transmitter_position", FieldKind::Tensor, torch::zeros({3}, torch::kDouble)},
                            {"line_of_sight", FieldKind::Tensor, torch::zeros({8}, torch::kBool)},
                            {"path_delays", FieldKind::Tensor, torch::zeros({5, 3})}};
  size_t payload = 0;
  for (const Field& f : fields) payload += f.tensor.numel() * f.tensor.element_size();
  std::string v2;
  encode_record(fields, true, v2);
  const std::string v4 = compact(fields);
  // magic, version, flags (8) + count (1) + per field a codec byte + 1 byte per dim (< 128) + checksum (8)
  EXPECT_EQ(v4.size(), payload + 8 + 1 + (5 /* codec bytes */ + 7 /* dims */) + 8);
  EXPECT_GT(v2.size(), v4.size() + 5 * 20);
}

TEST(CompactRecord, NeedsTheSchemaAndRejectsAnotherOne) {
  std::vector<Field> fields{{"a", FieldKind::Tensor, torch::randn({3, 4})},
                            {"b", FieldKind::Str, torch::tensor({65, 66}, torch::kByte)}};
  const std::string rec = compact(fields);
  const std::string path = "db";
  RecordContext ctx{&path, 9};
  std::vector<FieldView> views;
  try {
    parse_record(rec.data(), rec.size(), false, ctx, views);
    ADD_FAILURE() << "a compact record parsed without a schema";
  } catch (const InvalidDatabaseError& e) {
    EXPECT_NE(std::string(e.what()).find("'db' index 9"), std::string::npos) << e.what();
  }
  auto one = schema_of({fields[0]});
  try {
    parse_record(rec.data(), rec.size(), false, ctx, views, &one);
    ADD_FAILURE() << "a 2-field record parsed against a 1-field schema";
  } catch (const CorruptedError& e) {
    EXPECT_NE(std::string(e.what()).find("2 fields but the schema 1"), std::string::npos) << e.what();
  }
  // A schema whose field has another ndim reads other bytes as sizes: the lengths no longer add up.
  auto other = schema_of(fields);
  other[0].shape = {12};
  EXPECT_THROW(parse_record(rec.data(), rec.size(), false, ctx, views, &other), CorruptedError);
  // The cached parser takes the same route.
  RecordTemplate tmpl;
  const auto schema = schema_of(fields);
  EXPECT_FALSE(parse_record_cached(rec.data(), rec.size(), true, ctx, views, tmpl, &schema));
  ASSERT_EQ(views.size(), 2u);
  EXPECT_TRUE(torch::equal(to_tensor(views[0]), fields[0].tensor));
  EXPECT_THROW(parse_record_cached(rec.data(), rec.size(), true, ctx, views, tmpl), InvalidDatabaseError);
}

TEST(CompactRecord, ParserRejectsEveryTruncationAndFlipWithoutCrashing) {
  at::Tensor smooth = torch::linspace(0, 10, 600).reshape({20, 30});
  std::vector<Field> fields{{"a", FieldKind::Tensor, smooth},
                            {"v", FieldKind::Tensor, torch::arange(7)},
                            {"e", FieldKind::Tensor, torch::zeros({0, 5})},
                            {"s", FieldKind::Str, torch::tensor({65, 66, 67}, torch::kByte)}};
  const auto schema = schema_of(fields);
  const std::string path = "mem";
  RecordContext ctx{&path, 1};
  std::vector<Compression> codecs(fields.size(), Compression{Codec::BloscZstd, 3});
  const std::vector<Compression>* const choices[] = {nullptr, &codecs};
  for (const auto* c : choices) {
    const std::string rec = compact(fields, true, c);
    std::vector<FieldView> views;
    parse_record(rec.data(), rec.size(), true, ctx, views, &schema);
    if (c) EXPECT_EQ(views[0].codec, Codec::BloscZstd);
    for (size_t len = 0; len < rec.size(); ++len) {
      const std::string cut = rec.substr(0, len);
      EXPECT_THROW(parse_record(cut.data(), cut.size(), false, ctx, views, &schema), CorruptedError) << len;
    }
    std::mt19937 rng(2);
    for (int trial = 0; trial < 2000; ++trial) {
      std::string bad = rec;
      bad[rng() % bad.size()] ^= static_cast<char>(1 << (rng() % 8));
      EXPECT_ANY_THROW(parse_record(bad.data(), bad.size(), true, ctx, views, &schema));
      try {
        parse_record(bad.data(), bad.size(), false, ctx, views, &schema);
        for (const FieldView& v : views) (void)to_tensor(v);  // a decode stays inside its payload
      } catch (const Error&) {
      } catch (const c10::Error&) {
      }
    }
  }
  // A size varint longer than 9 bytes.
  std::vector<FieldView> views;
  std::string rec = compact({fields[1]}, false);
  auto one = schema_of({fields[1]});
  std::string longer = rec.substr(0, 10) + std::string(9, '\x80') + '\x01' + rec.substr(10);
  EXPECT_THROW(parse_record(longer.data(), longer.size(), false, ctx, views, &one), CorruptedError);
}

// hash_and_copy (verified batches: the record hashed while its payloads are
// copied) returns xxh3-64 of the body and copies every span, for bodies on
// both sides of xxh3's long-input threshold (240 bytes) and of its blocks
// (1 KiB), with spans that start and end inside stripes, touch each other,
// end at the body's end, are empty, or are out of order (copied after).
TEST(Checksum, HashAndCopyIsXxh3AndCopiesEverySpan) {
  std::mt19937_64 rng(7);
  for (size_t size : {1, 100, 240, 241, 255, 256, 1023, 1024, 1025, 4109, 16461, 70000}) {
    std::string body(size, '\0');
    for (char& c : body) c = static_cast<char>(rng());
    const uint64_t want = XXH3_64bits(body.data(), size);
    for (int trial = 0; trial < 40; ++trial) {
      // Random cut points: spans are every other piece between them.
      std::vector<size_t> cuts{0, size};
      for (int c = 0; c < 6; ++c) cuts.push_back(rng() % (size + 1));
      std::sort(cuts.begin(), cuts.end());
      std::vector<std::string> dst;
      std::vector<torch_lmdb::detail::CopySpan> spans;
      for (size_t c = trial % 2; c + 1 < cuts.size(); c += 2) dst.emplace_back(cuts[c + 1] - cuts[c], '\0');
      size_t d = 0;
      for (size_t c = trial % 2; c + 1 < cuts.size(); c += 2, ++d)
        spans.push_back(torch_lmdb::detail::CopySpan{body.data() + cuts[c], cuts[c + 1] - cuts[c], dst[d].data()});
      if (trial % 5 == 4) std::reverse(spans.begin(), spans.end());  // not in order: copied after the hash
      ASSERT_EQ(torch_lmdb::detail::hash_and_copy(body.data(), size, spans.data(), spans.size()), want) << size;
      for (const torch_lmdb::detail::CopySpan& sp : spans)
        ASSERT_EQ(std::memcmp(sp.dst, sp.src, sp.size), 0) << "size " << size << " span at " << (sp.src - body.data());
    }
  }
}

// A reader with verify catches a flipped byte anywhere in a record of several
// fields (header, either payload, the checksum) in a batch, naming the file
// and the index, and reads the same batches as without verify otherwise.
TEST(Corruption, VerifiedBatchesCatchAFlipAnywhereInTheRecord) {
  TempDir tmp;
  const std::string path = tmp.sub("v.lmdb");
  {
    Writer w(path);
    for (int64_t i = 0; i < 12; ++i) {
      Sample s;
      s.insert("a", torch::arange(1500, torch::kFloat) * static_cast<float>(i));
      s.insert("b", torch::arange(700, torch::kInt) - static_cast<int>(i));
      s.insert("label", torch::tensor(i));
      w.write(s);
    }
    w.close();
  }
  std::vector<size_t> all(12);
  std::iota(all.begin(), all.end(), 0);
  {
    ReaderOptions unchecked;
    unchecked.verify = false;
    Reader plain(path, unchecked), checked(path, ReaderOptions{/*verify=*/true});
    const Batch x = plain.read_batch(all), y = checked.read_batch(all);
    for (const char* f : {"a", "b", "label"}) EXPECT_TRUE(x.tensors.find(f)->equal(*y.tensors.find(f))) << f;
  }
  // Flips at 10 bytes from the start (header), in a's and b's payloads, and
  // in the last byte (the checksum).
  const std::vector<std::pair<uint64_t, double>> flips{{2, 0.0}, {5, 0.3}, {8, 0.9}, {11, 1.0}};
  for (const auto& [index, where] : flips) {
    mutate_record(path, index, [where = where](std::string& v) {
      const size_t at = where == 0.0 ? 10 : where == 1.0 ? v.size() - 1 : static_cast<size_t>(v.size() * where);
      v[at] ^= 0x04;
    });
  }
  Reader checked(path, ReaderOptions{/*verify=*/true});
  for (const auto& [index, where] : flips) {
    std::vector<size_t> batch{0, 1, static_cast<size_t>(index), 3};
    expect_corrupted([&] { checked.read_batch(batch); }, path, index);
  }
  std::vector<size_t> good{0, 1, 3, 4, 6, 7, 9, 10};
  const Batch b = checked.read_batch(good);
  for (size_t k = 0; k < good.size(); ++k)
    EXPECT_EQ(b.tensors.find("label")->select(0, static_cast<int64_t>(k)).item<int64_t>(), static_cast<int64_t>(good[k]));
  EXPECT_TRUE(b.tensors.find("a")->select(0, 7).equal(torch::arange(1500, torch::kFloat) * 10.0f));
}
