// philox.cuh: the device sampler of the centres. Philox-4x32-10 (Salmon, Moraes, Dror, Shaw,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011), a counter-based generator: the
// words of a (seed, step, layer) stream are a pure function of their position, so every block
// that draws a layer's centres draws the same ones, and a step needs no state but its number.
// ccpl::sampling (Rust) implements the same stream and the same draw, word for word, so the
// host knows which centres the device drew.
#pragma once

#include "common.cuh"

namespace ccpl {

// The 4 words of Philox-4x32-10 at `counter` under `key`.
__device__ __forceinline__ void philox4x32_10(const uint32_t counter[4], const uint32_t key[2],
                                              uint32_t out[4]) {
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// The stream of 32-bit words of one layer at one step: word w is word w % 4 of Philox at the
// counter (step low, step high, layer, w / 4) under the key (seed low, seed high).
struct CenterStream {
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t words[4];
    int next;  // index in words of the next word; 4: compute the next block

    __device__ __forceinline__ CenterStream(uint64_t seed, uint64_t step, uint32_t layer)
        : counter{(uint32_t)step, (uint32_t)(step >> 32), layer, 0},
          key{(uint32_t)seed, (uint32_t)(seed >> 32)},
          words{},
          next(4) {}

    __device__ __forceinline__ uint32_t word() {
        if (next == 4) {
            philox4x32_10(counter, key, words);
            ++counter[3];
            next = 0;
        }
        // A select chain, not words[next]: an array indexed at run time would live in local
        // memory.
        const uint32_t w = next == 0 ? words[0] : next == 1 ? words[1] : next == 2 ? words[2] : words[3];
        ++next;
        return w;
    }

    // Uniform in 0..n (n > 0), without bias: Lemire's multiply-shift, with rejection of the
    // low products below 2^32 mod n.
    __device__ __forceinline__ uint32_t below(uint32_t n) {
        uint64_t m = (uint64_t)word() * n;
        if ((uint32_t)m < n) {
            const uint32_t threshold = (0u - n) % n;
            while ((uint32_t)m < threshold) m = (uint64_t)word() * n;
        }
        return (uint32_t)(m >> 32);
    }
};

// Writes `n` distinct interior positions of a height x width map (flat h*W + w) to dst[0..n),
// uniform without replacement, in random order: position i is uniform among the interior
// positions not drawn before it (a draw equal to an earlier one is drawn again). Every thread
// of the block calls this and computes the same stream; thread t checks, and writes, the
// draws t, t + blockDim.x, ..., so a thread reads only its own writes until the barrier at
// the end. n <= (height-2)(width-2).
__device__ __forceinline__ void draw_centers(int32_t* dst, int n, int height, int width,
                                             CenterStream rng) {
    const uint32_t inner_width = (uint32_t)(width - 2);
    const uint32_t interior = (uint32_t)(height - 2) * inner_width;
    for (int i = 0; i < n;) {
        const uint32_t v = rng.below(interior);
        const int32_t pos = (int32_t)((v / inner_width + 1) * (uint32_t)width + v % inner_width + 1);
        bool seen = false;
        for (int t = threadIdx.x; t < i; t += blockDim.x) seen |= dst[t] == pos;
        if (__syncthreads_or(seen)) continue;
        if (i % (int)blockDim.x == (int)threadIdx.x) dst[i] = pos;
        ++i;
    }
    __syncthreads();
}

}  // namespace ccpl
