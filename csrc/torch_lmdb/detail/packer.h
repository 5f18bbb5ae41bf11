// torch_lmdb/detail/packer.h -- a writer's packed values (samples_per_value >
// 1): the records of its batches cut into values of `per_value` records, the
// last, partly filled value (the tail) rewritten by the next commit, with
// columns in a format version 5 database (detail/columns.h).
//
// Contract
// - put() writes a batch's values inside the caller's transaction and leaves
//   the new tail pending: commit() adopts it once that transaction committed,
//   so a batch replayed after MDB_MAP_FULL starts again from the old tail.
// - with_columns() is the batch's metadata `compression` with each field's
//   stored bytes counted as this writer's values store them (columns
//   included), put() having run for the batch.
// - load_tail() takes the records of an appended-to database's last value
//   (any column decoded back into its records); a damaged value raises
//   CorruptedError.
// - One thread at a time (the writer's committer).
#pragma once

#include <lmdb.h>

#include <cstdint>
#include <string>
#include <vector>

#include "torch_lmdb/detail/env.h"
#include "torch_lmdb/detail/write_batch.h"

namespace torch_lmdb::detail {

class Packer {
 public:
  explicit Packer(const std::string& path) : path_(path) {}

  uint32_t per_value = 0;  ///< records per value (0: not chosen yet)
  bool columns = false;    ///< a format version 5 database

  void put(Env& env, MDB_txn* txn, const WriteBatch& b);
  void commit();
  Json with_columns(const WriteBatch& b) const;
  /// `v`: the value holding samples (counted - 1) / per_value * per_value .. counted - 1.
  void load_tail(const MDB_val& v, size_t counted, const std::vector<FieldSchema>& schema);

 private:
  const std::string& path_;
  // The tail's records as committed (their ends in `tail_ends_`), and put()'s
  // pending ones; the columns' stored bytes minus the records' (per field):
  // of this writer's values, and of the tail's value.
  std::string tail_, packing_, value_;
  std::vector<size_t> tail_ends_, packing_ends_;
  std::vector<int64_t> column_delta_, tail_delta_, pending_column_delta_, pending_tail_delta_;
};

}  // namespace torch_lmdb::detail
