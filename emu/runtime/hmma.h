// hmma.h: how tensor cores (HMMA) add a WMMA product of 16-bit inputs into a float
// accumulator, per architecture; the emulator's mma_sync (cuda_emu.h) computes with it.
//
// The model (Khattak & Mikaitis, "Accurate models of NVIDIA tensor cores", 2025, after Fasi,
// Higham, Mikaitis & Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021), which a C++
// port of it matched bit for bit on the real-GPU vectors those authors publish: 5000 random
// cases per GPU and format, fp16 and bf16, on A100, A2 (sm_86), Ada and L40S (sm_89), H100 and
// H200 (sm_90), B200 (sm_100). The k products of a block and the accumulator c are summed as
// one fused operation:
//   - the products are exact; each one's alignment exponent is e(a) + e(b) (not normalised);
//   - every term is aligned to the largest exponent E among them and c, on the grid
//     2^(E - 23 - extra_bits), and truncated toward zero in magnitude (no rounding, no
//     sticky bit); the aligned integers are summed exactly;
//   - the sum is rounded toward zero to float, once.
// A WMMA m16n16k16 chains 16/block such blocks along k in ascending order, each block's float
// result the next one's c. Per architecture (block, extra bits, lowest alignment exponent):
//   sm_90, sm_100: 16, 2, -133 (one block per mma_sync)  [validated]
//   sm_80/86/89:    8, 1, -132                           [validated: one block; the order of
//                                                         the two blocks is assumed]
//   sm_75:          4, 0, none                           [inferred from V100: not validated]
// Every term is cut toward zero, so long sums of same-sign products come out low: a kernel
// that chains many mma_sync in one accumulator drifts by about 2.5 float ulps of the
// accumulator per block (K = 4096: -2.3e-5 relative on sm_90), where fmaf stays unbiased.
#pragma once

#include <climits>

namespace ccpl_emu {

struct HmmaModel {
    int block;       // products fused per step
    int extra_bits;  // alignment bits below the float lsb of the largest term
    int min_exp;     // lowest alignment exponent
};

constexpr HmmaModel hmma_model(int arch) {
    return arch >= 90   ? HmmaModel{16, 2, -133}
           : arch >= 80 ? HmmaModel{8, 1, -132}
                        : HmmaModel{4, 0, INT_MIN / 2};
}

// The exponent range of the input format: a subnormal input has exponent emin.
template <typename T> constexpr int input_emin() { return std::is_same<T, __half>::value ? -14 : -126; }

// x (a double that is exact, its magnitude below 2^128 or not) rounded toward zero to float,
// subnormals included; |x| >= 2^128 becomes an infinity.
inline float round_toward_zero(double x) {
    if (fabs(x) >= 0x1p128) return x > 0 ? INFINITY : -INFINITY;
    float f = static_cast<float>(x);  // nearest
    if (fabs(static_cast<double>(f)) > fabs(x)) f = nextafterf(f, 0.0f);
    return f;
}

// The exponent of a nonzero normal double (every f16, bf16 and float value is one).
inline int exponent_of(double x) {
    uint64_t bits;
    memcpy(&bits, &x, 8);
    return static_cast<int>(bits >> 52 & 0x7ff) - 1023;
}

// 2^e, for e in the normal range of double.
inline double power_of_two(int e) {
    const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
    double x;
    memcpy(&x, &bits, 8);
    return x;
}

// One fused block: c + sum_{i<n} a[i] b[i], the inputs exact in double, with emin the input
// format's (input_emin). Exact integer arithmetic on the aligned terms: a product of two
// 16-bit values is exact in double, and so is its scaling by a power of two.
inline float hmma_block(const HmmaModel& model, int emin, float c, const double* a, const double* b, int n) {
    bool nan = isnan(c), plus_inf = c == INFINITY, minus_inf = c == -INFINITY;
    bool any = false;
    int e_max = 0;
    for (int i = 0; i < n; ++i) {
        const double p = a[i] * b[i];
        if (!isfinite(p)) {
            nan |= isnan(p);
            plus_inf |= p == INFINITY;
            minus_inf |= p == -INFINITY;
            continue;
        }
        if (a[i] == 0 || b[i] == 0) continue;  // takes no part in the alignment
        const int ea = exponent_of(a[i]), eb = exponent_of(b[i]);
        const int e = (ea < emin ? emin : ea) + (eb < emin ? emin : eb);  // not normalised
        e_max = any && e_max > e ? e_max : e;
        any = true;
    }
    if (nan || (plus_inf && minus_inf)) return NAN;
    if (plus_inf) return INFINITY;
    if (minus_inf) return -INFINITY;
    if (c != 0) {
        const int e = exponent_of(c) < -126 ? -126 : exponent_of(c);
        e_max = any && e_max > e ? e_max : e;
        any = true;
    }
    if (!any) return 0.0f;
    if (e_max < model.min_exp) e_max = model.min_exp;
    const int grid = e_max - 23 - model.extra_bits;
    const double scale = power_of_two(-grid);
    // Each term is below 2^(26 + extra_bits) grid units, truncated toward zero by the
    // conversion; the sum of 17 fits an int64 exactly.
    int64_t sum = static_cast<int64_t>(static_cast<double>(c) * scale);
    for (int i = 0; i < n; ++i) sum += static_cast<int64_t>(a[i] * b[i] * scale);
    if (sum == 0) return 0.0f;
    return round_toward_zero(static_cast<double>(sum) * power_of_two(grid));
}

// c + sum_{k<K} a[k] b[k] as one element of an mma_sync: blocks of the model in ascending k.
inline float hmma_dot(const HmmaModel& model, int emin, float c, const double* a, const double* b, int K) {
    for (int k0 = 0; k0 < K; k0 += model.block) {
        const int n = K - k0 < model.block ? K - k0 : model.block;
        c = hmma_block(model, emin, c, a + k0, b + k0, n);
    }
    return c;
}

}  // namespace ccpl_emu
