// torch_lmdb/mixture.h -- the global stream of a weighted mixture of datasets.
//
// Contract
// - A mixture of K sources (sizes n_k, weights w_k normalised to sum 1) has
//   epochs of `epoch_size` global positions. MixtureOrder(options, seed,
//   epoch) says, for every global position i, which source it reads
//   (`source`) and which position of that source (`sample`, in [0, n_k)).
//   It is a pure function of (options, seed, epoch, i): the same on every
//   platform, for any number of threads, ranks or calls, and whatever
//   positions were asked before.
// - The rule (README "Mixing and selecting"):
//   * Positions are grouped in blocks of L positions: L = block_size when
//     stratified, else kRandomChunk. Block b holds positions [bL, (b+1)L).
//   * Stratified: block b holds floor(w_k L) or ceil(w_k L) positions of
//     source k: c_k(b) = floor(w_k L) + e_k(b), where the remainders are
//     assigned by systematic sampling with a Weyl sequence u_b = frac(u_0 +
//     b a) (u_0, a drawn from the epoch's seed): e_k(b) = 1 when an integer
//     shift of u_b falls in source k's slice of the cumulative fractional
//     parts. So the total over blocks 0..b-1 of each source is within one
//     position of w_k b L, and its prefix sum is closed-form
//     (O(log b), no replay).
//   * Random: the counts of chunk b are one multinomial draw (L trials,
//     weights w) from a counter-based generator keyed by (seed, epoch, b);
//     with the arrangement below this is exactly L independent draws of a
//     source with the weights. The prefix sums are kept in a table that
//     grows as far as asked (O(b) once, one multinomial per chunk).
//   * The arrangement of a block is a Fisher-Yates shuffle of its multiset of
//     sources, keyed by (seed, epoch, b).
//   * Source k's cursor at position i is the number of positions before i
//     drawn from source k. Its sample is perm_{k,r}(cursor mod n_k), r =
//     cursor / n_k: each source is read in its own permutation, keyed by
//     (seed, epoch, the source's name, r) and independent of the weights
//     and of the other sources; a source that runs out starts a new
//     permutation (r + 1). Without shuffle the permutation is the identity.
//     The permutation is a 4-round Feistel bijection with cycle walking:
//     O(1) per position, nothing of size n_k is materialised.
// - Thread safety: locate() and cursors() may be called from any number of
//   threads at once (the random mode's prefix table is guarded by a mutex).
//   MixtureOrder is copyable; copies share that table.
// - Errors: the constructor throws ValueError (c10::ValueError) for no
//   sources, mismatched lengths, a negative or non-finite weight, weights
//   summing to zero, a source of size 0 with a positive weight, a zero
//   block_size, or duplicate names; locate() throws IndexError for
//   positions past epoch_size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "torch_lmdb/selection.h"

namespace torch_lmdb {

/// Positions per chunk of the random mode (the unit of its multinomial draws).
constexpr size_t kRandomChunk = size_t{1} << 18;

struct MixtureOptions {
  /// One entry per source: a name (keys its permutation), its size and weight.
  std::vector<std::string> names;
  std::vector<size_t> sizes;
  /// Proportions of the epoch (normalised; empty = proportional to sizes).
  std::vector<double> weights;
  /// Positions per epoch; 0 = the sum of the sizes.
  size_t epoch_size = 0;
  /// Stratified blocks: floor or ceil of w_k * block_size positions of each
  /// source in every full block of block_size positions.
  bool stratified = false;
  size_t block_size = 256;
  /// Each source in its own random permutation (else in stored order).
  bool shuffle = true;
};

class MixtureOrder {
 public:
  MixtureOrder(MixtureOptions options, uint64_t seed, uint64_t epoch);

  /// Positions of an epoch (epoch_size, or the sizes' sum).
  size_t size() const noexcept;
  size_t num_sources() const noexcept;
  /// The normalised weights.
  const std::vector<double>& weights() const noexcept;
  /// Fills source[j] and sample[j] for the positions first + j, j < count.
  /// Throws IndexError when first + count > size().
  void locate(size_t first, size_t count, int64_t* source, int64_t* sample) const;
  /// Per source, the number of positions before `position` drawn from it.
  std::vector<uint64_t> cursors(size_t position) const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

/// A mixture read by a BatchStream (StreamOptions::mixture) through one
/// Reader over every source's files in order: source k's position j is the
/// Reader's sample offsets[k] + selections[k]->at(j) (or + j without a
/// selection). `rule.sizes[k]` is source k's size (its selection's size).
/// `rule.shuffle` is set by the stream (from its SampleOrder).
struct MixtureSource {
  MixtureOptions rule;
  std::vector<size_t> offsets;
  std::vector<std::optional<Selection>> selections;  // empty: no selections
};

/// A bijection of [0, n) keyed by `key` (4-round Feistel network with cycle
/// walking): permute(n, key, x) for x in [0, n) visits each of [0, n) once.
uint64_t permute(uint64_t n, uint64_t key, uint64_t x) noexcept;

}  // namespace torch_lmdb
