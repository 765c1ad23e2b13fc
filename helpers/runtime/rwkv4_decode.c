/* RWKV-4 on bigdl-llm's low-bit weights (sym_int4, asym_int4, sym_int5 or sym_int8), in one call for
   a token, a whole prompt, or one token of each of several sequences (a batched decoding step).

   Weights stay where bigdl keeps them, in blocks of 64 (layouts below). The input vector is
   quantized to int8 per 64 values (as bigdl does), so a block's dot product is a few integer
   multiply-adds (VNNI), exact, then scaled. Everything else (layer norms, token shift, WKV, channel
   mix) runs here too: a token is one call from Python instead of hundreds of small tensor
   operations. Several tokens (of a prompt, or one of each sequence of a batch) share each unpacked
   weight block, TOKENS (8) at a time, one per 32-bit lane.

   One source, three builds, chosen at run time from the CPU's flags (helpers/runtime/fused_decode.py),
   all on 256-bit vectors:
     KERNEL_AVX512   AVX-512 VNNI (Intel Ice Lake, AMD Zen 4 and newer): VNNI in its EVEX encoding
     KERNEL_AVXVNNI  AVX-VNNI (Intel Core 12th generation and newer, without AVX-512): the VEX encoding
     KERNEL_AVX2     AVX2 alone: each VNNI multiply-add becomes maddubs + madd (+ add), or in a prompt or
                     batch maddubs + a 16-bit add, one madd widening 16 of them (groups_in_16_bits)
   They differ only in the integer dot products, whose sums are exact; every floating-point step is
   the same code in the same order, so all three compute bit-identical logits. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(KERNEL_AVX512)
#if !defined(__AVX512VNNI__) || !defined(__AVX512VL__)
#error "KERNEL_AVX512 needs -mavx512vnni -mavx512vl"
#endif
#define KERNEL_NAME "avx512"
#elif defined(KERNEL_AVXVNNI)
#if !defined(__AVXVNNI__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
#error "KERNEL_AVXVNNI needs -mavxvnni (or, to test it on an AVX-512 CPU, -mavx512vnni -mavx512vl)"
#endif
#define KERNEL_NAME "avxvnni"
#elif defined(KERNEL_AVX2)
#define KERNEL_NAME "avx2"
#else
#error "compile with -DKERNEL_AVX512, -DKERNEL_AVXVNNI or -DKERNEL_AVX2"
#endif
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "every build needs AVX2, FMA and F16C"
#endif

/* Which build this library is. */
const char *rwkv4_kernel(void) { return KERNEL_NAME; }

#define BLOCK 64      /* weights per block, in every format */
#define ROWS 4        /* rows computed together for several tokens, sharing the loads of the input */
#define DECODE_ROWS 8 /* rows computed together for one token */
#define TOKENS 8      /* tokens of a prompt or batch computed together: one per 32-bit lane */
#define GROUPED_FROM 4 /* fewer tokens are computed one by one (see products) */

/* bigdl-llm's block layouts (64 weights each), in the order of FORMATS in fused_decode.py:
     sym_int4   fp16 scale d, 32 bytes of nibbles n            w = (n - 8) d
     asym_int4  fp16 scale d, fp16 minimum m, 32 bytes nibbles  w = n d + m
     sym_int5   fp16 scale d, 64 high bits h, 32 bytes nibbles  w = (n + 16 h - 16) d
     sym_int8   fp32 scale d, 64 signed bytes q                 w = q d
   Nibble byte j holds weight j (low) and weight j + 32 (high); high bit j belongs to weight j. */
enum { SYM_INT4, ASYM_INT4, SYM_INT5, SYM_INT8 };
static const int block_bytes[] = {[SYM_INT4] = 34, [ASYM_INT4] = 36, [SYM_INT5] = 42, [SYM_INT8] = 68};

#if defined(KERNEL_AVX2)
/* maddubs multiplies unsigned by signed bytes into 16-bit sums of pairs: sym_int8's weights stay
   signed and go in as |w| against sign(x, w), or the pairs could overflow. */
#define SIGNED_INT8 1
#else
#define SIGNED_INT8 0
#endif

/* Weights enter the integer dot products as unsigned bytes u, w = (u - zero point) d (+ m). */
static inline int zero_point(int format) {
    return format == SYM_INT4 ? 8 : format == SYM_INT5 ? 16 : format == SYM_INT8 && !SIGNED_INT8 ? 128 : 0;
}

/* Tokens rounded up to whole groups of TOKENS; tokens computed one by one need no padding. */
static int padded(int tokens) { return tokens < GROUPED_FROM ? tokens : (tokens + TOKENS - 1) / TOKENS * TOKENS; }

/* Inputs quantized to int8 per block of 64, one row of cols values per token; for a prompt also
   regrouped TOKENS tokens at a time so that each 32-bit lane holds one token's 4 values. */
typedef struct {
    int8_t *values; /* [tokens][cols] */
    float *scales;  /* [tokens][cols / BLOCK] */
    int32_t *sums;  /* [tokens][cols / BLOCK]: the sum of the block's values (for zero points and minimums) */
    int8_t *lanes;  /* [tokens / TOKENS][cols / 4][TOKENS][4] */
    float *lane_scales; /* [tokens / TOKENS][cols / BLOCK][TOKENS] */
    int32_t *lane_sums; /* [tokens / TOKENS][cols / BLOCK][TOKENS] */
} Quantized;

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int32_t sum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

static void quantize(const float *x, int cols, int8_t *values, float *scales, int32_t *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the packs' lane interleaving */
    for (int b = 0; b < cols / BLOCK; b++) {
        __m256 parts[8], amax = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++) {
            parts[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, parts[i]));
        }
        float largest = max8(amax);
        __m256 inverse = _mm256_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
        __m256i sum = _mm256_setzero_si256();
        for (int i = 0; i < 8; i += 4) {
            __m256i rounded[4];
            for (int j = 0; j < 4; j++) { /* to nearest, ties to even */
                rounded[j] = _mm256_cvtps_epi32(_mm256_mul_ps(parts[i + j], inverse));
                sum = _mm256_add_epi32(sum, rounded[j]);
            }
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(rounded[0], rounded[1]),
                                               _mm256_packs_epi32(rounded[2], rounded[3]));
            _mm256_storeu_si256((__m256i *)(values + b * BLOCK + 8 * i), _mm256_permutevar8x32_epi32(bytes, in_order));
        }
        scales[b] = largest / 127.0f;
        sums[b] = sum8_epi32(sum);
    }
}

