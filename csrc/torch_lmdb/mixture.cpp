#include "torch_lmdb/mixture.h"

#include <c10/util/Exception.h>
#include <math.h>  // lgamma_r

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <set>

#include "torch_lmdb/stream.h"

namespace torch_lmdb {

namespace {

using u128 = unsigned __int128;

// splitmix64's finaliser: the counter-based generator of every draw here.
uint64_t mix64(uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
uint64_t hash2(uint64_t a, uint64_t b) noexcept { return mix64(mix64(a) ^ b); }
uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) noexcept { return hash2(hash2(a, b), c); }
double unit(uint64_t h) noexcept { return static_cast<double>(h >> 11) * 0x1.0p-53; }  // [0, 1)

// FNV-1a of a source's name: its permutation depends on the name, not on its place in the list.
uint64_t name_key(const std::string& name) noexcept {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

// Tags keep the draws of different purposes apart.
constexpr uint64_t kTagWeyl = 1, kTagMultinomial = 2, kTagArrange = 3, kTagSource = 4;
// Stratified remainders: fixed point with D = 2^32; the Weyl step is the golden ratio's fraction.
constexpr uint64_t kD = uint64_t{1} << 32, kWeylStep = 0x9E3779B9ull;

// sum_{i < n} floor((a i + b) / m) for a, b >= 0 (AtCoder Library's floor_sum_unsigned, 128-bit).
u128 floor_sum(u128 n, u128 m, u128 a, u128 b) {
  u128 ans = 0;
  for (;;) {
    if (a >= m) {
      ans += (n * (n - 1) / 2) * (a / m);
      a %= m;
    }
    if (b >= m) {
      ans += n * (b / m);
      b %= m;
    }
    const u128 y_max = a * n + b;
    if (y_max < m) break;
    n = y_max / m;
    b = y_max % m;
    std::swap(m, a);
  }
  return ans;
}

// Binomial(n, p) by inversion of the CDF taken outward from the mode (exact
// up to rounding; O(sqrt(n p q)) steps), u uniform in [0, 1).
// log Gamma(x) for x > 0. lgamma_r, not std::lgamma: glibc's lgamma also
// stores the sign in the global `signgam`, a data race between threads
// locating positions at once (mixture.h promises they may).
double log_gamma(double x) {
  int sign = 0;
  return ::lgamma_r(x, &sign);
}

uint64_t binomial(uint64_t n, double p, double u) {
  if (n == 0 || p <= 0) return 0;
  if (p >= 1) return n;
  const double q = 1 - p, nd = static_cast<double>(n);
  const uint64_t m = std::min<uint64_t>(n, static_cast<uint64_t>(std::floor((nd + 1) * p)));
  const double md = static_cast<double>(m);
  const double pm = std::exp(log_gamma(nd + 1) - log_gamma(md + 1) - log_gamma(nd - md + 1) + md * std::log(p) +
                             (nd - md) * std::log(q));
  u -= pm;
  if (u < 0) return m;
  uint64_t lo = m, hi = m;
  double plo = pm, phi = pm;
  for (;;) {
    const bool down = lo > 0 && plo > 1e-300, up = hi < n && phi > 1e-300;
    if (!down && !up) return m;  // rounding left a sliver of u
    if (down) {
      plo *= static_cast<double>(lo) / static_cast<double>(n - lo + 1) * q / p;
      --lo;
      u -= plo;
      if (u < 0) return lo;
    }
    if (up) {
      phi *= static_cast<double>(n - hi) / static_cast<double>(hi + 1) * p / q;
      ++hi;
      u -= phi;
      if (u < 0) return hi;
    }
  }
}

// A block's sources in position order and each position's rank among the
// block's positions of its source.
struct Arrangement {
  std::vector<uint32_t> source, rank;
};

}  // namespace

uint64_t permute(uint64_t n, uint64_t key, uint64_t x) noexcept {
  if (n <= 1) return x;
  unsigned bits = 0;
  while ((uint64_t{1} << bits) < n) ++bits;
  const unsigned half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  do {  // cycle walking: a bijection of [0, 4^half) restricted to [0, n)
    uint64_t l = x >> half, r = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t f = hash3(key, round, r) & mask;
      const uint64_t t = r;
      r = l ^ f;
      l = t;
    }
    x = (l << half) | r;
  } while (x >= n);
  return x;
}

struct MixtureOrder::State {
  MixtureOptions o;
  std::vector<double> w;
  size_t positions = 0;     // epoch size
  size_t block = 0;         // L
  uint64_t key = 0;         // the epoch's key
  std::vector<uint64_t> source_keys;
  // Stratified: floor part q_k, fractional slice [lo_k, hi_k) in units of 1/D, Weyl start u0.
  std::vector<uint64_t> q, lo, hi;
  uint64_t u0 = 0;
  // Random: cursors at chunk starts, K per chunk, grown on demand; recent arrangements.
  std::mutex mutex;
  std::vector<uint64_t> prefix;
  std::map<size_t, std::shared_ptr<const Arrangement>> recent;

