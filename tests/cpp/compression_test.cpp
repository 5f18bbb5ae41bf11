// Per-field Blosc compression (record format version 2) and version 1 records.
#include <lmdb.h>
#include <torch/types.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <thread>
#include <nlohmann/json.hpp>

#include "test_util.h"
#include "torch_lmdb/detail/columns.h"

using namespace torch_lmdb;
using torch_lmdb_test::mutate_record;
using torch_lmdb_test::kAllDtypes;
using torch_lmdb_test::TempDir;

namespace {


// Compressible but not constant: a smooth signal with some noise, cast.
at::Tensor signal_of(at::IntArrayRef shape, at::ScalarType dtype, int64_t seed) {
  torch::manual_seed(seed);
  if (dtype == at::kBool) return torch::arange(c10::multiply_integers(shape)).reshape(shape).remainder(7) == 0;
  at::Tensor base = torch::linspace(0, 50, c10::multiply_integers(shape)).reshape(shape);
  if (at::isComplexType(dtype)) return torch::complex(base, -base).to(dtype);
  if (at::isFloatingType(dtype)) return (base + 0.01 * torch::randn(shape)).to(dtype);
  return base.round().to(dtype);
}

std::vector<Field> sample_of(at::ScalarType dtype, int64_t i) {
  return {
      Field{"big", FieldKind::Tensor, signal_of({64, 33}, dtype, i)},
      Field{"small", FieldKind::Tensor, signal_of({3}, dtype, i)},    // under kMinCompressBytes: raw
      Field{"empty", FieldKind::Tensor, signal_of({0, 4}, dtype, i)},  // no payload
      Field{"scalar", FieldKind::Tensor, signal_of({}, dtype, i)},
      Field{"text", FieldKind::Str, torch::full({300}, 'a', torch::kByte)},  // str: stored raw
      Field{"blob", FieldKind::Bytes, torch::full({200}, 7, torch::kByte)},
  };
}

std::vector<FieldView> parse_value(const std::string& path, uint64_t index, std::string& holder) {
  MDB_env* env;
  EXPECT_EQ(mdb_env_create(&env), 0);
  mdb_env_set_maxdbs(env, 4);
  EXPECT_EQ(mdb_env_open(env, path.c_str(), MDB_RDONLY | MDB_NOLOCK, 0644), 0);  // no reader slot: a Reader of the file may be open
  MDB_txn* txn;
  EXPECT_EQ(mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn), 0);
  MDB_dbi dbi;
  EXPECT_EQ(mdb_dbi_open(txn, "samples", 0, &dbi), 0);
  const uint64_t per_value = torch_lmdb_test::raw_samples_per_value(txn);
  unsigned char key[8];
  encode_key(index / per_value, key);
  MDB_val k{8, key}, v;
  EXPECT_EQ(mdb_get(txn, dbi, &k, &v), 0);
  if (per_value > 1) {
    const auto records = torch_lmdb_test::unpack_value(v, per_value);
    EXPECT_LT(index % per_value, records.size());
    holder = records.at(index % per_value);
  } else {
    holder.assign(static_cast<char*>(v.mv_data), v.mv_size);
  }
  mdb_txn_abort(txn);
  mdb_env_close(env);
  std::vector<FieldView> views;
  RecordContext ctx{&path, index};
  static std::vector<FieldSchema> schema;  // compact records name their fields by position
  schema = Reader(path).schema();
  parse_record(holder.data(), holder.size(), true, ctx, views, &schema);
  return views;
}

void expect_corrupted(const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "expected CorruptedError";
  } catch (const CorruptedError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "no '" << n << "' in: " << msg;
  }
}

}  // namespace

TEST(Compression, EveryDtypeRoundTripsWithEachCodecOnEveryReadPath) {
  TempDir tmp;
  for (const char* codec : {"lz4", "zstd:9"}) {
    for (auto dtype : kAllDtypes) {
      SCOPED_TRACE(std::string(codec) + " " + c10::toString(dtype));
      const std::string path = tmp.sub(std::string(codec).substr(0, 3) + c10::toString(dtype));
      WriterOptions o;
      o.compression = codec;
      std::vector<std::vector<Field>> written;
      {
        Writer w(path, o);
        for (int64_t i = 0; i < 3; ++i) {
          written.push_back(sample_of(dtype, i));
          w.write(written.back());
        }
        w.close();
      }
      // Each record names its codecs: big compressed, the rest raw.
      std::string holder;
      const auto views = parse_value(path, 1, holder);
      ASSERT_EQ(views.size(), 6u);
      const Codec expected = codec[0] == 'l' ? Codec::BloscLZ4 : Codec::BloscZstd;
      EXPECT_EQ(views[0].codec, expected);
      EXPECT_LT(views[0].stored, views[0].nbytes);
      for (size_t f = 1; f < views.size(); ++f) EXPECT_EQ(views[f].codec, Codec::None) << views[f].name_str();

      Reader r(path, ReaderOptions{/*verify=*/true});
      for (size_t i = 0; i < 3; ++i) {
        const auto got = r.get_fields(i);
        ASSERT_EQ(got.size(), written[i].size());
        for (size_t f = 0; f < got.size(); ++f) {
          EXPECT_EQ(got[f].kind, written[i][f].kind);
          EXPECT_TRUE(torch::equal(got[f].tensor, written[i][f].tensor)) << got[f].name;
        }
      }
      // Batched (fixed shapes: decoded straight into the batch), shuffled order.
      std::vector<size_t> order{2, 0, 1};
      const Batch b = r.read_batch(order);
      for (size_t j = 0; j < order.size(); ++j) {
        EXPECT_TRUE(torch::equal(b.tensors["big"][j], written[order[j]][0].tensor));
        EXPECT_TRUE(torch::equal(b.tensors["scalar"][j], written[order[j]][3].tensor));
      }
      // A caller's allocator takes the general path.
      BatchOptions alloc;
      alloc.allocate = [](at::IntArrayRef shape, at::ScalarType t) { return at::empty(shape, t); };
      const Batch c = r.read_batch(order, alloc);
      for (size_t j = 0; j < order.size(); ++j)
        EXPECT_TRUE(torch::equal(c.tensors["big"][j], written[order[j]][0].tensor));
    }
  }
}