/* 0x10 in byte j where bit j of bits is set. */
static inline __m256i high_bits(uint32_t bits) {
    const __m256i byte_of_bit = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), byte_of_bit), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(spread, bit), _mm256_set1_epi8(0x10));
}

/* A block's 64 weights as bytes u, in the order of the input's values: [0, 32) in low, [32, 64) in high. */
static inline void unpack(const uint8_t *block, int format, __m256i *low, __m256i *high) {
    const __m256i low_nibble = _mm256_set1_epi8(0x0f);
    if (format == SYM_INT8) {
        const __m256i flip = _mm256_set1_epi8(SIGNED_INT8 ? 0 : (char)0x80); /* u = q + 128 */
        *low = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(block + 4)), flip);
        *high = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(block + 36)), flip);
        return;
    }
    __m256i packed = _mm256_loadu_si256((const __m256i *)(block + (format == SYM_INT4 ? 2 : format == ASYM_INT4 ? 4 : 10)));
    *low = _mm256_and_si256(packed, low_nibble);
    *high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibble);
    if (format == SYM_INT5) {
        uint64_t bits;
        memcpy(&bits, block + 2, sizeof bits);
        *low = _mm256_or_si256(*low, high_bits((uint32_t)bits));
        *high = _mm256_or_si256(*high, high_bits((uint32_t)(bits >> 32)));
    }
}

/* acc + in each 32-bit lane the dot product of its 4 unsigned bytes in u with its 4 signed bytes in s. */
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
#if defined(KERNEL_AVX2)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#elif defined(__AVXVNNI__) && !defined(KERNEL_AVX512)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_dpbusd_epi32(acc, u, s); /* the same instruction, EVEX-encoded (AVX-512 VL) */
#endif
}

/* dot4 of a format's weights w (as unpack gives them) with inputs x. */
static inline __m256i weights_dot4(__m256i acc, __m256i w, __m256i x, int format) {
    if (SIGNED_INT8 && format == SYM_INT8)
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                                                       _mm256_set1_epi16(1)));
    return dot4(acc, w, x);
}