  size_t k() const { return w.size(); }

  // sum_{b < m} ceil((f - u_b) / D): how often a shift of u_b fell below f.
  u128 weyl_hits(uint64_t f, size_t m) const {
    const u128 t = k() + 1;  // f <= K * D, so u0 - f + t * D >= 0
    return floor_sum(m, kD, kWeylStep, u0) - floor_sum(m, kD, kWeylStep, u0 + t * kD - f) + t * m;
  }

  std::vector<uint64_t> counts(size_t b) const {
    std::vector<uint64_t> c(k());
    if (o.stratified) {
      const uint64_t u = (u0 + static_cast<u128>(b) * kWeylStep) % kD;
      for (size_t s = 0; s < k(); ++s) c[s] = q[s] + (hi[s] + kD - 1 - u) / kD - (lo[s] + kD - 1 - u) / kD;
      return c;
    }
    uint64_t left = block;
    double mass = 1;
    for (size_t s = 0; s + 1 < k(); ++s) {
      const double p = mass > 0 ? std::min(1.0, w[s] / mass) : 0.0;
      c[s] = binomial(left, p, unit(hash3(key ^ kTagMultinomial, b, s)));
      left -= c[s];
      mass -= w[s];
    }
    c[k() - 1] = left;
    return c;
  }

  std::vector<uint64_t> cursors_at_block(size_t b) {
    std::vector<uint64_t> c(k());
    if (o.stratified) {
      for (size_t s = 0; s < k(); ++s)
        c[s] = static_cast<uint64_t>(q[s] * static_cast<u128>(b) + weyl_hits(hi[s], b) - weyl_hits(lo[s], b));
      return c;
    }
    std::lock_guard<std::mutex> lock(mutex);
    while (prefix.size() < (b + 1) * k()) {
      const size_t have = prefix.size() / k() - 1;  // chunks counted so far
      const std::vector<uint64_t> add = counts(have);
      for (size_t s = 0; s < k(); ++s) prefix.push_back(prefix[have * k() + s] + add[s]);
    }
    std::copy_n(prefix.begin() + static_cast<std::ptrdiff_t>(b * k()), k(), c.begin());
    return c;
  }

  std::shared_ptr<const Arrangement> arrangement(size_t b) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = recent.find(b);
      if (it != recent.end()) return it->second;
    }
    auto a = std::make_shared<Arrangement>();
    const std::vector<uint64_t> c = counts(b);
    a->source.reserve(block);
    for (size_t s = 0; s < k(); ++s) a->source.insert(a->source.end(), c[s], static_cast<uint32_t>(s));
    uint64_t state = hash2(key ^ kTagArrange, b);
    for (size_t i = block; i > 1; --i) {  // Fisher-Yates, unbiased bounded draws
      const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % i;
      uint64_t x;
      do x = mix64(state++);
      while (x >= limit);
      std::swap(a->source[i - 1], a->source[x % i]);
    }
    a->rank.resize(block);
    std::vector<uint32_t> seen(k(), 0);
    for (size_t j = 0; j < block; ++j) a->rank[j] = seen[a->source[j]]++;
    std::lock_guard<std::mutex> lock(mutex);
    if (recent.size() >= 4) recent.erase(recent.begin());  // 2 MiB each at kRandomChunk
    recent.emplace(b, a);
    return a;
  }

  int64_t sample(size_t s, uint64_t cursor) const {
    const uint64_t n = o.sizes[s];
    const uint64_t round = cursor / n, offset = cursor % n;
    if (!o.shuffle) return static_cast<int64_t>(offset);
    return static_cast<int64_t>(permute(n, hash2(source_keys[s], round), offset));
  }
};

namespace {

void check_options(const MixtureOptions& o) {
  TORCH_CHECK_VALUE(!o.sizes.empty(), "a mixture needs at least one source");
  TORCH_CHECK_VALUE(o.names.size() == o.sizes.size(), "a mixture has ", o.sizes.size(), " source sizes but ",
                    o.names.size(), " names");
  TORCH_CHECK_VALUE(o.weights.empty() || o.weights.size() == o.sizes.size(), "a mixture of ", o.sizes.size(),
                    " sources got ", o.weights.size(), " weights");
  TORCH_CHECK_VALUE(o.sizes.size() < (size_t{1} << 31), "too many sources: ", o.sizes.size());
  TORCH_CHECK_VALUE(o.block_size > 0 && o.block_size <= (size_t{1} << 24), "block_size must be in [1, 2^24], got ",
                    o.block_size);
  std::set<std::string> names(o.names.begin(), o.names.end());
  TORCH_CHECK_VALUE(names.size() == o.names.size(), "the names of a mixture's sources must differ");
}

}  // namespace