TEST(Compression, PaddedBatchOfCompressedVariableLengthField) {
  TempDir tmp;
  const std::string path = tmp.sub("ragged");
  WriterOptions o;
  o.field_compression = {{"v", "zstd"}};
  std::vector<at::Tensor> values;
  {
    Writer w(path, o);
    for (int64_t i = 0; i < 4; ++i) {
      values.push_back(torch::arange(100 + 50 * i, torch::kFloat).remainder(13));
      w.write({Field{"v", FieldKind::Tensor, values.back()}, Field{"y", FieldKind::Tensor, torch::zeros({64})}});
    }
    w.close();
  }
  std::string holder;
  EXPECT_EQ(parse_value(path, 3, holder)[0].codec, Codec::BloscZstd);
  EXPECT_EQ(parse_value(path, 3, holder)[1].codec, Codec::None);  // not named: raw
  Reader r(path);
  BatchOptions pad;
  pad.pad = true;
  pad.pad_value = -1;
  std::vector<size_t> idx{3, 0, 2};
  const Batch b = r.read_batch(idx, pad);
  for (size_t j = 0; j < idx.size(); ++j) {
    const int64_t n = values[idx[j]].size(0);
    EXPECT_TRUE(torch::equal(b.tensors["v"][j].slice(0, 0, n), values[idx[j]]));
    EXPECT_TRUE((b.tensors["v"][j].slice(0, n) == -1).all().item<bool>());
  }
}

TEST(Compression, IncompressiblePayloadsAreStoredRawAndMetadataCountsBytes) {
  TempDir tmp;
  const std::string path = tmp.sub("noise");
  WriterOptions o;
  o.compression = "lz4";
  torch::manual_seed(3);
  const at::Tensor noise = torch::randint(0, 256, {4096}, torch::kByte);
  const at::Tensor zeros = torch::zeros({4096}, torch::kFloat);
  {
    Writer w(path, o);
    w.write({Field{"noise", FieldKind::Tensor, noise}, Field{"zeros", FieldKind::Tensor, zeros}});
    w.close();
  }
  std::string holder;
  const auto views = parse_value(path, 0, holder);
  EXPECT_EQ(views[0].codec, Codec::None);
  EXPECT_EQ(views[0].stored, 4096u);
  EXPECT_EQ(views[1].codec, Codec::BloscLZ4);
  Reader r(path);
  const auto meta = nlohmann::json::parse(r.metadata_json());
  EXPECT_EQ(meta["format_version"], kColumnarFormatVersion);  // compressed: compact records, several per value
  EXPECT_EQ(meta["compression"]["noise"]["codec"], "lz4");
  EXPECT_EQ(meta["compression"]["noise"]["stored_bytes"], 4096);
  EXPECT_EQ(meta["compression"]["zeros"]["raw_bytes"], 4096 * 4);
  EXPECT_EQ(meta["compression"]["zeros"]["stored_bytes"], views[1].stored);
  EXPECT_TRUE(torch::equal(r.get_fields(0)[0].tensor, noise));
}

TEST(Compression, DamagedCompressedPayloadRaisesCorruptedErrorNamingPathIndexAndField) {
  for (int version : {kFormatVersion, kCompactFormatVersion}) {
  SCOPED_TRACE(version);
  TempDir tmp;
  const std::string path = tmp.sub("damaged");
  WriterOptions o;
  o.compression = "zstd";
  o.format_version = version;
  o.checksum = false;  // only the codec's own checks stand between damage and the tensor
  {
    Writer w(path, o);
    for (int64_t i = 0; i < 6; ++i)
      w.write({Field{"id", FieldKind::Tensor, torch::tensor(i)},
               Field{"cir", FieldKind::Tensor, signal_of({32, 64}, at::kComplexFloat, i)}});
    w.close();
  }
  std::string holder;
  const auto views = parse_value(path, 0, holder);
  ASSERT_EQ(views[1].codec, Codec::BloscZstd);
  const size_t frame = static_cast<size_t>(views[1].data - holder.data());
  const size_t stored = static_cast<size_t>(views[1].stored);
  // 1: the frame's declared compressed length (header bytes 12-15) doubled.
  mutate_record(path, 1, [&](std::string& v) { v[frame + 13] ^= 0x40; });
  // 2: its declared decompressed length (bytes 4-7).
  mutate_record(path, 2, [&](std::string& v) { v[frame + 5] ^= 0x01; });
  // 3: the compressed stream itself, past the header and block offsets.
  mutate_record(path, 3, [&](std::string& v) {
    for (size_t p = frame + 24; p < frame + stored; p += 3) v[p] = static_cast<char>(v[p] ^ 0x5a);
  });
  // 4: the frame truncated (payload length and record shortened together).
  mutate_record(path, 4, [&](std::string& v) {
    const uint64_t shorter = stored / 2;
    if (version == kFormatVersion) {
      std::memcpy(&v[frame - 8], &shorter, 8);  // u64 payload length
    } else {
      size_t n = 1;  // a varint ends right before the frame: rewrite it in as many bytes
      while (static_cast<uint8_t>(v[frame - n - 1]) & 0x80) ++n;
      for (size_t b = 0; b < n; ++b)
        v[frame - n + b] = static_cast<char>(((shorter >> (7 * b)) & 0x7f) | (b + 1 < n ? 0x80 : 0));
    }
    v.erase(frame + shorter, stored - shorter);
  });
  // 5: the header says another compressor.
  mutate_record(path, 5, [&](std::string& v) { v[frame + 2] = static_cast<char>((v[frame + 2] & 0x1f) | (1 << 5)); });
  Reader r(path);
  for (uint64_t i : {1, 2, 3, 4, 5}) {
    SCOPED_TRACE(i);
    expect_corrupted([&] { r.get_fields(i); }, {path, "index " + std::to_string(i), "'cir'"});
    std::vector<size_t> batch{0, static_cast<size_t>(i)};
    expect_corrupted([&] { r.read_batch(batch); }, {path, "index " + std::to_string(i), "'cir'"});
  }
  // The record after a damaged one (same layout: a template hit) still reads.
  EXPECT_TRUE(torch::equal(r.get_fields(0)[1].tensor, signal_of({32, 64}, at::kComplexFloat, 0)));
  }
}

TEST(Compression, Version1FilesAreReadAndAppendingCompressedUpgradesThem) {
  TempDir tmp;
  const std::string path = tmp.sub("v1");
  WriterOptions v1;
  v1.format_version = 1;
  torch_lmdb_test::write_dataset(path, 5, 0, v1);
  std::string holder;
  parse_value(path, 0, holder);
  uint16_t version = 0;
  std::memcpy(&version, holder.data() + 4, 2);
  EXPECT_EQ(version, 1);
  {
    Reader r(path);
    EXPECT_EQ(nlohmann::json::parse(r.metadata_json())["format_version"], 1);
    for (size_t i = 0; i < 5; ++i) EXPECT_TRUE(torch::equal(*r.get(i).find("x"), *torch_lmdb_test::make_sample(i).find("x")));
  }
  // Appending without compression keeps version 1 records.
  WriterOptions plain;
  plain.append = true;
  torch_lmdb_test::write_dataset(path, 1, 5, plain);
  std::memcpy(&version, (parse_value(path, 5, holder), holder.data() + 4), 2);
  EXPECT_EQ(version, 1);
  // Appending with compression: version 2 records after version 1 ones.
  WriterOptions comp;
  comp.append = true;
  comp.compression = "lz4";
  {
    Writer w(path, comp);
    w.write(torch_lmdb_test::make_sample(6, 256));
    w.close();
  }
  Reader r(path);
  EXPECT_EQ(nlohmann::json::parse(r.metadata_json())["format_version"], 2);
  EXPECT_EQ(parse_value(path, 6, holder)[1].codec, Codec::BloscLZ4);
  std::vector<size_t> all{0, 1, 2, 3, 4, 5};
  const Batch b = r.read_batch(all);
  for (size_t i = 0; i < all.size(); ++i)
    EXPECT_TRUE(torch::equal(b.tensors["x"][i], *torch_lmdb_test::make_sample(i).find("x")));
  EXPECT_TRUE(torch::equal(r.get_fields(6)[1].tensor, *torch_lmdb_test::make_sample(6, 256).find("x")));
  // Version 1 cannot carry a codec.
  WriterOptions bad = v1;
  bad.compression = "zstd";
  EXPECT_THROW(Writer(tmp.sub("bad"), bad), c10::ValueError);
}