/* In each 32-bit lane, the dot products of 4 weights and 4 inputs in both halves of a block. */
static inline __m256i block_dot(__m256i low, __m256i high, __m256i x_low, __m256i x_high, int format) {
    if (!SIGNED_INT8 || format == SYM_INT8) /* VNNI, or sym_int8's signed weights */
        return weights_dot4(weights_dot4(_mm256_setzero_si256(), low, x_low, format), high, x_high, format);
    /* the avx2 build: 16-bit sums of pairs, at most 4 * 31 * 128 once both halves are added: no saturation */
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_low), _mm256_maddubs_epi16(high, x_high));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* The 8 rows' block sums (8 lanes each) added up: [total of row 0, 1, ..., 7]. */
static inline __m256i totals8(const __m256i sums[8]) {
    __m256i first = _mm256_hadd_epi32(_mm256_hadd_epi32(sums[0], sums[1]), _mm256_hadd_epi32(sums[2], sums[3]));
    __m256i second = _mm256_hadd_epi32(_mm256_hadd_epi32(sums[4], sums[5]), _mm256_hadd_epi32(sums[6], sums[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(first, second, 0x20), _mm256_permute2x128_si256(first, second, 0x31));
}

/* The fp16 values at p, p + stride, ... p + 7 * stride as floats, gathered in a register (through
   memory they would wait on 8 stores). */
static inline __m256 halves8(const uint8_t *p, size_t stride) {
    const int16_t *at[8];
    for (int r = 0; r < 8; r++) at[r] = (const int16_t *)(p + r * stride);
    return _mm256_cvtph_ps(_mm_setr_epi16(*at[0], *at[1], *at[2], *at[3], *at[4], *at[5], *at[6], *at[7]));
}

/* A block's scale d, and asym_int4's minimum m. */
static inline float block_scale(const uint8_t *block, int format) {
    float d;
    if (format != SYM_INT8) return _cvtsh_ss(*(const uint16_t *)block);
    memcpy(&d, block, sizeof d);
    return d;
}

static inline float block_minimum(const uint8_t *block) { return _cvtsh_ss(*(const uint16_t *)(block + 2)); }

/* out[0..DECODE_ROWS) = dot products of DECODE_ROWS consecutive rows with q (decoding one token). The
   next rows are prefetched into L1, and the ones after them into the outer caches. Each block adds
   (integer total) * (d * input scale), then for asym_int4 (sum of inputs) * (m * input scale), to
   the row's sum in block order, exactly as rows_tokens_dot does for each token: a sequence gets the
   same logits decoded alone as in a batch, so the same greedy tokens. 256-bit vectors in every
   build: on an AMD EPYC (Zen 4) as fast as the 512-bit kernel they replaced (25.6 against 25.9 ms a
   token on the 1.5B shape, measured interleaved), with one code for every build; 8 rows at a time
   share the input's loads and one sum of 8 totals (3% faster than 4 on the 1.5B shape). */
static inline __attribute__((always_inline)) void rows_dot_as(const uint8_t *first_row, size_t row_bytes,
                                                                const Quantized *q, int blocks, float *out, int format) {
    __m256 acc = _mm256_setzero_ps(); /* one lane per row */
    int stride = block_bytes[format];
    for (int b = 0; b < blocks; b++) {
        __m256i x_low = _mm256_loadu_si256((const __m256i *)(q->values + b * BLOCK)),
                x_high = _mm256_loadu_si256((const __m256i *)(q->values + b * BLOCK + 32)), sums[DECODE_ROWS];
        for (int r = 0; r < DECODE_ROWS; r++) {
            const uint8_t *block = first_row + r * row_bytes + b * stride;
            _mm_prefetch((const char *)block + DECODE_ROWS * row_bytes, _MM_HINT_T0);
            if (b % 2 == 0) _mm_prefetch((const char *)block + 2 * DECODE_ROWS * row_bytes, _MM_HINT_T2);
            __m256i low, high;
            unpack(block, format, &low, &high);
            sums[r] = block_dot(low, high, x_low, x_high, format);
        }
        const uint8_t *column = first_row + b * stride;
        __m256 d = format != SYM_INT8 ? halves8(column, row_bytes)
                                      : _mm256_setr_ps(block_scale(column, format), block_scale(column + row_bytes, format),
                                                       block_scale(column + 2 * row_bytes, format),
                                                       block_scale(column + 3 * row_bytes, format),
                                                       block_scale(column + 4 * row_bytes, format),
                                                       block_scale(column + 5 * row_bytes, format),
                                                       block_scale(column + 6 * row_bytes, format),
                                                       block_scale(column + 7 * row_bytes, format));
        __m256i totals = _mm256_sub_epi32(totals8(sums), _mm256_set1_epi32(zero_point(format) * q->sums[b]));
        __m256 x_scale = _mm256_set1_ps(q->scales[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(totals), _mm256_mul_ps(d, x_scale), acc);
        if (format == ASYM_INT4)
            acc = _mm256_fmadd_ps(_mm256_set1_ps((float)q->sums[b]), _mm256_mul_ps(halves8(column + 2, row_bytes), x_scale),
                                  acc);
    }
    _mm256_storeu_ps(out, acc);
}

static void rows_dot(const uint8_t *first_row, size_t row_bytes, const Quantized *q, int blocks, float *out, int format) {
    switch (format) { /* one specialized copy per format */
    case SYM_INT4: rows_dot_as(first_row, row_bytes, q, blocks, out, SYM_INT4); break;
    case ASYM_INT4: rows_dot_as(first_row, row_bytes, q, blocks, out, ASYM_INT4); break;
    case SYM_INT5: rows_dot_as(first_row, row_bytes, q, blocks, out, SYM_INT5); break;
    default: rows_dot_as(first_row, row_bytes, q, blocks, out, SYM_INT8);
    }
}

/* The 4 bytes at p in every 32-bit lane, loaded straight from memory (a load, no shuffle: compilers
   otherwise rebuild it from a register with two shuffles, the bottleneck of rows_tokens_dot). */
static inline __m256i broadcast_dword(const uint8_t *p) {
    __m256i v;
    __asm__("vpbroadcastd %1, %0" : "=v"(v) : "m"(*(const int32_t *)p));
    return v;
}

static inline void unpack_to(const uint8_t *block, int format, uint8_t *out) {
    __m256i low, high;
    unpack(block, format, &low, &high);
    _mm256_storeu_si256((__m256i *)out, low);
    _mm256_storeu_si256((__m256i *)(out + 32), high);
}

/* How many groups of 4 weights the avx2 build adds up as 16-bit sums of pairs (maddubs) before one madd
   widens them, alternating between two sums: each stays under 2^15 (groups / 2 * 2 * 127 * the largest u,
   15 or 31), and the build needs about half the multiply-adds of maddubs + madd for every group. */
static inline int groups_in_16_bits(int format) { return format == SYM_INT5 ? 8 : 16; }

/* acc + maddubs(u, s) in 16 bits, as written: compilers otherwise regroup the additions of a block into trees,
   whose partial sums do not fit in the registers. */
static inline __m256i add_pairs(__m256i acc, __m256i u, __m256i s) {
    __m256i pairs;
    __asm__("vpmaddubsw %2, %3, %1\n\tvpaddw %1, %0, %0" : "+x"(acc), "=&x"(pairs) : "x"(s), "x"(u));
    return acc;
}

/* out[t * rows + r] for the TOKENS tokens of group `group` and ROWS consecutive rows: each lane of a
   dot product is one token, each weight broadcast to all lanes, so a block's scale applies to a
   whole vector (one conversion per row and block instead of one per row, block and token). Vectors
   of 256 bits: as many multiply-adds per second as 512 on an AMD EPYC (Zen 4, measured: 3.5 G against
   1.8 G instructions per second and core), and a batch of 2 to 8 sequences pads to 8 tokens, not 16. */
static inline __attribute__((always_inline)) void rows_tokens_dot_as(const uint8_t *first_row, size_t row_bytes,
                                                                       const Quantized *q, int group, int cols,
                                                                       int rows, float *out, int format) {
    int blocks = cols / BLOCK, stride = block_bytes[format];
    const int8_t *lanes = q->lanes + (size_t)group * cols * TOKENS;
    const float *lane_scales = q->lane_scales + (size_t)group * blocks * TOKENS;
    const int32_t *lane_sums = q->lane_sums + (size_t)group * blocks * TOKENS;
    const __m256i minus_zero_point = _mm256_set1_epi32(-zero_point(format));
    __m256 acc[ROWS];
    uint8_t weights[2][ROWS][BLOCK]; /* block b's unpacked weights, and block b + 1's, stored a block ahead */
    for (int r = 0; r < ROWS; r++) {
        acc[r] = _mm256_setzero_ps();
        unpack_to(first_row + r * row_bytes, format, weights[0][r]);
    }
    for (int b = 0; b < blocks; b++) {
        uint8_t (*current)[BLOCK] = weights[b % 2];
        __m256i input_sums = _mm256_loadu_si256((const __m256i *)(lane_sums + b * TOKENS)), totals[ROWS];
        const __m256i zero_point_sums = _mm256_mullo_epi32(input_sums, minus_zero_point);
        const int8_t *x = lanes + (size_t)b * BLOCK * TOKENS;
        if (SIGNED_INT8 && format != SYM_INT8) { /* the avx2 build: sums of pairs added up in 16 bits first */
            const __m256i ones = _mm256_set1_epi16(1);
            for (int r = 0; r < ROWS; r++) totals[r] = zero_point_sums;
            for (int first = 0; first < BLOCK / 4; first += groups_in_16_bits(format)) {
                __m256i even[ROWS], odd[ROWS]; /* two sums per row, so consecutive multiply-adds do not wait */
                for (int r = 0; r < ROWS; r++) even[r] = odd[r] = _mm256_setzero_si256();
                for (int g = first; g < first + groups_in_16_bits(format); g += 2) {
                    __m256i x_even = _mm256_loadu_si256((const __m256i *)(x + g * 4 * TOKENS)),
                            x_odd = _mm256_loadu_si256((const __m256i *)(x + (g + 1) * 4 * TOKENS));
                    for (int r = 0; r < ROWS; r++) {
                        even[r] = add_pairs(even[r], broadcast_dword(current[r] + 4 * g), x_even);
                        odd[r] = add_pairs(odd[r], broadcast_dword(current[r] + 4 * g + 4), x_odd);
                    }
                }
                for (int r = 0; r < ROWS; r++)
                    totals[r] = _mm256_add_epi32(totals[r], _mm256_add_epi32(_mm256_madd_epi16(even[r], ones),
                                                                             _mm256_madd_epi16(odd[r], ones)));
            }
        } else {
            __m256i even[ROWS], odd[ROWS]; /* two sums per row, so consecutive dot products do not wait */
            for (int r = 0; r < ROWS; r++) {
                even[r] = zero_point_sums;
                odd[r] = _mm256_setzero_si256();
            }
            for (int g = 0; g < BLOCK / 4; g += 2) {
                __m256i x_even = _mm256_loadu_si256((const __m256i *)(x + g * 4 * TOKENS)),
                        x_odd = _mm256_loadu_si256((const __m256i *)(x + (g + 1) * 4 * TOKENS));
                for (int r = 0; r < ROWS; r++) {
                    even[r] = weights_dot4(even[r], broadcast_dword(current[r] + 4 * g), x_even, format);
                    odd[r] = weights_dot4(odd[r], broadcast_dword(current[r] + 4 * g + 4), x_odd, format);
                }
            }
            for (int r = 0; r < ROWS; r++) totals[r] = _mm256_add_epi32(even[r], odd[r]);
        }
        if (b + 1 < blocks)
            for (int r = 0; r < ROWS; r++) {
                const uint8_t *next = first_row + r * row_bytes + (b + 1) * stride;
                _mm_prefetch((const char *)next + ROWS * row_bytes, _MM_HINT_T0);
                unpack_to(next, format, weights[(b + 1) % 2][r]);
            }
        __m256 x_scales = _mm256_loadu_ps(lane_scales + b * TOKENS);
        for (int r = 0; r < ROWS; r++) {
            const uint8_t *block = first_row + r * row_bytes + b * stride;
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(totals[r]),
                                     _mm256_mul_ps(_mm256_set1_ps(block_scale(block, format)), x_scales), acc[r]);
            if (format == ASYM_INT4)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(input_sums),
                                         _mm256_mul_ps(_mm256_set1_ps(block_minimum(block)), x_scales), acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float per_token[TOKENS];
        _mm256_storeu_ps(per_token, acc[r]);
        for (int t = 0; t < TOKENS; t++) out[(size_t)t * rows + r] = per_token[t];
    }
}

static void rows_tokens_dot(const uint8_t *first_row, size_t row_bytes, const Quantized *q, int group, int cols,
                            int rows, float *out, int format) {
    switch (format) { /* one specialized copy per format */
    case SYM_INT4: rows_tokens_dot_as(first_row, row_bytes, q, group, cols, rows, out, SYM_INT4); break;
    case ASYM_INT4: rows_tokens_dot_as(first_row, row_bytes, q, group, cols, rows, out, ASYM_INT4); break;
    case SYM_INT5: rows_tokens_dot_as(first_row, row_bytes, q, group, cols, rows, out, SYM_INT5); break;
    default: rows_tokens_dot_as(first_row, row_bytes, q, group, cols, rows, out, SYM_INT8);
    }
}

/* Regroup the quantized inputs of tokens [group * TOKENS, + TOKENS) into q's lane layout. */
static void to_lanes(const Quantized *q, int group, int cols) {
    int blocks = cols / BLOCK;
    size_t first = (size_t)group * TOKENS;
    const int32_t *values = (const int32_t *)(q->values + first * cols);
    int32_t *lanes = (int32_t *)(q->lanes + first * cols);
    for (int k = 0; k < cols / 4; k++)
        for (int t = 0; t < TOKENS; t++) lanes[(size_t)k * TOKENS + t] = values[(size_t)t * (cols / 4) + k];
    for (int b = 0; b < blocks; b++)
        for (int t = 0; t < TOKENS; t++) {
            q->lane_scales[first * blocks + (size_t)b * TOKENS + t] = q->scales[(first + t) * blocks + b];
            q->lane_sums[first * blocks + (size_t)b * TOKENS + t] = q->sums[(first + t) * blocks + b];
        }
}

typedef struct {
    const uint8_t *weight; /* [rows, cols] in the format products() is given */
    int rows, cols;
    const float *x; /* [tokens][cols] */
    float *y;       /* [tokens][rows] */
} Product;

/* y[tokens][rows] = x[tokens][cols] W^T for several tokens (a prompt, or a batch of sequences)
   (rows % ROWS == 0), TOKENS tokens at a time: y and q padded to a multiple of TOKENS tokens. Rows are
   shared among the threads. */
static void grouped_product(const Product *p, int tokens, int format, int threads, const Quantized *q) {
    int cols = p->cols, blocks = cols / BLOCK, groups = padded(tokens) / TOKENS;
    size_t row_bytes = (size_t)blocks * block_bytes[format];
#pragma omp parallel for num_threads(threads)
    for (int t = 0; t < groups * TOKENS; t++) {
        if (t < tokens) {
            quantize(p->x + (size_t)t * cols, cols, q->values + (size_t)t * cols, q->scales + (size_t)t * blocks,
                     q->sums + (size_t)t * blocks);
        } else { /* zero inputs for the padding tokens */
            memset(q->values + (size_t)t * cols, 0, cols);
            memset(q->scales + (size_t)t * blocks, 0, sizeof(float) * blocks);
            memset(q->sums + (size_t)t * blocks, 0, sizeof(int32_t) * blocks);
        }
    }
    for (int group = 0; group < groups; group++) to_lanes(q, group, cols);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < p->rows; r += ROWS)
        for (int group = 0; group < groups; group++)
            rows_tokens_dot(p->weight + r * row_bytes, row_bytes, q, group, cols, p->rows,
                            p->y + (size_t)group * TOKENS * p->rows + r, format);
}

#define MAX_PRODUCTS 3

/* Independent products y = x W^T of `tokens` tokens; q holds a buffer per product. One token (decoding)
   shares a single parallel loop over all their rows: an unbroken stream of weights, and one wait at
   its end instead of one per product. Fewer than GROUPED_FROM tokens run that way one after another
   (each reads the weights again, and that is still faster than a group of 8 computed for 2 or 3);
   more are computed in groups of TOKENS, one product after another. */
static void products(const Product *p, int count, int tokens, int format, int threads, const Quantized *q) {
    if (tokens >= GROUPED_FROM) {
        for (int i = 0; i < count; i++) grouped_product(&p[i], tokens, format, threads, q);
        return;
    }
    for (int t = 0; t < tokens; t++) {
        int first_group[MAX_PRODUCTS + 1] = {0};
        for (int i = 0; i < count; i++) {
            quantize(p[i].x + (size_t)t * p[i].cols, p[i].cols, q[i].values, q[i].scales, q[i].sums);
            first_group[i + 1] = first_group[i] + p[i].rows / DECODE_ROWS;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int g = 0; g < first_group[count]; g++) {
            int i = 0;
            while (g >= first_group[i + 1]) i++;
            int blocks = p[i].cols / BLOCK, r = (g - first_group[i]) * DECODE_ROWS;
            size_t row_bytes = (size_t)blocks * block_bytes[format];
            rows_dot(p[i].weight + r * row_bytes, row_bytes, &q[i], blocks, p[i].y + (size_t)t * p[i].rows + r, format);
        }
    }
}

static size_t aligned(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Bytes of the Quantized buffers for `tokens` rows of `cols` values. */
static size_t quantized_bytes(int tokens, int cols) {
    size_t rows = (size_t)padded(tokens), blocks = cols / BLOCK;
    return 2 * (aligned(rows * cols) + 2 * aligned(sizeof(float) * rows * blocks));
}

/* The Quantized buffers for `tokens` rows of `cols` values, laid out in `memory` (quantized_bytes of it). */
static Quantized quantized_in(uint8_t *memory, int tokens, int cols) {
    size_t rows = (size_t)padded(tokens), values = aligned(rows * cols), numbers = aligned(sizeof(float) * rows * cols / BLOCK);
    Quantized q = {(int8_t *)memory, (float *)(memory + values), (int32_t *)(memory + values + numbers),
                   (int8_t *)(memory + values + 2 * numbers), (float *)(memory + 2 * values + 2 * numbers),
                   (int32_t *)(memory + 2 * values + 3 * numbers)};
    return q;
}

/* Each calling thread keeps its buffers from one call to the next, up to KEPT_BYTES: a step of a batch
   needs megabytes, and memory freshly allocated each call (glibc maps blocks of 128 KiB or more itself
   when a server pins that bound) would fault in page by page every step. A larger one (a long prompt read
   at once) is freed when its call returns; the kept one when its thread ends. */
#define KEPT_BYTES ((size_t)64 << 20)
typedef struct {
    void *memory;
    size_t bytes;
} Workspace;
static pthread_key_t workspace_key;
static pthread_once_t workspace_key_once = PTHREAD_ONCE_INIT;

static void free_workspace(void *workspace) {
    free(((Workspace *)workspace)->memory);
    free(workspace);
}

static void make_workspace_key(void) { pthread_key_create(&workspace_key, free_workspace); }

/* This thread's workspace, with `bytes` (64-byte aligned) at its memory, or NULL when out of memory. */
static Workspace *workspace(size_t bytes) {
    pthread_once(&workspace_key_once, make_workspace_key);
    Workspace *w = pthread_getspecific(workspace_key);
    if (!w && (w = calloc(1, sizeof *w)) && pthread_setspecific(workspace_key, w)) {
        free(w);
        return NULL;
    }
    if (w && w->bytes < bytes) {
        free(w->memory);
        w->memory = aligned_alloc(64, aligned(bytes));
        w->bytes = w->memory ? bytes : 0;
    }
    return w && w->memory ? w : NULL;
}

/* The end of a call: a workspace above KEPT_BYTES is freed. */
static void done_with(Workspace *w) {
    if (w && w->bytes > KEPT_BYTES) {
        free(w->memory);
        w->memory = NULL;
        w->bytes = 0;
    }
}

/* Exposed for the benchmark: how many blocks' integer dot products in `format` (block_dot: the build's
   multiply-adds for one row's 64 weights, as a decoding step computes them) `threads` threads compute
   per second, back to back from registers. Weight blocks / this rate is the time a token's multiply-adds
   take when memory does not hold them up: without VNNI, at 2 cores, it can exceed the read time. */
static double block_dots_per_second_as(int threads, int format) {
    const long rounds = 1L << 21;
    const int chains = 8; /* independent sums, so that each product waits on none */
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
        __m256i sums[8], low = _mm256_set1_epi8(7), high = _mm256_set1_epi8(9), x = _mm256_set1_epi8(-3);
        for (int i = 0; i < chains; i++) sums[i] = _mm256_setzero_si256();
        for (long n = 0; n < rounds; n++)
            for (int i = 0; i < chains; i++) {
                __asm__("" : "+x"(low), "+x"(high), "+x"(x)); /* new inputs to the compiler: no product is reused */
                sums[i] = _mm256_add_epi32(sums[i], block_dot(low, high, x, x, format));
            }
        for (int i = 1; i < chains; i++) sums[0] = _mm256_add_epi32(sums[0], sums[i]);
        __asm__ volatile("" : : "x"(sums[0])); /* the sums are used */
    }
    return (double)threads * rounds * chains / (omp_get_wtime() - start);
}

double rwkv4_block_dots_per_second(int format, int threads) {
    switch (format) { /* one specialized copy per format, as rows_dot */
    case SYM_INT4: return block_dots_per_second_as(threads, SYM_INT4);
    case ASYM_INT4: return block_dots_per_second_as(threads, ASYM_INT4);
    case SYM_INT5: return block_dots_per_second_as(threads, SYM_INT5);
    default: return block_dots_per_second_as(threads, SYM_INT8);
    }
}

#define OUT_OF_MEMORY (-1) /* what the exposed functions return when a buffer could not be allocated */

/* Exposed for tests: y[tokens][rows] = x[tokens][cols] W^T through the model's kernels, W in `format`
   (y padded to a multiple of TOKENS tokens from GROUPED_FROM tokens on). Returns 0 or OUT_OF_MEMORY. */
int rwkv4_matmul(const uint8_t *weight, int format, int rows, int cols, const float *x, int tokens, float *y,
                 int threads) {
    Workspace *w = workspace(quantized_bytes(tokens, cols));
    if (!w) return OUT_OF_MEMORY;
    Quantized q = quantized_in(w->memory, tokens, cols);
    Product product = {weight, rows, cols, x, y};
    products(&product, 1, tokens, format, threads, &q);
    done_with(w);
    return 0;
}

typedef struct {
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    const float *attention_mix; /* [3][hidden]: key, value, receptance */
    const float *time_first, *decay;
    const uint8_t *attention_key, *attention_value, *attention_receptance, *attention_output; /* in Model.format */
    const float *feed_forward_mix; /* [2][hidden]: key, receptance */
    const uint8_t *feed_forward_key, *feed_forward_receptance, *feed_forward_value;
    float output_scale;
} Layer;

typedef struct {
    int layers, hidden, intermediate, vocab, rescale_every;
    int format, head_format; /* every layer's linears' (SYM_INT4 ...), and the head's: a mix keeps it at more bits */
    float eps;
    const uint16_t *embeddings; /* fp16 [vocab][hidden] */
    const float *ln0_weight, *ln0_bias, *ln_out_weight, *ln_out_bias;
    const uint8_t *head;
    const Layer *layer;
} Model;

/* The interface the loader (fused_decode.py) mirrors with ctypes, as one line of text: its version, the block
   size, each format's name and block bytes in enum order, and the offset of every field of both structs and
   their sizes. The loader refuses a library whose line differs from the one it builds from its own side. */
#define ABI_VERSION 3
static const char *const format_names[] = {[SYM_INT4] = "sym_int4", [ASYM_INT4] = "asym_int4",
                                           [SYM_INT5] = "sym_int5", [SYM_INT8] = "sym_int8"};
typedef struct {
    const char *name;
    size_t offset;
} Field;
#define FIELD(type, name) {#name, offsetof(type, name)}
static const Field layer_fields[] = {
    FIELD(Layer, ln1_weight), FIELD(Layer, ln1_bias), FIELD(Layer, ln2_weight), FIELD(Layer, ln2_bias),
    FIELD(Layer, attention_mix), FIELD(Layer, time_first), FIELD(Layer, decay), FIELD(Layer, attention_key),
    FIELD(Layer, attention_value), FIELD(Layer, attention_receptance), FIELD(Layer, attention_output),
    FIELD(Layer, feed_forward_mix), FIELD(Layer, feed_forward_key), FIELD(Layer, feed_forward_receptance),
    FIELD(Layer, feed_forward_value), FIELD(Layer, output_scale)};
static const Field model_fields[] = {
    FIELD(Model, layers), FIELD(Model, hidden), FIELD(Model, intermediate), FIELD(Model, vocab),
    FIELD(Model, rescale_every), FIELD(Model, format), FIELD(Model, head_format), FIELD(Model, eps),
    FIELD(Model, embeddings), FIELD(Model, ln0_weight), FIELD(Model, ln0_bias), FIELD(Model, ln_out_weight),
    FIELD(Model, ln_out_bias), FIELD(Model, head), FIELD(Model, layer)};

static int describe_struct(char *text, size_t size, const char *name, const Field *fields, int count, size_t bytes) {
    int used = snprintf(text, size, "; %s %zu:", name, bytes);
    for (int i = 0; i < count && used >= 0 && (size_t)used < size; i++)
        used += snprintf(text + used, size - used, " %s@%zu", fields[i].name, fields[i].offset);
    return used;
}

/* Writes the interface line into text (size bytes); returns its length (larger than size - 1 when cut). */
int rwkv4_interface(char *text, int size) {
    int used = snprintf(text, size, "version %d; block %d; formats:", ABI_VERSION, BLOCK);
    for (int f = 0; f < (int)(sizeof format_names / sizeof *format_names) && used < size; f++)
        used += snprintf(text + used, size - used, " %s=%d", format_names[f], block_bytes[f]);
    if (used < size)
        used += describe_struct(text + used, size - used, "Layer", layer_fields,
                                sizeof layer_fields / sizeof *layer_fields, sizeof(Layer));
    if (used < size)
        used += describe_struct(text + used, size - used, "Model", model_fields,
                                sizeof model_fields / sizeof *model_fields, sizeof(Model));
    return used;
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Layer norm of n floats (n % 8 == 0); out may be x. */
static void layer_norm(const float *x, const float *weight, const float *bias, int n, float eps, float *out) {
    __m256 sum = _mm256_setzero_ps(), squares = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + i));
    __m256 mean = _mm256_set1_ps(sum8(sum) / n);
    for (int i = 0; i < n; i += 8) {
        __m256 centered = _mm256_sub_ps(_mm256_loadu_ps(x + i), mean);
        squares = _mm256_fmadd_ps(centered, centered, squares);
    }
    __m256 inverse = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / n + eps));
    for (int i = 0; i < n; i += 8) {
        __m256 normed = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mean), inverse);
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(normed, _mm256_loadu_ps(weight + i), _mm256_loadu_ps(bias + i)));
    }
}

