// The pair search's kernels of pair_ops_cuda.cu (pair_search_kernel: a warp per atom, a ballot
// and a prefix count per 32 candidates; pair_padding_kernel) run on the CPU (emulate.h), as the
// launcher runs them: count, the counts' sums, write, pad. Checked against a plain loop over the
// same candidates (the same pairs, order and lattice shifts, bit for bit), in vacuum and in a
// triclinic box, half and full lists, with slots for every pair, too few (the rest dropped, the
// count still the total) and more (the padding: self pairs k mod n shifted beyond the cutoff).
// Built and run by tests/test_cuda_emulation.py. Prints one line per case and "N failures".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "emulate.h"
#include "packed_math.h"

using std::exp;
using std::tanh;

namespace {
#include "kernels.inc"

struct Pairs {
  std::vector<int64_t> first, second;
  std::vector<double> shift;  // 3 per pair
};

// every candidate of every atom in order: the pairs within the cutoff
Pairs expected_pairs(const std::vector<double>& pos, const std::vector<int64_t>& order,
                     const std::vector<int64_t>& start, const std::vector<int64_t>& end,
                     int64_t atoms, int64_t ranges, const double* box, double cutoff2, bool half) {
  Pairs p;
  for (int64_t i = 0; i < atoms; ++i) {
    for (int64_t r = 0; r < ranges; ++r) {
      for (int64_t k = start[i * ranges + r]; k < end[i * ranges + r]; ++k) {
        const int64_t j = order[k];
        double s[3];
        if ((half ? i < j : i != j) &&
            tn_math::pair_within(pos.data() + 3 * i, pos.data() + 3 * j, box, cutoff2, s)) {
          p.first.push_back(i);
          p.second.push_back(j);
          p.shift.insert(p.shift.end(), s, s + 3);
        }
      }
    }
  }
  return p;
}

int failures = 0;

void check(const char* name, int64_t atoms, int64_t ranges, bool periodic, bool half,
           int64_t slot_change, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double box[9] = {2.0, 0.0, 0.0, 0.3, 2.2, 0.0, -0.4, 0.5, 2.5};  // rows a, b, c (nm)
  std::vector<double> pos(3 * atoms);
  for (double& x : pos) x = unit(rng) * 2.3 - (periodic ? 0.0 : 0.1);
  // candidates: atoms in a shuffled order, each atom ``ranges`` random ranges of it (some empty,
  // some overlapping, as cells need not be)
  std::vector<int64_t> order(atoms);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int64_t> start(atoms * ranges), end(atoms * ranges);
  std::uniform_int_distribution<int64_t> at(0, atoms);
  for (int64_t q = 0; q < atoms * ranges; ++q) {
    int64_t a = at(rng), b = at(rng);
    if (q % 7 == 3) b = a;  // an empty range
    start[q] = std::min(a, b);
    end[q] = std::max(a, b);
  }
  const double cutoff = 0.5, cutoff2 = cutoff * cutoff;
  const double* b = periodic ? box : nullptr;
  const Pairs want = expected_pairs(pos, order, start, end, atoms, ranges, b, cutoff2, half);
  const int64_t total = static_cast<int64_t>(want.first.size());
  const int64_t slots = std::max<int64_t>(0, total + slot_change);
  // the launcher's sequence (pair_search in pair_ops_cuda.cu)
  std::vector<int64_t> counts(atoms, -1), ends(atoms), pairs(2 * std::max<int64_t>(slots, 1), -1);
  std::vector<double> shift(3 * std::max<int64_t>(slots, 1), -7.0);
  int64_t count = -1;
  const unsigned blocks = static_cast<unsigned>((atoms * 32 + kThreads - 1) / kThreads);
  emu::launch(blocks, 1, kThreads, 0, [&] {
    pair_search_kernel<double>(pos.data(), order.data(), start.data(), end.data(), atoms, ranges,
                               atoms, b, cutoff2, half, counts.data(), nullptr, nullptr, nullptr,
                               0);
  });
  std::partial_sum(counts.begin(), counts.end(), ends.begin());
  if (slots > 0) {
    emu::launch(blocks, 1, kThreads, 0, [&] {
      pair_search_kernel<double>(pos.data(), order.data(), start.data(), end.data(), atoms,
                                 ranges, atoms, b, cutoff2, half, counts.data(), ends.data(),
                                 pairs.data(), shift.data(), slots);
    });
  }
  const int64_t pad_block_count = std::max<int64_t>(1, (slots + kThreads - 1) / kThreads);
  const unsigned pad_blocks = static_cast<unsigned>(pad_block_count);
  emu::launch(pad_blocks, 1, kThreads, 0, [&] {
    pair_padding_kernel<double>(ends.data(), atoms, 2 * cutoff, pairs.data(), shift.data(), slots,
                                &count);
  });
  bool ok = count == total;
  for (int64_t k = 0; k < slots; ++k) {
    if (k < total) {
      ok = ok && pairs[k] == want.first[k] && pairs[slots + k] == want.second[k];
      for (int e = 0; e < 3; ++e) ok = ok && shift[3 * k + e] == want.shift[3 * k + e];
    } else {  // padding
      ok = ok && pairs[k] == k % atoms && pairs[slots + k] == k % atoms &&
           shift[3 * k] == 2 * cutoff && shift[3 * k + 1] == 0.0 && shift[3 * k + 2] == 0.0;
    }
  }
  failures += ok ? 0 : 1;
  std::printf("%-4s %-40s %lld pairs found, %lld slots, count %lld\n", ok ? "ok" : "FAIL", name,
              static_cast<long long>(total), static_cast<long long>(slots),
              static_cast<long long>(count));
}

}  // namespace

int main() {
  check("vacuum, half, every pair a slot", 40, 2, false, true, 0, 1);
  check("vacuum, full, 37 slots more", 40, 3, false, false, 37, 2);
  check("triclinic box, half, 5 slots too few", 61, 4, true, true, -5, 3);
  check("triclinic box, full, 300 slots more", 61, 2, true, false, 300, 4);
  check("one atom, no pairs, 3 slots", 1, 1, true, true, 3, 5);
  check("many candidates per warp", 100, 5, true, false, 0, 6);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
