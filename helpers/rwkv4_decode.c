/* One RWKV-4 decoding step (one token, batch 1) on bigdl-llm's sym_int4 weights, in one call.

   Weights stay where bigdl keeps them. A sym_int4 row is a run of 34-byte blocks: an fp16 scale,
   then 32 bytes holding 64 weights as nibbles (byte j: low nibble = weight j, high = weight j + 32),
   each weight = (nibble - 8) * scale. The input vector is quantized to int8 per 64 values (as
   bigdl does), so a block's dot product is one AVX-512 VNNI instruction. Everything else (layer
   norms, token shift, WKV, channel mix) runs here too: a token is one call from Python instead of
   hundreds of small tensor operations. Needs AVX-512 VNNI (Intel Ice Lake / AMD Zen 4 or newer). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef __AVX512VNNI__
#error "rwkv4_decode.c needs AVX-512 VNNI"
#endif

#define BLOCK 64
#define BLOCK_BYTES 34
#define ROWS 4        /* rows computed together, sharing the loads of the input */
#define MAX_COLS 16384

typedef struct {
    int8_t values[MAX_COLS];
    float scales[MAX_COLS / BLOCK];
    int32_t offsets[MAX_COLS / BLOCK]; /* -8 * sum of the block's values: the nibbles' zero point */
} QuantizedVector;

static void quantize(const float *x, int cols, QuantizedVector *q) {
    for (int b = 0; b < cols / BLOCK; b++) {
        const float *block = x + b * BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(block[i]));
        float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < BLOCK; i++) {
            int8_t value = (int8_t)lrintf(block[i] * inverse);
            q->values[b * BLOCK + i] = value;
            sum += value;
        }
        q->scales[b] = amax / 127.0f;
        q->offsets[b] = -8 * sum;
    }
}

/* The 64 weights of a block as bytes 0..15, in the order of the input's values. */
static inline __m512i unpack_block(const uint8_t *block) {
    __m512i packed = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(block + 2)));
#ifdef __GFNI__
    /* one bit-matrix op per byte: low nibble in the lower half, high nibble in the upper half */
    const __m512i nibble = _mm512_set_epi64(0x1020408000000000LL, 0x1020408000000000LL, 0x1020408000000000LL,
                                            0x1020408000000000LL, 0x0102040800000000LL, 0x0102040800000000LL,
                                            0x0102040800000000LL, 0x0102040800000000LL);
    return _mm512_gf2p8affine_epi64_epi8(packed, nibble, 0);
#else
    const __m512i upper_half_by_4 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    return _mm512_and_si512(_mm512_srlv_epi16(packed, upper_half_by_4), _mm512_set1_epi8(0x0f));
#endif
}

/* out[0..ROWS) = dot products of ROWS consecutive rows with q. Blocks go in chunks of 16, whose
   16 fp16 scales per row are gathered and converted at once; the next rows are prefetched. */