/* A state tensor [n][layers] to [layers][n] and back (n % 16 == 0), 16 rows of it at a time: each
   step reads or writes one cache line of [layers][n] and a small tile of [n][layers] (a plain
   transpose has layers lines n floats apart in flight, all in the same L1 set). */
static void to_layer_rows(const float *state, int n, int layers, float *by_layer) {
    for (int i = 0; i < n; i += 16)
        for (int l = 0; l < layers; l++)
            for (int r = 0; r < 16; r++) by_layer[(size_t)l * n + i + r] = state[(size_t)(i + r) * layers + l];
}

static void from_layer_rows(const float *by_layer, int n, int layers, float *state) {
    for (int i = 0; i < n; i += 16)
        for (int l = 0; l < layers; l++)
            for (int r = 0; r < 16; r++) state[(size_t)(i + r) * layers + l] = by_layer[(size_t)l * n + i + r];
}

/* out[t] = previous + (normed[t] - previous) * mix for each token, previous being the token before
   (for the first, the state's `first_previous`). */
static void shift_mix(const float *normed, int tokens, int n, const float *first_previous, const float *mix, float *out) {
    for (int t = 0; t < tokens; t++) {
        const float *previous = t > 0 ? normed + (size_t)(t - 1) * n : first_previous, *current = normed + (size_t)t * n;
        for (int i = 0; i < n; i += 8) {
            __m256 before = _mm256_loadu_ps(previous + i);
            _mm256_storeu_ps(out + (size_t)t * n + i, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(current + i), before),
                                                                    _mm256_loadu_ps(mix + i), before));
        }
    }
}

