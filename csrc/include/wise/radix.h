// Float-bit radix keys for exact magnitude selection. For x >= 0 the IEEE-754
// bit pattern, read as an unsigned integer, orders exactly as the value does,
// so the n-th largest |x| is found by histogramming 16-bit digits of the key:
// two passes at most, no sort and no topk.
#pragma once
#include <cstring>
#include "common.h"

namespace wise {

WISE_HD uint32_t abs_key(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x) & 0x7FFFFFFFu;
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u & 0x7FFFFFFFu;
#endif
}

constexpr int kRadixBins = 1 << 16;

// Result of one tensor's selection. `key` is the n-th largest magnitude's key
// once resolved; entries with abs_key >= key are kept. keep_none covers n = 0.
struct RadixState {
  uint32_t prefix = 0;      // high 16 bits found by pass 1
  uint64_t rank = 0;        // 1-based rank still wanted inside that bucket
  uint32_t key = 0;
  bool keep_none = false;
  bool resolved = false;
};

// Walks a histogram from the top bin down and returns the bin holding the
// rank-th largest element, with rank updated to its position inside that bin.
template <typename Count>
WISE_HD uint32_t radix_find_bin(const Count* hist, uint64_t* rank) {
  uint64_t above = 0;
  for (int b = kRadixBins - 1; b > 0; --b) {
    uint64_t h = static_cast<uint64_t>(hist[b]);
    if (above + h >= *rank) {
      *rank -= above;
      return static_cast<uint32_t>(b);
    }
    above += h;
  }
  *rank -= above;
  return 0;
}

// After pass 1: a bucket wanted whole, or one holding only exact zeros (the
// common case of sparse shard deltas), needs no second pass.
template <typename Count>
WISE_HD void radix_after_pass1(RadixState* s, const Count* hist, uint64_t zeros) {
  uint32_t bin = radix_find_bin(hist, &s->rank);
  s->prefix = bin;
  if (s->rank == static_cast<uint64_t>(hist[bin]) || (bin == 0 && zeros == static_cast<uint64_t>(hist[0]))) {
    s->key = bin << 16;
    s->resolved = true;
  }
}

template <typename Count>
WISE_HD void radix_after_pass2(RadixState* s, const Count* hist) {
  uint32_t low = radix_find_bin(hist, &s->rank);
  s->key = (s->prefix << 16) | low;
  s->resolved = true;
}

}  // namespace wise
