// A writer's packed values (packer.h).
#include "torch_lmdb/detail/packer.h"

#include <algorithm>

#include "torch_lmdb/detail/columns.h"
#include "torch_lmdb/detail/record_format.h"
#include "torch_lmdb/errors.h"

namespace torch_lmdb::detail {

void Packer::put(Env& env, MDB_txn* txn, const WriteBatch& b) {
  packing_ = tail_;
  packing_ends_ = tail_ends_;
  pending_column_delta_ = column_delta_;
  pending_tail_delta_ = tail_delta_;
  uint64_t first = b.first - packing_ends_.size();  // index of packing's first record
  bool exists = !packing_ends_.empty();             // its value is in the database already
  unsigned char kbuf[8];
  auto put_value = [&] {
    value_.clear();
    if (columns && !b.fields.empty()) {
      thread_local std::vector<int64_t> delta;
      append_columnar(packing_.data(), packing_ends_, b.fields, b.codecs, path_, first, value_, delta);
      pending_column_delta_.resize(delta.size(), 0);
      pending_tail_delta_.resize(delta.size(), 0);
      for (size_t f = 0; f < delta.size(); ++f) {
        if (exists) pending_column_delta_[f] -= pending_tail_delta_[f];  // the value it replaces
        pending_column_delta_[f] += delta[f];
        pending_tail_delta_[f] = packing_ends_.size() < per_value ? delta[f] : 0;
      }
    } else {
      append_packed(packing_.data(), packing_ends_, value_);
    }
    encode_key(first / per_value, kbuf);
    MDB_val k{8, kbuf};
    MDB_val v{value_.size(), value_.data()};
    check_mdb(mdb_put(txn, env.samples_dbi(), &k, &v, exists ? 0 : MDB_APPEND), "mdb_put", path_,
              "index " + std::to_string(first) + " (a value of " + std::to_string(packing_ends_.size()) + " samples)");
    exists = false;
  };
  size_t start = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    packing_.append(b.bytes.data() + start, b.ends[i] - start);
    packing_ends_.push_back(packing_.size());
    start = b.ends[i];
    if (packing_ends_.size() == per_value) {
      put_value();
      first += per_value;
      packing_.clear();
      packing_ends_.clear();
    }
  }
  if (!packing_ends_.empty()) put_value();
}

void Packer::commit() {
  tail_.swap(packing_);
  tail_ends_.swap(packing_ends_);
  column_delta_.swap(pending_column_delta_);
  tail_delta_.swap(pending_tail_delta_);
}

Json Packer::with_columns(const WriteBatch& b) const {
  if (!columns || per_value <= 1 || !b.compression.is_object()) return b.compression;
  Json out = b.compression;
  for (size_t f = 0; f < b.fields.size() && f < pending_column_delta_.size(); ++f) {
    auto it = out.find(b.fields[f].name);
    if (pending_column_delta_[f] == 0 || it == out.end() || !it->contains("stored_bytes")) continue;
    const int64_t stored = (*it)["stored_bytes"].get<int64_t>() + pending_column_delta_[f];
    (*it)["stored_bytes"] = static_cast<uint64_t>(std::max<int64_t>(stored, 0));
  }
  return out;
}

void Packer::load_tail(const MDB_val& v, size_t counted, const std::vector<FieldSchema>& schema) {
  const uint64_t first = (counted - 1) / per_value * per_value;
  const size_t n = counted - first;
  auto damaged = [&](const std::string& why) {
    throw CorruptedError("cannot append to '" + path_ + "': the value of samples " + std::to_string(first) + " to " +
                             std::to_string(counted - 1) + " " + why + "; run `torch-lmdb verify`",
                         0, path_);
  };
  tail_.clear();
  tail_ends_.clear();
  const RecordContext ctx{&path_, first};
  if (!expand_records(static_cast<const char*>(v.mv_data), v.mv_size, n, per_value, schema, ctx, tail_, tail_ends_,
                      tail_delta_))
    damaged("is damaged or holds fewer than " + std::to_string(n) + " records");
  const char* extra = nullptr;
  size_t extra_size = 0;
  if (packed_record(v.mv_data, v.mv_size, n, per_value, &extra, &extra_size))
    damaged("holds more than the " + std::to_string(n) + " records the metadata counts");
}

}  // namespace torch_lmdb::detail