/* The start of a time or channel mix, for each sequence's tokens (rows of x): the layer norm, then
   `mixes` interpolations with the token before (for a sequence's first token, its row of `shift`,
   sequences per_sequence floats apart), and the last normed token kept in `shift` for the next call. */
static void norm_and_shift(const float *x, int sequences, int tokens, int n, float eps, const float *weight,
                           const float *bias, const float *mix, int mixes, float *shift, size_t per_sequence,
                           float *normed, float *const *mixed, int threads) {
    int total = sequences * tokens;
#pragma omp parallel for num_threads(threads) if (total > 1)
    for (int t = 0; t < total; t++) layer_norm(x + (size_t)t * n, weight, bias, n, eps, normed + (size_t)t * n);
    for (int s = 0; s < sequences; s++) {
        size_t first = (size_t)s * tokens * n;
        float *own = shift + s * per_sequence;
        for (int j = 0; j < mixes; j++) shift_mix(normed + first, tokens, n, own, mix + j * n, mixed[j] + first);
        memcpy(own, normed + first + (size_t)(tokens - 1) * n, sizeof(float) * n);
    }
}

/* e^x for 8 floats: 2^(x log2 e) split into an integer power, added to the exponent bits, and 2^f
   for |f| <= 1/2 by its Taylor series to degree 7 (relative error below 1e-8). x is clamped to
   [-86, 88], where e^x stays a normal float: below, e^x < 5e-38 counts as nothing here. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-86.0f)), _mm256_set1_ps(88.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, whole), _mm256_set1_ps(0.69314718055994531f));
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    const float coefficients[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(coefficients[i]));
    __m256i power = _mm256_slli_epi32(_mm256_cvtps_epi32(whole), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), power));
}

static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* The WKV recurrence of a layer over the tokens for channels [c, c + 8): mixed = sigmoid(receptance)
   * wkv, and the layer's numerator, denominator and maximum (rows of the state) move on. */