TEST(Compression, BadCodecsAndUnknownFieldsAreRefusedNamingTheField) {
  TempDir tmp;
  auto message = [&](WriterOptions o, bool write) -> std::string {
    try {
      Writer w(tmp.sub("e" + std::to_string(rand())), o);
      if (write) w.write(torch_lmdb_test::make_sample(0));
    } catch (const c10::ValueError& e) {
      return e.what();
    }
    return "";
  };
  WriterOptions a;
  a.field_compression = {{"x", "gzip"}};
  EXPECT_NE(message(a, false).find("field 'x': unknown codec 'gzip'"), std::string::npos) << message(a, false);
  WriterOptions b;
  b.compression = "zstd:12";
  EXPECT_NE(message(b, false).find("level '12'"), std::string::npos);
  WriterOptions c;
  c.field_compression = {{"nope", "lz4"}};
  const std::string m = message(c, true);
  EXPECT_NE(m.find("'nope'"), std::string::npos) << m;
  EXPECT_NE(m.find("index, x"), std::string::npos) << m;  // lists the fields
  EXPECT_EQ(parse_compression("zstd:3", "f").level, 3);
  EXPECT_EQ(parse_compression("", "f").codec, Codec::None);
}

// ---- packed values (format version 3) ---------------------------------------
namespace {

// 2-3 KiB records once compressed: the size LMDB stores worst alone.
std::vector<Field> packed_sample(int64_t i) {
  at::Tensor cir = signal_of({8, 96}, at::kFloat, i) + static_cast<float>(i);
  torch::manual_seed(i + 1000);
  cir += torch::randn({8, 96});  // noise: Blosc leaves ~2.5 KiB of the 3 KiB: one 4 KiB page alone
  return {Field{"cir", FieldKind::Tensor, cir}, Field{"id", FieldKind::Tensor, torch::tensor(i)},
          Field{"paths", FieldKind::Tensor, torch::full({i % 5, 4}, static_cast<float>(i))},
          Field{"scene", FieldKind::Str, torch::full({i % 3 + 1}, 'a' + i % 26, torch::kByte)}};
}

void expect_packed_sample(const std::vector<Field>& got, int64_t i) {
  const auto want = packed_sample(i);
  ASSERT_EQ(got.size(), want.size());
  for (size_t f = 0; f < want.size(); ++f) {
    EXPECT_EQ(got[f].name, want[f].name);
    EXPECT_TRUE(torch::equal(got[f].tensor, want[f].tensor)) << "sample " << i << " field " << want[f].name;
  }
}

// packed_sample(0 .. n - 1), written to `path` with `o`.
void write_packed(const std::string& path, int64_t n, const WriterOptions& o) {
  Writer w(path, o);
  for (int64_t i = 0; i < n; ++i) w.write(packed_sample(i));
  w.close();
}

nlohmann::json raw_meta(const std::string& path) { return nlohmann::json::parse(Reader(path).metadata_json()); }

// Every value of the samples database, in key order.
std::vector<std::string> all_values(const std::string& path) {
  MDB_env* env;
  EXPECT_EQ(mdb_env_create(&env), 0);
  mdb_env_set_maxdbs(env, 4);
  EXPECT_EQ(mdb_env_open(env, path.c_str(), MDB_RDONLY | MDB_NOLOCK, 0644), 0);
  MDB_txn* txn;
  EXPECT_EQ(mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn), 0);
  MDB_dbi dbi;
  EXPECT_EQ(mdb_dbi_open(txn, "samples", 0, &dbi), 0);
  MDB_cursor* c;
  EXPECT_EQ(mdb_cursor_open(txn, dbi, &c), 0);
  std::vector<std::string> out;
  MDB_val k, v;
  for (int op = MDB_FIRST; mdb_cursor_get(c, &k, &v, static_cast<MDB_cursor_op>(op)) == 0; op = MDB_NEXT)
    out.emplace_back(static_cast<const char*>(v.mv_data), v.mv_size);
  mdb_cursor_close(c);
  mdb_txn_abort(txn);
  mdb_env_close(env);
  return out;
}

size_t raw_values(const std::string& path) { return all_values(path).size(); }

// Every read path of `path` gives back sample i as written, for i < n.
void expect_all_read_paths(const std::string& path, int64_t n) {
  for (auto mode : {PageRequests::Never, PageRequests::Always, PageRequests::Auto}) {
    for (bool keep : {true, false}) {
      ReaderOptions ro;
      ro.page_requests = mode;
      ro.keep_cache = keep;
      ro.verify = true;
      // Always: the page requests alone; Auto: cold batches read through io_uring.
      ro.direct_reads = mode == PageRequests::Auto;
      Reader r(path, ro);
      ASSERT_EQ(r.size(), static_cast<size_t>(n));
      for (int64_t i = 0; i < n; i += 3) expect_packed_sample(r.get_fields(static_cast<size_t>(i)), i);
      // Sequential runs (the cursor walks values and the records inside them) and a shuffled batch.
      std::vector<size_t> seq(static_cast<size_t>(n)), shuffled;
      std::iota(seq.begin(), seq.end(), 0);
      for (size_t i = 0; i < seq.size(); ++i) shuffled.push_back((i * 37 + 11) % seq.size());
      for (const auto* order : {&seq, &shuffled}) {
        const auto samples = r.get_many(*order);
        for (size_t j = 0; j < order->size(); ++j) EXPECT_EQ(samples[j].find("id")->item<int64_t>(), (int64_t)(*order)[j]);
        BatchOptions bo;
        bo.pad = true;
        const Batch b = r.read_batch(*order, bo);
        for (size_t j = 0; j < order->size(); ++j) {
          const int64_t i = static_cast<int64_t>((*order)[j]);
          EXPECT_TRUE(torch::equal(b.tensors["cir"][static_cast<int64_t>(j)], packed_sample(i)[0].tensor));
          EXPECT_EQ(b.blobs.at(0).values.at(j), std::string(static_cast<size_t>(i % 3 + 1), static_cast<char>('a' + i % 26)));
        }
        if (mode == PageRequests::Always) EXPECT_GT(r.request_pages(*order).bytes, 0u);
      }
    }
  }
}

}  // namespace

