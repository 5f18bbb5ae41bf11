// Each field's codec and payload byte counts (field_codecs.h).
#include "torch_lmdb/detail/field_codecs.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "torch_lmdb/errors.h"

namespace torch_lmdb::detail {

void FieldCodecs::resolve(const std::vector<FieldSchema>& schema, const Compression& default_codec,
                          const std::map<std::string, std::string>& field_compression, const std::string& path) {
  codecs.assign(schema.size(), default_codec);
  for (const auto& entry : field_compression) {
    const std::string& name = entry.first;  // (a structured binding cannot be captured in C++17)
    auto it = std::find_if(schema.begin(), schema.end(), [&](const FieldSchema& f) { return f.name == name; });
    if (it == schema.end()) {
      std::string names;
      for (const auto& f : schema) names += (names.empty() ? "" : ", ") + f.name;
      TORCH_CHECK_VALUE(false, "compression names field '", name, "', which the samples of '", path,
                        "' do not have; fields: ", names);
    }
    codecs[static_cast<size_t>(it - schema.begin())] = parse_compression(entry.second, "field '" + name + "'");
  }
  for (size_t f = 0; f < schema.size(); ++f)
    if (schema[f].kind != FieldKind::Tensor) codecs[f] = Compression{};
  stored_bytes.resize(schema.size(), 0);
  raw_bytes.resize(schema.size(), 0);
}

void FieldCodecs::adopt(const Json& old, size_t counted, const std::vector<FieldSchema>& schema, bool keep,
                        const std::string& path) {
  if (!old.is_object()) return;
  earlier.assign(schema.size(), {});
  for (size_t f = 0; f < schema.size(); ++f) {
    const auto it = old.find(schema[f].name);
    if (it == old.end() || !it->is_object() || schema[f].kind != FieldKind::Tensor) continue;
    Compression stored;
    const Json codec = it->value("codec", Json("none"));
    const Json level = it->value("level", Json(5));
    if (codec.is_string() && level.is_number_integer()) {
      const std::string spec = codec.get<std::string>() == "none"
                                   ? "none"
                                   : codec.get<std::string>() + ":" + std::to_string(level.get<int64_t>());
      try {
        stored = parse_compression(spec, "field '" + schema[f].name + "' of '" + path + "'");
      } catch (const c10::ValueError&) {
        throw CorruptedError("'" + path + "' metadata 'compression' names codec '" + spec + "' for field '" +
                                 schema[f].name + "', which this torch_lmdb does not know",
                             0, path);
      }
    }
    if (keep) codecs[f] = stored;
    const Json listed = it->value("codecs", Json());
    if (listed.is_array()) {
      for (const auto& c : listed)
        if (c.is_string()) earlier[f].push_back(c.get<std::string>());
    } else if (counted > 0) {
      earlier[f].push_back(compression_spec(stored));
    }
  }
}

void FieldCodecs::adopt_byte_counts(const Json& old, size_t counted, const std::vector<FieldSchema>& schema) {
  counts_known = counted == 0;
  if (!old.is_object()) return;
  bool all = true;
  for (size_t f = 0; f < schema.size(); ++f) {
    const auto it = old.find(schema[f].name);
    if (it == old.end() || !it->is_object() || !it->value("stored_bytes", Json()).is_number_unsigned() ||
        !it->value("raw_bytes", Json()).is_number_unsigned()) {
      all = false;
      break;
    }
    stored_bytes[f] = (*it)["stored_bytes"].get<uint64_t>();
    raw_bytes[f] = (*it)["raw_bytes"].get<uint64_t>();
  }
  counts_known = all || counted == 0;
}

bool FieldCodecs::any() const noexcept {
  return std::any_of(codecs.begin(), codecs.end(), [](const Compression& c) { return c.codec != Codec::None; });
}

Json FieldCodecs::json(const std::vector<FieldSchema>& schema, const std::vector<uint64_t>& raw) const {
  Json out = Json::object();
  for (size_t f = 0; f < schema.size() && f < codecs.size(); ++f) {
    Json entry{{"codec", codec_name(codecs[f].codec)}};
    if (codecs[f].codec != Codec::None) entry["level"] = codecs[f].level;
    if (f < earlier.size() && !earlier[f].empty()) {
      // The database holds records of several codecs: every spec, oldest first.
      std::vector<std::string> all = earlier[f];
      const std::string now = compression_spec(codecs[f]);
      if (std::find(all.begin(), all.end(), now) == all.end()) all.push_back(now);
      if (all.size() > 1) entry["codecs"] = all;
    }
    if (counts_known) {
      entry["stored_bytes"] = stored_bytes[f];
      entry["raw_bytes"] = f < raw.size() ? raw[f] : 0;
    }
    out[schema[f].name] = std::move(entry);
  }
  return out;
}

}  // namespace torch_lmdb::detail