static void wkv8(const Layer *layer, int c, int tokens, int n, const float *key, const float *value,
                 const float *receptance, float *mixed, float *numerator, float *denominator, float *maximum) {
    __m256 num = _mm256_loadu_ps(numerator + c), den = _mm256_loadu_ps(denominator + c),
           max_state = _mm256_loadu_ps(maximum + c);
    __m256 time_first = _mm256_loadu_ps(layer->time_first + c), decay = _mm256_loadu_ps(layer->decay + c);
    for (int t = 0; t < tokens; t++) {
        size_t at = (size_t)t * n + c;
        __m256 k = _mm256_loadu_ps(key + at), v = _mm256_loadu_ps(value + at);
        __m256 with_bonus = _mm256_add_ps(time_first, k), top = _mm256_max_ps(max_state, with_bonus);
        __m256 e1 = exp8(_mm256_sub_ps(max_state, top)), e2 = exp8(_mm256_sub_ps(with_bonus, top));
        __m256 wkv = _mm256_div_ps(_mm256_fmadd_ps(e1, num, _mm256_mul_ps(e2, v)), _mm256_fmadd_ps(e1, den, e2));
        _mm256_storeu_ps(mixed + at, _mm256_mul_ps(sigmoid8(_mm256_loadu_ps(receptance + at)), wkv));
        __m256 decayed = _mm256_add_ps(max_state, decay);
        top = _mm256_max_ps(decayed, k);
        e1 = exp8(_mm256_sub_ps(decayed, top));
        e2 = exp8(_mm256_sub_ps(k, top));
        num = _mm256_fmadd_ps(e1, num, _mm256_mul_ps(e2, v));
        den = _mm256_fmadd_ps(e1, den, e2);
        max_state = top;
    }
    _mm256_storeu_ps(numerator + c, num);
    _mm256_storeu_ps(denominator + c, den);
    _mm256_storeu_ps(maximum + c, max_state);
}