TEST(Packing, CompressedDatabasesPackSamplesAndEveryReadPathReadsThem) {
  TempDir tmp;
  WriterOptions o;
  o.compression = "lz4";
  o.commit_every = 7;  // commits end inside values: each rewrites the last one
  const int64_t n = 103;
  {
    Writer w(tmp.sub("a"), o);
    for (int64_t i = 0; i < n; ++i) w.write(packed_sample(i));
    w.close();
  }
  const auto meta = raw_meta(tmp.sub("a"));
  EXPECT_EQ(meta["format_version"], kColumnarFormatVersion);  // packed, compact records, columns
  const uint64_t per_value = meta["samples_per_value"].get<uint64_t>();
  EXPECT_GT(per_value, 20u);  // ~128 KiB of ~2.3 KiB records
  EXPECT_EQ(raw_values(tmp.sub("a")), (n + per_value - 1) / per_value);
  expect_all_read_paths(tmp.sub("a"), n);

  // The same samples one per value: LMDB's whole pages per value make it larger
  // (both written in one commit: rewriting a part value leaves free pages behind).
  o.commit_every = 0;
  {
    Writer w(tmp.sub("c"), o);
    for (int64_t i = 0; i < n; ++i) w.write(packed_sample(i));
    w.close();
  }
  o.samples_per_value = 1;
  {
    Writer w(tmp.sub("b"), o);
    for (int64_t i = 0; i < n; ++i) w.write(packed_sample(i));
    w.close();
  }
  EXPECT_EQ(raw_meta(tmp.sub("b"))["format_version"], kCompactFormatVersion);  // compact records, one per value
  EXPECT_EQ(raw_meta(tmp.sub("b")).count("samples_per_value"), 0u);
  EXPECT_EQ(raw_values(tmp.sub("b")), static_cast<size_t>(n));
  // The pages LMDB used (file sizes include the map's unused tail).
  auto used = [](const std::string& path) {
    MDB_env* env;
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 4);
    mdb_env_open(env, path.c_str(), MDB_RDONLY | MDB_NOLOCK, 0644);
    MDB_envinfo info;
    mdb_env_info(env, &info);
    mdb_env_close(env);
    return info.me_last_pgno;
  };
  EXPECT_LT(used(tmp.sub("c")) * 4, used(tmp.sub("b")) * 3) << used(tmp.sub("c")) << " vs " << used(tmp.sub("b"));
}

TEST(Packing, ExplicitPackingAppendContinuesThePartValueAndKeepsItsPacking) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.samples_per_value = 5;  // uncompressed, packed on request
  {
    Writer w(path, o);
    for (int64_t i = 0; i < 23; ++i) w.write(packed_sample(i));
    w.close();
  }
  EXPECT_EQ(raw_values(path), 5u);
  WriterOptions a;
  a.append = true;
  a.commit_every = 4;
  {
    Writer w(path, a);  // samples_per_value 0: the database's
    for (int64_t i = 23; i < 33; ++i) w.write(packed_sample(i));
    w.close();
  }
  EXPECT_EQ(raw_meta(path)["samples_per_value"], 5);
  EXPECT_EQ(raw_values(path), 7u);
  expect_all_read_paths(path, 33);
  a.samples_per_value = 4;
  try {
    Writer w(path, a);
    ADD_FAILURE() << "expected ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("5 sample(s) per value"), std::string::npos) << e.what();
  }
  WriterOptions bad;
  bad.samples_per_value = kMaxSamplesPerValue + 1;
  EXPECT_THROW(Writer(tmp.sub("x"), bad), c10::ValueError);
}

TEST(Packing, MapFullReplayKeepsThePartValue) {
  TempDir tmp;
  WriterOptions o;
  o.compression = "zstd";
  o.samples_per_value = 6;
  o.map_size = 1 << 20;  // grows several times, replaying batches that end inside values
  o.commit_every = 5;
  {
    Writer w(tmp.sub("db"), o);
    for (int64_t i = 0; i < 700; ++i) w.write(packed_sample(i));
    w.close();
  }
  Reader r(tmp.sub("db"));
  ASSERT_EQ(r.size(), 700u);
  for (int64_t i = 0; i < 700; ++i) expect_packed_sample(r.get_fields(static_cast<size_t>(i)), i);
}

TEST(Packing, DamagedPackedValuesRaiseCorruptedErrorNamingTheIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.compression = "lz4";
  o.samples_per_value = 4;
  o.format_version = kCompactFormatVersion;  // "TLMP" values (Columns.* damage columnar ones)
  write_packed(path, 16, o);
  // A record inside a value: its checksum names the sample.
  mutate_record(path, 6, [](std::string& v) { v[v.size() / 2] ^= 0x5a; });
  // A value's header: an end past the value.
  torch_lmdb_test::edit_samples(path, [](MDB_txn* txn, MDB_dbi dbi) {
    unsigned char key[8];
    encode_key(3, key);  // samples 12..15
    MDB_val k{8, key}, v;
    ASSERT_EQ(mdb_get(txn, dbi, &k, &v), 0);
    std::string value(static_cast<char*>(v.mv_data), v.mv_size);
    const uint32_t huge = 0x7fffffff;
    std::memcpy(&value[8 + 4 * 1], &huge, 4);  // sample 13's end
    MDB_val nv{value.size(), value.data()};
    ASSERT_EQ(mdb_put(txn, dbi, &k, &nv, 0), 0);
    encode_key(2, key);  // samples 8..11: gone
    ASSERT_EQ(mdb_del(txn, dbi, &k, nullptr), 0);
  });
  for (auto mode : {PageRequests::Never, PageRequests::Always}) {
    ReaderOptions ro;
    ro.verify = true;
    ro.page_requests = mode;
    Reader r(path, ro);
    expect_corrupted([&] { r.get_fields(6); }, {path, "index 6"});
    expect_corrupted([&] { r.get_fields(13); }, {path, "sample index 13", "samples 12 to 15", "damaged"});
    expect_corrupted([&] { r.get_fields(14); }, {path, "sample index 14"});  // after the bad end: unordered
    expect_corrupted([&] { r.get_fields(9); }, {path, "sample index 9", "missing"});
    expect_corrupted([&] { r.read_batch(std::vector<size_t>{0, 1, 13}); }, {"sample index 13"});
    expect_corrupted([&] { r.read_batch(std::vector<size_t>{4, 5, 6, 7}); }, {"index 6"});
    // The samples of sound values still read.
    for (int64_t i : {0, 5, 7, 12}) expect_packed_sample(r.get_fields(static_cast<size_t>(i)), i);
  }
  // Appending refuses a file whose values do not match the count (16 samples: 4 values, 3 left) ...
  WriterOptions a;
  a.append = true;
  EXPECT_THROW(Writer(path, a), CorruptedError);
  // ... and a last value that holds more records than the metadata counts.
  const std::string other = tmp.sub("other");
  write_packed(other, 10, o);  // values 0-3, 4-7, 8-9
  torch_lmdb_test::edit_samples(other, [](MDB_txn* txn, MDB_dbi dbi) {
    unsigned char key[8];
    encode_key(2, key);
    MDB_val k{8, key}, v;
    ASSERT_EQ(mdb_get(txn, dbi, &k, &v), 0);
    auto records = torch_lmdb_test::unpack_value(v, 4);
    ASSERT_EQ(records.size(), 2u);
    records.push_back(records[1]);
    const std::string value = torch_lmdb_test::pack_records(records);
    MDB_val nv{value.size(), const_cast<char*>(value.data())};
    ASSERT_EQ(mdb_put(txn, dbi, &k, &nv, 0), 0);
  });
  expect_corrupted([&] { Writer w(other, a); }, {other, "samples 8 to 9", "more than the 2 records"});
}