MixtureOrder::MixtureOrder(MixtureOptions options, uint64_t seed, uint64_t epoch) {
  check_options(options);
  state_ = std::make_shared<State>();
  State& s = *state_;
  s.o = std::move(options);
  const size_t k = s.o.sizes.size();
  s.w = s.o.weights;
  if (s.w.empty()) s.w.assign(s.o.sizes.begin(), s.o.sizes.end());
  double total = 0;
  for (size_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(s.w[i]) && s.w[i] >= 0, "the weight of source '", s.o.names[i],
                      "' must be finite and >= 0, got ", s.w[i]);
    TORCH_CHECK_VALUE(s.w[i] == 0 || s.o.sizes[i] > 0, "source '", s.o.names[i], "' has weight ", s.w[i],
                      " but no samples");
    total += s.w[i];
  }
  TORCH_CHECK_VALUE(total > 0, "the weights of a mixture sum to 0");
  for (double& x : s.w) x /= total;
  s.positions = s.o.epoch_size > 0 ? s.o.epoch_size
                                   : std::accumulate(s.o.sizes.begin(), s.o.sizes.end(), size_t{0});
  s.block = s.o.stratified ? s.o.block_size : kRandomChunk;
  s.key = epoch_seed(seed, epoch);
  for (const std::string& name : s.o.names) s.source_keys.push_back(hash3(s.key, kTagSource, name_key(name)));
  s.prefix.assign(k, 0);
  if (s.o.stratified) {
    // Targets w_k * L in units of 1/D summing to exactly L * D (largest remainders).
    const long double scale = static_cast<long double>(s.block) * kD;
    std::vector<uint64_t> t(k);
    std::vector<std::pair<long double, size_t>> rest;
    uint64_t sum = 0;
    for (size_t i = 0; i < k; ++i) {
      const long double exact = s.w[i] * scale;
      t[i] = static_cast<uint64_t>(std::floor(exact));
      sum += t[i];
      rest.emplace_back(exact - t[i], i);
    }
    std::sort(rest.begin(), rest.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    for (size_t j = 0; sum < s.block * kD; ++j, ++sum) ++t[rest[j % k].second];
    uint64_t cum = 0;
    for (size_t i = 0; i < k; ++i) {
      s.q.push_back(t[i] / kD);
      s.lo.push_back(cum);
      cum += t[i] % kD;
      s.hi.push_back(cum);
    }
    s.u0 = hash2(s.key, kTagWeyl) % kD;
  }
}

size_t MixtureOrder::size() const noexcept { return state_->positions; }
size_t MixtureOrder::num_sources() const noexcept { return state_->k(); }
const std::vector<double>& MixtureOrder::weights() const noexcept { return state_->w; }

std::vector<uint64_t> MixtureOrder::cursors(size_t position) const {
  State& s = *state_;
  TORCH_CHECK_INDEX(position <= s.positions, "position ", position, " is past the end of a mixture epoch of ",
                    s.positions, " positions");
  const size_t b = position / s.block;
  std::vector<uint64_t> c = s.cursors_at_block(b);
  if (position % s.block == 0) return c;
  const auto a = s.arrangement(b);
  for (size_t j = 0; j < position % s.block; ++j) ++c[a->source[j]];
  return c;
}

void MixtureOrder::locate(size_t first, size_t count, int64_t* source, int64_t* sample) const {
  State& s = *state_;
  TORCH_CHECK_INDEX(first <= s.positions && count <= s.positions - first, "positions [", first, ", ", first + count,
                    ") are past the end of a mixture epoch of ", s.positions, " positions");
  size_t i = first;
  while (i < first + count) {
    const size_t b = i / s.block, block_first = b * s.block;
    const size_t end = std::min(first + count, block_first + s.block);
    const std::vector<uint64_t> base = s.cursors_at_block(b);
    const auto a = s.arrangement(b);
    for (; i < end; ++i) {
      const uint32_t src = a->source[i - block_first];
      source[i - first] = src;
      sample[i - first] = s.sample(src, base[src] + a->rank[i - block_first]);
    }
  }
}

}  // namespace torch_lmdb