/* Reads `tokens` token ids of each of `sequences` independent sequences (ids [sequences][tokens]),
   each continuing its own state, and writes the logits of each sequence's last token, or of every
   token when all_logits ([sequences][tokens or 1][vocab]). Several sequences of one token each are a
   batched decoding step: every weight block is read once for all of them. states[5 * s + k] is state
   tensor k of sequence s, laid out as transformers makes it ([hidden, layers]): feed-forward shift,
   attention shift, WKV numerator, denominator and running maximum. The layers work on a transposed
   copy, [sequences][5][layers][hidden], where a layer's part is contiguous. Returns 0, or OUT_OF_MEMORY
   (with the states and logits untouched) when its buffers could not be allocated. */
int rwkv4_forward(const Model *m, const int64_t *ids, int sequences, int tokens, float *const *states, float *logits,
                  int all_logits, int threads) {
    int n = m->hidden, wide_n = m->intermediate, layers = m->layers, total = sequences * tokens;
    int per = all_logits ? tokens : 1, count = sequences * per; /* the rows whose logits are wanted */
    size_t rows = (size_t)padded(total), per_sequence = (size_t)5 * layers * n;
    int widest = wide_n > n ? wide_n : n;
    int head_padded = padded(count) != count; /* the head's output, padded to whole groups of TOKENS rows, then trimmed */
    size_t buffer_bytes = aligned(sizeof(float) * rows * (9 * n + wide_n)),
           by_layer_bytes = aligned(sizeof(float) * sequences * per_sequence),
           head_bytes = head_padded ? aligned(sizeof(float) * padded(count) * m->vocab) : 0,
           first_bytes = quantized_bytes(total, widest), other_bytes = quantized_bytes(1, widest);
    Workspace *w = workspace(buffer_bytes + by_layer_bytes + head_bytes + first_bytes + 2 * other_bytes);
    if (!w) return OUT_OF_MEMORY;
    uint8_t *memory = w->memory;
    float *buffer = (float *)memory, *by_layer = (float *)(memory + buffer_bytes),
          *head_out = head_padded ? (float *)(memory + buffer_bytes + by_layer_bytes) : logits;
    uint8_t *quantized = memory + buffer_bytes + by_layer_bytes + head_bytes;
    Quantized q[MAX_PRODUCTS] = {quantized_in(quantized, total, widest), quantized_in(quantized + first_bytes, 1, widest),
                                 quantized_in(quantized + first_bytes + other_bytes, 1, widest)};
    float *x = buffer, *normed = x + rows * n, *key = normed + rows * n, *value = key + rows * n,
          *receptance = value + rows * n, *out = receptance + rows * n, *wide = out + rows * n,
          *mixed[3] = {wide + rows * wide_n, wide + rows * (wide_n + n), wide + rows * (wide_n + 2 * n)};

    for (int t = 0; t < total; t++) {
        float *row = x + (size_t)t * n;
        for (int i = 0; i < n; i++) row[i] = _cvtsh_ss(m->embeddings[(size_t)ids[t] * n + i]);
        layer_norm(row, m->ln0_weight, m->ln0_bias, n, m->eps, row);
    }
    for (int s = 0; s < sequences; s++)
        for (int k = 0; k < 5; k++)
            to_layer_rows(states[5 * s + k], n, layers, by_layer + s * per_sequence + (size_t)k * layers * n);
    for (int l = 0; l < layers; l++) {
        const Layer *layer = &m->layer[l];
        float *state_of[5]; /* sequence s's rows: state_of[k] + s * per_sequence */
        for (int k = 0; k < 5; k++) state_of[k] = by_layer + ((size_t)k * layers + l) * n;
        /* time mixing */
        norm_and_shift(x, sequences, tokens, n, m->eps, layer->ln1_weight, layer->ln1_bias, layer->attention_mix, 3,
                       state_of[1], per_sequence, normed, mixed, threads);
        Product attention[3] = {{layer->attention_key, n, n, mixed[0], key},
                                {layer->attention_value, n, n, mixed[1], value},
                                {layer->attention_receptance, n, n, mixed[2], receptance}};
        products(attention, 3, total, m->format, threads, q);
#pragma omp parallel for num_threads(threads) if (total > 1) collapse(2)
        for (int s = 0; s < sequences; s++)
            for (int c = 0; c < n; c += 8) {
                size_t first = (size_t)s * tokens * n, own = s * per_sequence;
                wkv8(layer, c, tokens, n, key + first, value + first, receptance + first, mixed[0] + first,
                      state_of[2] + own, state_of[3] + own, state_of[4] + own);
            }
        Product attention_output = {layer->attention_output, n, n, mixed[0], out};
        products(&attention_output, 1, total, m->format, threads, q);
        for (size_t at = 0; at < (size_t)total * n; at++) x[at] += out[at] * layer->output_scale;
        /* channel mixing */
        norm_and_shift(x, sequences, tokens, n, m->eps, layer->ln2_weight, layer->ln2_bias, layer->feed_forward_mix, 2,
                       state_of[0], per_sequence, normed, mixed, threads);
        Product feed_forward[2] = {{layer->feed_forward_key, wide_n, n, mixed[0], wide},
                                   {layer->feed_forward_receptance, n, n, mixed[1], receptance}};
        products(feed_forward, 2, total, m->format, threads, q);
        for (size_t at = 0; at < (size_t)total * wide_n; at++) {
            float k = wide[at] > 0.0f ? wide[at] : 0.0f;
            wide[at] = k * k;
        }
        Product feed_forward_value = {layer->feed_forward_value, n, wide_n, wide, out};
        products(&feed_forward_value, 1, total, m->format, threads, q);
        __m256 scale = _mm256_set1_ps(layer->output_scale);
        for (size_t at = 0; at < (size_t)total * n; at += 8) /* n % 64 == 0 */
            _mm256_storeu_ps(x + at, _mm256_fmadd_ps(_mm256_mul_ps(sigmoid8(_mm256_loadu_ps(receptance + at)),
                                                                   _mm256_loadu_ps(out + at)), scale, _mm256_loadu_ps(x + at)));
        if (m->rescale_every > 0 && (l + 1) % m->rescale_every == 0)
            for (size_t at = 0; at < (size_t)total * n; at++) x[at] *= 0.5f;
    }
    /* the rows whose logits are wanted: every token, or each sequence's last */
    for (int s = 0; s < sequences; s++)
        for (int t = tokens - per; t < tokens; t++)
            layer_norm(x + ((size_t)s * tokens + t) * n, m->ln_out_weight, m->ln_out_bias, n, m->eps,
                       normed + ((size_t)s * per + t - (tokens - per)) * n);
    Product head = {m->head, m->vocab, n, normed, head_out};
    products(&head, 1, count, m->head_format, threads, q);
    if (head_padded) memcpy(logits, head_out, sizeof(float) * count * m->vocab);
    for (int s = 0; s < sequences; s++)
        for (int k = 0; k < 5; k++)
            from_layer_rows(by_layer + s * per_sequence + (size_t)k * layers * n, n, layers, states[5 * s + k]);
    done_with(w);
    return 0;
}
