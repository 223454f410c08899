// Float-bit radix keys for exact magnitude selection. For x >= 0 the IEEE-754
// bit pattern, read as an unsigned integer, orders exactly as the value does,
// so the n-th largest |x| is found by histogramming digits of the key from the
// top: a few passes over the data, no sort and no topk. The CPU uses two 16-bit
// digits; the GPU three of 11, 11 and 10 bits, whose histograms fit in shared memory.
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

// One tensor's selection. Entries with abs_key >= key are kept once resolved;
// keep_none covers n = 0. Before that, prefix holds the digits found so far.
struct RadixState {
  uint32_t prefix;
  uint32_t key;
  uint64_t rank;      // 1-based rank still wanted among keys that share prefix
  int32_t resolved;
  int32_t keep_none;
};

WISE_HD RadixState radix_start(int64_t n_keep, int64_t numel) {
  RadixState s{0u, 0u, static_cast<uint64_t>(n_keep > 0 ? n_keep : 0), 0, 0};
  if (n_keep <= 0 || n_keep >= numel) {
    s.resolved = 1;
    s.keep_none = n_keep <= 0;
  }
  return s;
}

// Does key share the digits above `shift` with the state's prefix?
WISE_HD bool radix_in_bucket(uint32_t key, const RadixState& s, int shift_above) {
  return shift_above >= 32 || (key >> shift_above) == (s.prefix >> shift_above);
}

// Walks the histogram of one digit from the top bin down to the bin holding the
// rank-th largest key, then narrows the state. A bucket wanted whole, the last
// digit, or (in the first pass) a bottom bucket of exact zeros resolves it early:
// the sparse deltas of a WISE shard are the common case of the last.
template <typename Count>
WISE_HD void radix_narrow(RadixState* s, const Count* hist, int bins, int shift, uint64_t zeros, bool first) {
  uint64_t above = 0;
  int bin = 0;
  for (int b = bins - 1; b >= 0; --b) {
    const uint64_t h = static_cast<uint64_t>(hist[b]);
    if (above + h >= s->rank || b == 0) {
      bin = b;
      break;
    }
    above += h;
  }
  s->rank -= above;
  s->prefix |= static_cast<uint32_t>(bin) << shift;
  const uint64_t in_bin = static_cast<uint64_t>(hist[bin]);
  if (shift == 0 || s->rank == in_bin || (first && bin == 0 && zeros == in_bin)) {
    s->key = s->prefix;
    s->resolved = 1;
  }
}

}  // namespace wise