// ---- compact records (format version 4) -------------------------------------
namespace {

// The record version and size of sample `index`'s record.
std::pair<uint16_t, size_t> record_info(const std::string& path, uint64_t index) {
  std::string holder;
  parse_value(path, index, holder);
  return {record_version(holder.data(), holder.size()), holder.size()};
}

}  // namespace

// ---- columnar packed values (format version 5, detail/columns.h) -----------
namespace {

uint32_t u32_at(const std::string& v, size_t at) {
  uint32_t x;
  std::memcpy(&x, v.data() + at, 4);
  return x;
}

// Offset of a columnar value's column section (after its u32 size).
size_t section_at(const std::string& v) { return 8 + 4 * size_t{u32_at(v, 4)} + 4; }

// Rewrites value `key` of `path` with `edit`.
void edit_value(const std::string& path, uint64_t key, const std::function<void(std::string&)>& edit) {
  torch_lmdb_test::edit_samples(path, [&](MDB_txn* txn, MDB_dbi dbi) {
    unsigned char k8[8];
    encode_key(key, k8);
    MDB_val k{8, k8}, v;
    ASSERT_EQ(mdb_get(txn, dbi, &k, &v), 0);
    std::string value(static_cast<char*>(v.mv_data), v.mv_size);
    edit(value);
    MDB_val nv{value.size(), value.data()};
    ASSERT_EQ(mdb_put(txn, dbi, &k, &nv, 0), 0);
  });
}

size_t total_bytes(const std::vector<std::string>& values) {
  size_t n = 0;
  for (const auto& v : values) n += v.size();
  return n;
}

}  // namespace

TEST(Columns, SmallFieldsAreCompressedAcrossTheSamplesOfAValue) {
  TempDir tmp;
  const int64_t n = 192;  // 12 full values
  WriterOptions o;
  o.compression = "lz4";
  o.samples_per_value = 16;
  o.commit_every = 7;  // commits end inside values: each rewrites the last one
  write_packed(tmp.sub("columnar"), n, o);
  o.format_version = kCompactFormatVersion;
  write_packed(tmp.sub("compact"), n, o);
  const auto columnar = all_values(tmp.sub("columnar")), compact = all_values(tmp.sub("compact"));
  ASSERT_EQ(columnar.size(), compact.size());
  for (const auto& v : columnar) EXPECT_EQ(u32_at(v, 0), kColumnPackMagic);
  for (const auto& v : compact) EXPECT_EQ(u32_at(v, 0), kPackMagic);
  // "id" (8 bytes: 128 a value, 56 as a column) and "paths" (0-64 bytes) go to columns.
  EXPECT_LT(total_bytes(columnar) + 15 * n, total_bytes(compact));
  expect_all_read_paths(tmp.sub("columnar"), n);
  // The metadata counts what the columns store; the compact database what its records do.
  const auto meta = raw_meta(tmp.sub("columnar"))["compression"], plain = raw_meta(tmp.sub("compact"))["compression"];
  EXPECT_EQ(raw_meta(tmp.sub("columnar"))["format_version"], kColumnarFormatVersion);
  EXPECT_EQ(plain["id"]["stored_bytes"], 8 * n);
  EXPECT_LT(meta["id"]["stored_bytes"].get<int64_t>(), 8 * n / 2);
  EXPECT_EQ(meta["id"]["raw_bytes"], 8 * n);
  EXPECT_EQ(meta["cir"]["stored_bytes"], plain["cir"]["stored_bytes"]);
  // The column section's count equals each column's stored bytes summed over the values.
  int64_t id_stored = 0;
  for (const auto& v : columnar) {
    const size_t at = section_at(v);
    ASSERT_GE(u32_at(v, at), 1u);
    ASSERT_EQ(u32_at(v, at + 4), 1u);      // the first column is field 1, "id",
    ASSERT_EQ(u32_at(v, at + 4 + 8), 16u);  // of the value's 16 samples (128 bytes)
    id_stored += u32_at(v, at + 4 + 18);
  }
  EXPECT_EQ(meta["id"]["stored_bytes"].get<int64_t>(), id_stored);
}

TEST(Columns, ColumnsAreGroupsOfConsecutiveSamplesOfBoundedSize) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.compression = "zstd";
  o.samples_per_value = 64;
  const int64_t n = 200;
  auto sample = [](int64_t i) {
    return std::vector<Field>{Field{"big", FieldKind::Tensor, signal_of({32, 32}, at::kFloat, i)},
                              Field{"small", FieldKind::Tensor, torch::arange(25, torch::kFloat) * (i % 7)}};
  };
  {
    Writer w(path, o);
    for (int64_t i = 0; i < n; ++i) w.write(sample(i));
  }
  size_t groups = 0;
  for (const auto& v : all_values(path)) {
    ASSERT_EQ(u32_at(v, 0), kColumnPackMagic);
    const uint32_t records = u32_at(v, 4);
    size_t at = section_at(v);
    const uint32_t count = u32_at(v, at);
    at += 4;
    uint32_t next_slot = 0;
    for (uint32_t c = 0; c < count; ++c) {  // field, first, count, codec, flags, raw, stored, frame
      EXPECT_EQ(u32_at(v, at), 1u);          // "small" (100 bytes) only
      EXPECT_EQ(u32_at(v, at + 4), next_slot);
      next_slot += u32_at(v, at + 8);
      EXPECT_LE(u32_at(v, at + 14), kColumnGroupBytes);
      EXPECT_EQ(u32_at(v, at + 14), 100u * u32_at(v, at + 8));
      at += 22 + u32_at(v, at + 18);
      ++groups;
    }
    EXPECT_EQ(next_slot, records);  // every slot of the value, in order
  }
  EXPECT_GE(groups, 4u * (n / 64));  // 64 x 100 bytes: at least 4 groups of <= 2 KiB a full value
  Reader r(path);
  std::vector<size_t> order;
  for (int64_t i = 0; i < n; ++i) order.push_back(static_cast<size_t>((i * 71 + 5) % n));
  const Batch b = r.read_batch(order);
  for (size_t j = 0; j < order.size(); ++j) {
    const auto want = sample(static_cast<int64_t>(order[j]));
    EXPECT_TRUE(torch::equal(b.tensors["small"][static_cast<int64_t>(j)], want[1].tensor)) << order[j];
    EXPECT_TRUE(torch::equal(b.tensors["big"][static_cast<int64_t>(j)], want[0].tensor)) << order[j];
  }
}