static void rows_dot(const uint8_t *first_row, size_t row_bytes, const QuantizedVector *q, int blocks, float *out) {
    const __m512i block_starts = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(BLOCK_BYTES));
    __m512 acc[ROWS];
    float scales[ROWS][16];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int chunk = 0; chunk < blocks; chunk += 16) {
        int count = blocks - chunk < 16 ? blocks - chunk : 16;
        __mmask16 mask = (__mmask16)((1u << count) - 1);
        __m512 x_scales = _mm512_maskz_loadu_ps(mask, q->scales + chunk);
        for (int r = 0; r < ROWS; r++) {
            const uint8_t *base = first_row + r * row_bytes + chunk * BLOCK_BYTES;
            __m512i raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, block_starts, base, 1);
            _mm512_storeu_ps(scales[r], _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw)), x_scales));
        }
        for (int i = 0; i < count; i++) {
            int b = chunk + i;
            __m512i x = _mm512_loadu_si512(q->values + b * BLOCK);
            __m512i offset = _mm512_castsi128_si512(_mm_cvtsi32_si128(q->offsets[b]));
            for (int r = 0; r < ROWS; r++) {
                const uint8_t *block = first_row + r * row_bytes + b * BLOCK_BYTES;
                _mm_prefetch((const char *)block + ROWS * row_bytes, _MM_HINT_T0);
                __m512i sums = _mm512_dpbusd_epi32(offset, unpack_block(block), x);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scales[r][i]), acc[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* y[rows] = W x, W a sym_int4 [rows, cols] matrix (rows % ROWS == 0); rows shared among threads. */
static void matvec(const uint8_t *weight, int rows, int cols, const float *x, float *y, int threads,
                   QuantizedVector *q) {
    int blocks = cols / BLOCK;
    size_t row_bytes = (size_t)blocks * BLOCK_BYTES;
    quantize(x, cols, q);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r += ROWS) rows_dot(weight + r * row_bytes, row_bytes, q, blocks, y + r);
}

/* Exposed for tests: y = W x through the decoder's kernel. */
void rwkv4_matvec(const uint8_t *weight, int rows, int cols, const float *x, float *y, int threads) {
    QuantizedVector *q = malloc(sizeof *q);
    matvec(weight, rows, cols, x, y, threads, q);
    free(q);
}

typedef struct {
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    const float *attention_mix; /* [3][hidden]: key, value, receptance */
    const float *time_first, *decay;
    const uint8_t *attention_key, *attention_value, *attention_receptance, *attention_output;
    const float *feed_forward_mix; /* [2][hidden]: key, receptance */
    const uint8_t *feed_forward_key, *feed_forward_receptance, *feed_forward_value;
    float output_scale;
} Layer;

typedef struct {
    int layers, hidden, intermediate, vocab, rescale_every;
    float eps;
    const uint16_t *embeddings; /* fp16 [vocab][hidden] */
    const float *ln0_weight, *ln0_bias, *ln_out_weight, *ln_out_bias;
    const uint8_t *head;
    const Layer *layer;
} Model;

static void layer_norm(const float *x, const float *weight, const float *bias, int n, float eps, float *out) {
    float mean = 0.0f, variance = 0.0f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) variance += (x[i] - mean) * (x[i] - mean);
    float inverse = 1.0f / sqrtf(variance / n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * inverse * weight[i] + bias[i];
}

/* out = previous + (current - previous) * mix, the token shift; previous = state column l. */
static void shift_mix(const float *current, const float *state, int layers, int l, const float *mix, int n,
                      float *out) {
    for (int i = 0; i < n; i++) {
        float previous = state[i * layers + l];
        out[i] = previous + (current[i] - previous) * mix[i];
    }
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The state is transformers' list of five [1, hidden, layers] tensors: feed-forward shift,
   attention shift, WKV numerator, denominator and running maximum. Returns 0, or -1 when the
   model is wider than MAX_COLS. */
int rwkv4_decode(const Model *m, int token, float *const state[5], float *logits, int threads) {
    int n = m->hidden, layers = m->layers;
    if (m->intermediate > MAX_COLS || n > MAX_COLS) return -1;
    float *buffer = malloc(sizeof(float) * (size_t)(7 * n + 2 * m->intermediate));
    QuantizedVector *quantized = malloc(sizeof *quantized);
    float *x = buffer, *normed = x + n, *mixed = normed + n, *key = mixed + n, *value = key + n,
          *receptance = value + n, *out = receptance + n, *wide = out + n, *wide_mixed = wide + m->intermediate;
    float *ffn_shift = state[0], *att_shift = state[1], *num = state[2], *den = state[3], *max_state = state[4];

    for (int i = 0; i < n; i++) x[i] = _cvtsh_ss(m->embeddings[(size_t)token * n + i]);
    layer_norm(x, m->ln0_weight, m->ln0_bias, n, m->eps, x);
    for (int l = 0; l < layers; l++) {
        const Layer *layer = &m->layer[l];
        /* time mixing */
        layer_norm(x, layer->ln1_weight, layer->ln1_bias, n, m->eps, normed);
        shift_mix(normed, att_shift, layers, l, layer->attention_mix, n, mixed);
        matvec(layer->attention_key, n, n, mixed, key, threads, quantized);
        shift_mix(normed, att_shift, layers, l, layer->attention_mix + n, n, mixed);
        matvec(layer->attention_value, n, n, mixed, value, threads, quantized);
        shift_mix(normed, att_shift, layers, l, layer->attention_mix + 2 * n, n, mixed);
        matvec(layer->attention_receptance, n, n, mixed, receptance, threads, quantized);
        for (int i = 0; i < n; i++) {
            size_t s = (size_t)i * layers + l;
            float k = key[i], v = value[i], with_bonus = layer->time_first[i] + k;
            float top = fmaxf(max_state[s], with_bonus);
            float e1 = expf(max_state[s] - top), e2 = expf(with_bonus - top);
            mixed[i] = sigmoid(receptance[i]) * (e1 * num[s] + e2 * v) / (e1 * den[s] + e2);
            float decayed = max_state[s] + layer->decay[i];
            top = fmaxf(decayed, k);
            e1 = expf(decayed - top);
            e2 = expf(k - top);
            num[s] = e1 * num[s] + e2 * v;
            den[s] = e1 * den[s] + e2;
            max_state[s] = top;
            att_shift[s] = normed[i];
        }
        matvec(layer->attention_output, n, n, mixed, out, threads, quantized);
        for (int i = 0; i < n; i++) x[i] += out[i] * layer->output_scale;
        /* channel mixing */
        layer_norm(x, layer->ln2_weight, layer->ln2_bias, n, m->eps, normed);
        shift_mix(normed, ffn_shift, layers, l, layer->feed_forward_mix, n, mixed);
        matvec(layer->feed_forward_key, m->intermediate, n, mixed, wide, threads, quantized);
        for (int i = 0; i < m->intermediate; i++) {
            float k = wide[i] > 0.0f ? wide[i] : 0.0f;
            wide_mixed[i] = k * k;
        }
        shift_mix(normed, ffn_shift, layers, l, layer->feed_forward_mix + n, n, mixed);
        matvec(layer->feed_forward_receptance, n, n, mixed, receptance, threads, quantized);
        matvec(layer->feed_forward_value, n, m->intermediate, wide_mixed, out, threads, quantized);
        for (int i = 0; i < n; i++) {
            x[i] += sigmoid(receptance[i]) * out[i] * layer->output_scale;
            ffn_shift[(size_t)i * layers + l] = normed[i];
        }
        if (m->rescale_every > 0 && (l + 1) % m->rescale_every == 0)
            for (int i = 0; i < n; i++) x[i] *= 0.5f;
    }
    layer_norm(x, m->ln_out_weight, m->ln_out_bias, n, m->eps, normed);
    matvec(m->head, m->vocab, n, normed, logits, threads, quantized);
    free(quantized);
    free(buffer);
    return 0;
}
