// Counter-based RNG (Philox4x32-10, Salmon et al. 2011). A random bit depends
// only on (seed, stream, element index), never on thread layout or device, so
// the CPU and CUDA kernels draw identical masks and a mask need not be stored.
#pragma once
#include "common.h"

namespace wise {

struct Philox4 {
  uint32_t v[4];
};

WISE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

WISE_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(0xD2511F53u, c.v[0], &hi0);
    uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.v[2], &hi1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// One Philox call yields four words; element i uses word i % 4 of the block
// counted by i / 4, so a kernel that walks four elements at a time calls it once.
WISE_HD Philox4 philox_block(uint64_t seed, uint32_t stream, uint64_t block) {
  Philox4 c{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, 0u}};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Bernoulli(p) from a 32-bit word: the top 24 bits as a uniform in [0, 1), both
// sides exact in fp32, so p = 1 keeps everything and p = 0 nothing.
WISE_HD bool bernoulli(uint32_t word, float p) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f) < p;
}

// Streams keep the draws of different purposes apart under one seed.
constexpr uint32_t kShardStream = 0xA5A5A5A5u;

}  // namespace wise