TEST(Columns, AppendingContinuesTheColumnarTailAndCountsAsOneWriterWould) {
  TempDir tmp;
  WriterOptions o;
  o.compression = "zstd";
  o.samples_per_value = 8;
  o.commit_every = 3;
  write_packed(tmp.sub("once"), 45, o);
  {
    Writer w(tmp.sub("twice"), o);
    for (int64_t i = 0; i < 21; ++i) w.write(packed_sample(i));  // ends inside value 2
    w.close();
  }
  WriterOptions a;
  a.append = true;
  a.commit_every = 5;
  {
    Writer w(tmp.sub("twice"), a);
    for (int64_t i = 21; i < 45; ++i) w.write(packed_sample(i));
    w.close();
  }
  expect_all_read_paths(tmp.sub("twice"), 45);
  EXPECT_EQ(all_values(tmp.sub("twice")), all_values(tmp.sub("once")));  // the same bytes
  EXPECT_EQ(raw_meta(tmp.sub("twice"))["compression"], raw_meta(tmp.sub("once"))["compression"]);
  EXPECT_EQ(raw_meta(tmp.sub("twice"))["format_version"], kColumnarFormatVersion);
}

TEST(Columns, DamagedColumnsRaiseCorruptedErrorNamingPathAndIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.compression = "lz4";
  o.samples_per_value = 16;
  write_packed(path, 96, o);
  auto flip_first_frame = [](std::string& v) {
    ASSERT_EQ(u32_at(v, 0), kColumnPackMagic);
    v[section_at(v) + 4 + 22 + 20] ^= 0x5a;
  };
  edit_value(path, 1, flip_first_frame);  // samples 16-31
  edit_value(path, 2, [](std::string& v) {  // samples 32-47: 99 columns
    const uint32_t count = 99;
    std::memcpy(&v[section_at(v)], &count, 4);
  });
  edit_value(path, 3, [](std::string& v) {  // samples 48-63: a column larger than the bound
    const uint32_t raw = kMaxColumnBytes + 1;
    std::memcpy(&v[section_at(v) + 4 + 14], &raw, 4);
  });
  edit_value(path, 4, [](std::string& v) {  // samples 64-79: a "TLMP" value of the records, no section
    const size_t at = section_at(v);
    v = std::string(reinterpret_cast<const char*>(&kPackMagic), 4) + v.substr(4, at - 8) + v.substr(at + u32_at(v, at - 4));
  });
  ReaderOptions ro;
  ro.verify = true;
  Reader r(path, ro);
  ReaderOptions fast;
  fast.verify = false;
  Reader unverified(path, fast);
  for (const Reader* reader : {&r, &unverified}) {
    const std::string damage = reader == &r ? "checksum" : "";  // (the section's checksum is checked first)
    expect_corrupted([&] { reader->get_fields(40); }, {path, "index 40", damage.empty() ? "99 columns" : damage});
    expect_corrupted([&] { reader->read_batch(std::vector<size_t>{50}); }, {path, "index 50", damage.empty() ? "8193 bytes" : damage});
    expect_corrupted([&] { reader->get_fields(70); }, {path, "index 70", "holds no columns"});
    expect_corrupted([&] { reader->read_batch(std::vector<size_t>{64, 71}); }, {path, "index 64", "holds no columns"});
    for (int64_t i : {0, 3, 15, 85, 95}) expect_packed_sample(reader->get_fields(static_cast<size_t>(i)), i);
  }
  expect_corrupted([&] { r.get_fields(20); }, {path, "index 20", "checksum"});
  expect_corrupted([&] { r.read_batch(std::vector<size_t>{0, 21}); }, {path, "index 21", "checksum"});
  // Unverified, a flipped byte of a frame is found by Blosc or changes that field's bytes only.
  for (int64_t i = 16; i < 32; ++i) {
    try {
      const auto got = unverified.get_fields(static_cast<size_t>(i));
      EXPECT_TRUE(torch::equal(got[0].tensor, packed_sample(i)[0].tensor));
    } catch (const CorruptedError& e) {
      EXPECT_NE(std::string(e.what()).find("index " + std::to_string(i)), std::string::npos) << e.what();
    }
  }
  // A record whose column field claims more bytes than a column holds: refused as it is parsed.
  const std::string where = "hand";
  const std::vector<FieldSchema> schema{{"x", FieldKind::Tensor, at::kFloat, {-1, -1}}};
  FieldView huge;
  huge.ndim = 2;
  huge.sizes[0] = huge.sizes[1] = int64_t{1} << 15;  // 4 GiB of float32
  std::string rec;
  torch_lmdb::detail::append_compact_views({huge}, {true}, true, rec);
  std::vector<FieldView> parsed;
  expect_corrupted([&] { parse_record(rec.data(), rec.size(), true, RecordContext{&where, 3}, parsed, &schema); },
                   {"'hand' index 3", "field 'x' has shape [32768, 32768]"});
  huge.sizes[0] = 3000;  // 3000 elements, 12000 bytes: more than a column holds
  huge.sizes[1] = 1;
  rec.clear();
  torch_lmdb::detail::append_compact_views({huge}, {true}, true, rec);
  expect_corrupted([&] { parse_record(rec.data(), rec.size(), true, RecordContext{&where, 3}, parsed, &schema); },
                   {"'hand' index 3", "field 'x' in a column has 12000 bytes"});
  // Appending to a database whose partly filled last value is damaged is refused.
  {
    Writer w(tmp.sub("part"), o);
    for (int64_t i = 0; i < 30; ++i) w.write(packed_sample(i));
  }
  edit_value(tmp.sub("part"), 1, flip_first_frame);
  WriterOptions a;
  a.append = true;
  expect_corrupted([&] { Writer w(tmp.sub("part"), a); }, {tmp.sub("part"), "index 16", "checksum"});
}

// Columns are decoded by the readers' threads and the decode helpers at once: each
// thread's decoded columns are its own (run under ThreadSanitizer by make test-tsan).
TEST(Columns, ConcurrentReadersAndDecodeHelpersReadTheColumnsRight) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.compression = "lz4";
  o.samples_per_value = 32;
  const int64_t n = 320;
  write_packed(path, n, o);
  ReaderOptions ro;
  ro.decode_threads = 4;
  Reader r(path, ro);
  std::vector<std::vector<Field>> samples;  // (packed_sample seeds torch's global generator: not on threads)
  for (int64_t i = 0; i < n; ++i) samples.push_back(packed_sample(i));
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 6; ++round) {
        std::vector<size_t> order;
        for (int64_t i = 0; i < n; ++i) order.push_back(static_cast<size_t>((i * (37 + 2 * t) + round) % n));
        BatchOptions bo;
        bo.pad = true;
        const Batch b = r.read_batch(order, bo);
        for (size_t j = 0; j < order.size(); ++j) {
          const auto& want = samples[order[j]];
          if (b.tensors["id"][static_cast<int64_t>(j)].item<int64_t>() != static_cast<int64_t>(order[j]) ||
              !torch::equal(b.tensors["cir"][static_cast<int64_t>(j)], want[0].tensor))
            ++wrong;
        }
        for (size_t i : {order[0], order[n / 2]}) {
          const auto got = r.get_fields(i);
          if (!torch::equal(got[2].tensor, samples[i][2].tensor)) ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(u32_at(all_values(path)[0], 0), kColumnPackMagic);  // (the premise: columns are read)
}

TEST(Compact, CompressedAndPackedDatabasesHoldCompactRecordsOthersKeepTheirVersion) {
  TempDir tmp;
  const int64_t n = 40;
  auto write = [&](const std::string& name, const WriterOptions& o) {
    write_packed(tmp.sub(name), n, o);
    return tmp.sub(name);
  };
  WriterOptions lz4;
  lz4.compression = "lz4";
  const std::string compact = write("compact", lz4);
  EXPECT_EQ(raw_meta(compact)["format_version"], kColumnarFormatVersion);
  EXPECT_EQ(record_info(compact, 3).first, kCompactFormatVersion);
  expect_all_read_paths(compact, n);

  // Asked for version 2 records: packed (format version 3), the records named field by field.
  WriterOptions v2 = lz4;
  v2.format_version = kFormatVersion;
  const std::string named = write("named", v2);
  EXPECT_EQ(raw_meta(named)["format_version"], kPackedFormatVersion);
  EXPECT_EQ(record_info(named, 3).first, kFormatVersion);
  expect_all_read_paths(named, n);
  // Four fields: the compact record is smaller by their names and most of 20 bytes each.
  for (int64_t i : {0, 7, 39}) {
    const auto a = record_info(compact, i), b = record_info(named, i);
    EXPECT_LE(a.second + 4 * 20 + std::string("cirid pathsscene").size() - 1, b.second) << i;
  }

  // Uncompressed, one per value: version 2 records unless asked (version 4 also unpacked).
  const std::string plain = write("plain", WriterOptions{});
  EXPECT_EQ(raw_meta(plain)["format_version"], kFormatVersion);
  EXPECT_EQ(record_info(plain, 0).first, kFormatVersion);
  WriterOptions v4;
  v4.format_version = kCompactFormatVersion;
  const std::string small = write("small", v4);
  EXPECT_EQ(raw_meta(small)["format_version"], kCompactFormatVersion);
  EXPECT_EQ(raw_meta(small).count("samples_per_value"), 0u);
  EXPECT_EQ(record_info(small, 0).first, kCompactFormatVersion);
  expect_all_read_paths(small, n);

  // Appending keeps each database's record version.
  for (const std::string& path : {compact, named, plain, small}) {
    WriterOptions a;
    a.append = true;
    {
      Writer w(path, a);
      for (int64_t i = n; i < n + 9; ++i) w.write(packed_sample(i));
      w.close();
    }
    EXPECT_EQ(record_info(path, n + 8).first, record_info(path, 0).first) << path;
    expect_all_read_paths(path, n + 9);
  }
  WriterOptions bad;
  bad.format_version = 3;  // a metadata version (packed values), not a record version
  EXPECT_THROW(Writer(tmp.sub("bad"), bad), c10::ValueError);
}

TEST(Compact, DamagedCompactRecordsRaiseCorruptedErrorNamingPathAndIndex) {
  TempDir tmp;
  const std::string path = tmp.sub("db");
  WriterOptions o;
  o.compression = "lz4";
  o.samples_per_value = 4;
  o.checksum = false;  // the structure's own checks
  o.format_version = kCompactFormatVersion;  // records as written, no columns
  write_packed(path, 12, o);
  mutate_record(path, 1, [](std::string& v) { v[8] = 9; });             // field count 9 of 4
  mutate_record(path, 2, [](std::string& v) { v[9] = 7; });             // codec 7
  mutate_record(path, 5, [](std::string& v) { v.resize(v.size() - 3); });  // cut off
  mutate_record(path, 6, [](std::string& v) { v += "xyz"; });           // bytes after the last field
  mutate_record(path, 9, [](std::string& v) { v[10] = '\xff'; v[11] = '\xff'; });  // cir's sizes
  Reader r(path);
  for (uint64_t i : {1, 2, 5, 6, 9}) {
    SCOPED_TRACE(i);
    expect_corrupted([&] { r.get_fields(i); }, {path, "index " + std::to_string(i)});
    expect_corrupted([&] { r.read_batch(std::vector<size_t>{0, static_cast<size_t>(i)}); },
                     {path, "index " + std::to_string(i)});
  }
  for (int64_t i : {0, 3, 4, 7, 8, 11}) expect_packed_sample(r.get_fields(static_cast<size_t>(i)), i);
}

// ---- decoding a batch on several threads (ReaderOptions::decode_threads) ----
namespace {

// 16 KiB float32 samples that LZ4 shrinks to about 3/4 (a signal plus noise kept to 1e-3).
std::vector<Field> wide_sample(int64_t i) {
  torch::manual_seed(i);
  at::Tensor x = torch::sin(torch::linspace(0, 20 + i % 9, 4096)) + 0.01 * torch::randn({4096});
  return {Field{"x", FieldKind::Tensor, (x * 1000).round() / 1000}, Field{"id", FieldKind::Tensor, torch::tensor(i)}};
}

std::string write_wide(TempDir& tmp, int64_t n, bool checksum = true) {
  WriterOptions o;
  o.compression = "lz4";
  o.checksum = checksum;
  const std::string path = tmp.sub("wide");
  Writer w(path, o);
  for (int64_t i = 0; i < n; ++i) w.write(wide_sample(i));
  w.close();
  return path;
}

std::vector<size_t> shuffled_batch(size_t n, size_t b, size_t salt) {
  std::vector<size_t> out;
  for (size_t j = 0; j < b; ++j) out.push_back((j * 131 + salt * 17 + 5) % n);
  return out;
}

void expect_wide_batch(const Batch& b, const std::vector<size_t>& idx) {
  ASSERT_EQ(b.tensors["x"].size(0), static_cast<int64_t>(idx.size()));
  for (size_t j = 0; j < idx.size(); ++j) {
    const auto want = wide_sample(static_cast<int64_t>(idx[j]));
    EXPECT_TRUE(torch::equal(b.tensors["x"][static_cast<int64_t>(j)], want[0].tensor)) << idx[j];
    EXPECT_EQ(b.tensors["id"][static_cast<int64_t>(j)].item<int64_t>(), static_cast<int64_t>(idx[j]));
  }
}

}  // namespace

TEST(ParallelDecode, ThreadsDecodeTheSameBatchAndPassOnTheirErrors) {
  TempDir tmp;
  const std::string path = write_wide(tmp, 200, /*checksum=*/false);
  const auto idx = shuffled_batch(200, 64, 0);  // ~0.7 MiB compressed: above the threshold
  for (unsigned threads : {1u, 2u, 4u}) {
    ReaderOptions ro;
    ro.decode_threads = threads;
    Reader r(path, ro);
    expect_wide_batch(r.read_batch(idx), idx);
    BatchOptions one;
    one.decode_threads = 1;  // a batch's own setting wins
    expect_wide_batch(r.read_batch(idx, one), idx);
  }
  // A payload that fails to decompress (its stream damaged past Blosc's header):
  // the error of the helper that met it reaches the caller, naming the index.
  std::string holder;
  const auto views = parse_value(path, 77, holder);
  const size_t frame = static_cast<size_t>(views[0].data - holder.data());
  const size_t stored = static_cast<size_t>(views[0].stored);
  mutate_record(path, 77, [&](std::string& v) {
    for (size_t p = frame + 40; p < frame + stored; p += 5) v[p] = static_cast<char>(v[p] ^ 0x5a);
  });
  ReaderOptions ro;
  ro.decode_threads = 4;
  Reader r(path, ro);
  std::vector<size_t> bad = idx;
  bad[50] = 77;
  for (int round = 0; round < 3; ++round)
    expect_corrupted([&] { r.read_batch(bad); }, {path, "index 77", "'x'"});
  expect_wide_batch(r.read_batch(idx), idx);  // the pool still serves the next batches
}

// Under ThreadSanitizer (make test-tsan): batches of several threads share the pool's helpers.
TEST(ParallelDecode, ConcurrentBatchesShareThePoolsHelpers) {
  TempDir tmp;
  const std::string path = write_wide(tmp, 160);
  ReaderOptions ro;
  ro.decode_threads = 3;
  Reader r(path, ro);
  std::vector<at::Tensor> want;  // made here: torch's generator is not for several threads
  for (int64_t i = 0; i < 160; ++i) want.push_back(wide_sample(i)[0].tensor);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (size_t t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      Reader mine = r;  // copies share the environment (as LibTorch's workers do)
      for (size_t k = 0; k < 6; ++k) {
        const auto idx = shuffled_batch(160, 48, t * 10 + k);
        const Batch b = mine.read_batch(idx);
        for (size_t j = 0; j < idx.size(); ++j)
          if (b.tensors["id"][static_cast<int64_t>(j)].item<int64_t>() != static_cast<int64_t>(idx[j]) ||
              !torch::equal(b.tensors["x"][static_cast<int64_t>(j)], want[idx[j]]))
            failures.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}


// Batches compressed on several threads (WriterOptions::compress_threads)
// hold, byte for byte, the records that compression on the calling thread
// writes: records of every kind (compressed, too small, empty, str/bytes)
// over many commits, packed and one per value, then appended to; the
// metadata counts the same stored bytes. (ThreadSanitizer runs this test.)
TEST(CompressionThreads, BatchesCompressedOnThreadsHoldTheRecordsOneThreadWrites) {
  TempDir tmp;
  for (const std::string codec : {"lz4", "zstd:3"}) {
    for (const size_t per_value : {size_t{0}, size_t{1}}) {
      std::vector<std::vector<std::string>> values;
      std::vector<nlohmann::json> counts;
      for (const size_t threads : {size_t{1}, size_t{3}, size_t{8}}) {
        const std::string path = tmp.sub(codec + "-" + std::to_string(per_value) + "-" + std::to_string(threads));
        WriterOptions o;
        o.compression = codec;
        o.samples_per_value = per_value;
        o.compress_threads = threads;
        o.commit_every = 23;  // batches of 23 records split over the threads, and a last short one
        {
          Writer w(path, o);
          for (int64_t i = 0; i < 150; ++i) w.write(sample_of(at::kFloat, i));
          w.close();
        }
        o.compression = "";  // appending keeps the codecs, still on `threads` threads
        o.samples_per_value = 0;
        o.append = true;
        {
          Writer w(path, o);
          for (int64_t i = 150; i < 200; ++i) w.write(sample_of(at::kFloat, i));
          w.close();
        }
        values.push_back(all_values(path));
        counts.push_back(raw_meta(path)["compression"]);
        Reader r(path);
        ASSERT_EQ(r.size(), 200u);
        for (const int64_t i : {0, 22, 23, 149, 150, 199}) {
          const Sample s = r.get(static_cast<size_t>(i));
          const auto expected = sample_of(at::kFloat, i);
          EXPECT_TRUE(torch::equal(s["big"], expected[0].tensor)) << path << " sample " << i;
          EXPECT_TRUE(torch::equal(s["small"], expected[1].tensor)) << path << " sample " << i;
        }
      }
      ASSERT_FALSE(values[0].empty());
      for (size_t t = 1; t < values.size(); ++t) {
        EXPECT_TRUE(values[t] == values[0]) << codec << ", samples_per_value " << per_value << ": thread count #" << t;
        EXPECT_EQ(counts[t], counts[0]);
      }
    }
  }
  WriterOptions bad;
  bad.compression = "lz4";
  bad.compress_threads = 1000;
  EXPECT_THROW(Writer(tmp.sub("bad"), bad), c10::ValueError);
}

// A sample refused after a commit (a sparse tensor passes the schema's
// dtype and dimensions, then fails its encoding) leaves no raw batch behind:
// close() commits no empty batch that would count an earlier batch's stored
// bytes again, so metadata `compression` matches compression in write().
TEST(CompressionThreads, ARefusedSampleAfterACommitLeavesTheByteCountsRight) {
  TempDir tmp;
  std::vector<nlohmann::json> counts;
  for (const size_t threads : {size_t{1}, size_t{3}}) {
    const std::string path = tmp.sub("t" + std::to_string(threads));
    WriterOptions o;
    o.compression = "lz4";
    o.compress_threads = threads;
    o.commit_every = 23;
    Writer w(path, o);
    for (int64_t i = 0; i < 50; ++i) w.write(sample_of(at::kFloat, i));
    w.flush();
    auto bad = sample_of(at::kFloat, 50);
    bad[0].tensor = bad[0].tensor.to_sparse();
    EXPECT_THROW(w.write(bad), c10::Error);
    w.close();
    counts.push_back(raw_meta(path)["compression"]);
    EXPECT_EQ(Reader(path).size(), 50u);
  }
  EXPECT_EQ(counts[1], counts[0]);
}
