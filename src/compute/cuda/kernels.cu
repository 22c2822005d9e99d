// mlxd's fused CUDA kernels: each replaces a chain of small candle ops with one launch, and
// the attention kernel reads K/V where the paged cache keeps them (no gathered copy).
//
// Every kernel comes in f32, f16 and bf16 (`<name>_f32` ...); arithmetic is in f32 and each
// output is rounded to the storage type once.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------
// qkv_store: for every token, per head: + bias, optional RMSNorm over the head (q_norm /
// k_norm), rotary embedding at the token's position; q goes to `q_out` [T, hq, d], k and v
// to the token's KV slot. One warp per (token, q or kv head); blocks of 4 warps.
// Rope: `neox` pairs (i, i + rotary_dim/2); `interleaved` pairs (2i, 2i+1); dims past
// rotary_dim pass through. Tables are [max_pos, rotary_dim/2].
#define STORE_WARPS 4
#define MAX_HEAD_DIM 256

template <typename T>
__device__ void qkv_store(const T *q, const T *k, const T *v, uint32_t q_stride, uint32_t k_stride,
                          uint32_t v_stride, const T *bias, const float *q_norm,
                          const float *k_norm, float eps, const T *cos_table,
                          const T *sin_table, const uint32_t *positions, const uint32_t *slots,
                          T *q_out, T *k_cache, T *v_cache, uint32_t num_tokens, uint32_t hq,
                          uint32_t hkv, uint32_t d, uint32_t rotary_dim, uint32_t interleaved) {
  __shared__ float buf[STORE_WARPS][MAX_HEAD_DIM];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t item = blockIdx.x * STORE_WARPS + warp;
  if (item >= num_tokens * (hq + hkv)) return;
  const uint32_t t = item / (hq + hkv), h = item % (hq + hkv);
  const bool is_q = h < hq;
  const uint32_t kh = h - hq;
  const T *src = is_q ? q + (size_t)t * q_stride + h * d : k + (size_t)t * k_stride + kh * d;
  const T *b = bias == nullptr ? nullptr : (is_q ? bias + h * d : bias + hq * d + kh * d);
  const float *norm = is_q ? q_norm : k_norm;
  float *x = buf[warp];
  float sumsq = 0.f;
  for (uint32_t i = lane; i < d; i += 32) {
    float val = to_f(src[i]);
    if (b != nullptr) val += to_f(b[i]);
    x[i] = val;
    sumsq += val * val;
  }
  if (norm != nullptr) {
    const float r = rsqrtf(warp_sum(sumsq) / (float)d + eps);
    for (uint32_t i = lane; i < d; i += 32) x[i] = x[i] * r * norm[i];
  }
  __syncwarp();
  const uint32_t pos = positions[t], half = rotary_dim / 2;
  const size_t slot_base = (size_t)slots[t] * hkv * d + kh * d;
  T *dst = is_q ? q_out + ((size_t)t * hq + h) * d : k_cache + slot_base;
  for (uint32_t i = lane; i < d; i += 32) {
    float out = x[i];
    if (i < rotary_dim) {
      uint32_t pair;
      float partner, sign;
      if (interleaved) {
        pair = i / 2;
        partner = x[i ^ 1u];
        sign = (i % 2 == 0) ? -1.f : 1.f;
      } else {
        pair = i % half;
        partner = i < half ? x[i + half] : x[i - half];
        sign = i < half ? -1.f : 1.f;
      }
      const float c = to_f(cos_table[(size_t)pos * half + pair]);
      const float s = to_f(sin_table[(size_t)pos * half + pair]);
      out = x[i] * c + sign * partner * s;
    }
    dst[i] = from_f<T>(out);
  }
  if (!is_q) {
    const T *vs = v + (size_t)t * v_stride + kh * d;
    const T *vb = bias == nullptr ? nullptr : bias + (hq + hkv) * d + kh * d;
    for (uint32_t i = lane; i < d; i += 32) {
      float val = to_f(vs[i]);
      if (vb != nullptr) val += to_f(vb[i]);
      v_cache[slot_base + i] = from_f<T>(val);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// paged_attention: causal attention of every query row of the step over its sequence's
// context, reading K/V from the cache slots listed in `ctx_slots` (in place, no gathered copy).
// One block per (tile, head group, split): a tile is up to `16 / heads_per_block` consecutive
// tokens of one sequence, `tiles[4*i..]` = {first token row, tokens, offset of the sequence in
// ctx_slots, position of the first token}; a head group is `heads_per_block` query heads that
// share one KV head. Each of the 4 warps owns up to 4 (token, head) rows; K/V tiles of `kt`
// keys are staged in shared memory as f32 and shared by all rows (online softmax).
// With `splits` > 1 (few blocks: flash-decoding), block z takes the z-th of `splits` equal
// chunks of the tile's key range and writes its unnormalized partial {acc[d], max, sum} per row
// to `partial` [splits, T * hq, d + 2]; attention_combine merges them.
#define ATT_WARPS 4
#define ROWS_PER_WARP 4
#define MAX_ROWS (ATT_WARPS * ROWS_PER_WARP)
#define PER_LANE (MAX_HEAD_DIM / 32)
#define LOAD_UNROLL 4

// Stages keys/values `first .. first + n` of a context into shared memory as f32, with 16-byte
// loads issued LOAD_UNROLL at a time so their latencies overlap.
template <typename T>
__device__ __forceinline__ void load_kv_tile(const T *k_cache, const T *v_cache,
                                             const uint32_t *ctx_slots, uint32_t first, uint32_t n,
                                             uint32_t d, size_t kv_width, uint32_t kvh, float *k_s,
                                             float *v_s) {
  constexpr uint32_t VEC = 16 / sizeof(T);
  if (d % VEC != 0) {
    for (uint32_t idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
      const uint32_t j = idx / d, i = idx % d;
      const size_t at = (size_t)ctx_slots[first + j] * kv_width + (size_t)kvh * d + i;
      k_s[j * (d + 1) + i] = to_f(k_cache[at]);
      v_s[j * (d + 1) + i] = to_f(v_cache[at]);
    }
    return;
  }
  const uint32_t per_row = d / VEC, total = n * per_row;
  for (uint32_t base = 0; base < total; base += blockDim.x * LOAD_UNROLL) {
    uint4 kb[LOAD_UNROLL], vb[LOAD_UNROLL];
#pragma unroll
    for (int u = 0; u < LOAD_UNROLL; ++u) {
      const uint32_t c = base + u * blockDim.x + threadIdx.x;
      if (c < total) {
        const uint32_t j = c / per_row, i = (c % per_row) * VEC;
        const size_t at = (size_t)ctx_slots[first + j] * kv_width + (size_t)kvh * d + i;
        kb[u] = *reinterpret_cast<const uint4 *>(k_cache + at);
        vb[u] = *reinterpret_cast<const uint4 *>(v_cache + at);
      }
    }
#pragma unroll
    for (int u = 0; u < LOAD_UNROLL; ++u) {
      const uint32_t c = base + u * blockDim.x + threadIdx.x;
      if (c < total) {
        const uint32_t j = c / per_row, i = (c % per_row) * VEC;
        const T *kv = reinterpret_cast<const T *>(&kb[u]);
        const T *vv = reinterpret_cast<const T *>(&vb[u]);
#pragma unroll
        for (uint32_t e = 0; e < VEC; ++e) {
          k_s[j * (d + 1) + i + e] = to_f(kv[e]);
          v_s[j * (d + 1) + i + e] = to_f(vv[e]);
        }
      }
    }
  }
}

template <typename T>
__device__ void paged_attention(const T *q, const T *k_cache, const T *v_cache,
                                const uint32_t *ctx_slots, const uint32_t *tiles, T *out,
                                float *partial, uint32_t num_tokens, uint32_t hq, uint32_t hkv,
                                uint32_t d, uint32_t heads_per_block, uint32_t kt,
                                uint32_t splits, float scale, float softcap, uint32_t window,
                                const float *sinks) {
  extern __shared__ float smem[];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t n_rep = hq / hkv;
  const uint32_t *tile = tiles + 4 * blockIdx.x;
  const uint32_t t0 = tile[0], nq = tile[1], ctx = tile[2], p0 = tile[3];
  const uint32_t head0 = blockIdx.y * heads_per_block;
  const uint32_t kvh = head0 / n_rep;
  const uint32_t rows = nq * heads_per_block;
  const size_t kv_width = (size_t)hkv * d;
  float *q_s = smem;
  float *k_s = q_s + MAX_ROWS * d;
  float *v_s = k_s + kt * (d + 1);

  // Row r: token t0 + r / heads_per_block, head head0 + r % heads_per_block.
#pragma unroll 4
  for (uint32_t idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
    const uint32_t r = idx / d, i = idx % d;
    const uint32_t tok = t0 + r / heads_per_block, head = head0 + r % heads_per_block;
    q_s[r * d + i] = to_f(q[((size_t)tok * hq + head) * d + i]) * scale;
  }

  float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][PER_LANE];
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
    // A sink (one logit per head, a key without a value) joins the first split's softmax.
    const uint32_t r = warp + rr * ATT_WARPS;
    if (sinks != nullptr && blockIdx.z == 0 && r < rows) {
      m[rr] = sinks[head0 + r % heads_per_block];
      l[rr] = 1.f;
    }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[rr][e] = 0.f;
  }

  const uint32_t key_hi = p0 + nq - 1;
  // Key tiles start at a multiple of kt (a window's first tile then holds some keys every row
  // masks), so without splits a row's tiles, and its sums, are the same whichever rows share
  // its block: the batch-invariant mode relies on it.
  const uint32_t window_lo = (window != 0 && p0 + 1 > window) ? p0 + 1 - window : 0;
  const uint32_t key_lo = window_lo - window_lo % kt;
  const uint32_t chunk = (key_hi + 1 - key_lo + splits - 1) / splits;
  const uint32_t chunk_lo = key_lo + blockIdx.z * chunk;
  const uint32_t chunk_end = min(key_hi + 1, chunk_lo + chunk);
  for (uint32_t k0 = chunk_lo; k0 < chunk_end; k0 += kt) {
    const uint32_t n = min(kt, chunk_end - k0);
    __syncthreads();
    load_kv_tile(k_cache, v_cache, ctx_slots, ctx + k0, n, d, kv_width, kvh, k_s, v_s);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
      const uint32_t r = warp + rr * ATT_WARPS;
      if (r >= rows) continue;
      const uint32_t p = p0 + r / heads_per_block;
      const uint32_t lo = (window != 0 && p + 1 > window) ? p + 1 - window : 0;
      const float *qr = q_s + r * d;
      float s[2];
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const uint32_t jj = lane + 32 * c, key = k0 + jj;
        float score = -INFINITY;
        if (jj < n && key >= lo && key <= p) {
          const float *kr = k_s + jj * (d + 1);
          float dot = 0.f;
          for (uint32_t i = 0; i < d; ++i) dot += qr[i] * kr[i];
          if (softcap > 0.f) dot = softcap * tanhf(dot / softcap);
          score = dot;
        }
        s[c] = score;
        tile_max = fmaxf(tile_max, score);
      }
      tile_max = warp_max(tile_max);
      if (tile_max == -INFINITY) continue;
      const float m_new = fmaxf(m[rr], tile_max);
      const float alpha = expf(m[rr] - m_new);
      float psum = 0.f;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        s[c] = s[c] == -INFINITY ? 0.f : expf(s[c] - m_new);
        psum += s[c];
      }
      l[rr] = l[rr] * alpha + warp_sum(psum);
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) acc[rr][e] *= alpha;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        for (uint32_t src = 0; src < 32 && 32 * c + src < n; ++src) {
          const float pj = __shfl_sync(FULL_MASK, s[c], src);
          if (pj == 0.f) continue;
          const float *vr = v_s + (32 * c + src) * (d + 1);
#pragma unroll
          for (int e = 0; e < PER_LANE; ++e) {
            const uint32_t i = lane + 32 * e;
            if (i < d) acc[rr][e] += pj * vr[i];
          }
        }
      }
      m[rr] = m_new;
    }
  }

#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const uint32_t r = warp + rr * ATT_WARPS;
    if (r >= rows) continue;
    const uint32_t tok = t0 + r / heads_per_block, head = head0 + r % heads_per_block;
    if (splits > 1) {
      float *part = partial + (((size_t)blockIdx.z * num_tokens + tok) * hq + head) * (d + 2);
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) {
        const uint32_t i = lane + 32 * e;
        if (i < d) part[i] = acc[rr][e];
      }
      if (lane == 0) {
        part[d] = m[rr];
        part[d + 1] = l[rr];
      }
      continue;
    }
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    T *o = out + ((size_t)tok * hq + head) * d;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
      const uint32_t i = lane + 32 * e;
      if (i < d) o[i] = from_f<T>(acc[rr][e] * inv);
    }
  }
}

// attention_combine: merges the `splits` (at most MAX_SPLITS) partial results of every
// (token, head) row of paged_attention (one warp per row) into the normalized output
// [T, hq * d]: each lane weighs its splits, the weights go through shared memory, and the
// loads of different splits' values are independent so they overlap.
#define MAX_SPLITS 32
#define COMBINE_WARPS 4

template <typename T>
__device__ void attention_combine(const float *partial, T *out, uint32_t rows, uint32_t d,
                                  uint32_t splits) {
  __shared__ float weights[COMBINE_WARPS][MAX_SPLITS];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t row = blockIdx.x * COMBINE_WARPS + warp;
  if (row >= rows) return;
  const float *base = partial + (size_t)row * (d + 2);
  const size_t split_stride = (size_t)rows * (d + 2);
  const float m_own = lane < splits ? base[lane * split_stride + d] : -INFINITY;
  const float m_max = warp_max(m_own);
  const float w = m_own == -INFINITY ? 0.f : expf(m_own - m_max);
  const float l = warp_sum(lane < splits ? w * base[lane * split_stride + d + 1] : 0.f);
  weights[warp][lane] = w;
  __syncwarp();
  float acc[PER_LANE];
#pragma unroll
  for (int e = 0; e < PER_LANE; ++e) acc[e] = 0.f;
#pragma unroll 4
  for (uint32_t s = 0; s < splits; ++s) {
    const float ws = weights[warp][s];
    const float *part = base + s * split_stride;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
      const uint32_t i = lane + 32 * e;
      if (i < d) acc[e] += ws * part[i];
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int e = 0; e < PER_LANE; ++e) {
    const uint32_t i = lane + 32 * e;
    if (i < d) out[(size_t)row * d + i] = from_f<T>(acc[e] * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// add_rms_norm: `sum = x + delta` (rounded to T, written to `sum_out`; skipped when delta is
// null) and `y = sum / rms(sum) * w`, one block per row.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *delta, const float *w, T *sum_out, T *y,
                             uint32_t cols, float eps) {
  __shared__ float partial[32];
  const size_t row = blockIdx.x;
  const T *xr = x + row * cols;
  const T *dr = delta == nullptr ? nullptr : delta + row * cols;
  float sumsq = 0.f;
  for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
    float val = to_f(xr[i]);
    if (dr != nullptr) {
      const T rounded = from_f<T>(val + to_f(dr[i]));
      sum_out[row * cols + i] = rounded;
      val = to_f(rounded);
    }
    sumsq += val * val;
  }
  sumsq = warp_sum(sumsq);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = sumsq;
  __syncthreads();
  if (warp == 0) {
    float total = lane < (blockDim.x + 31) / 32 ? partial[lane] : 0.f;
    total = warp_sum(total);
    if (lane == 0) partial[0] = total;
  }
  __syncthreads();
  const float r = rsqrtf(partial[0] / (float)cols + eps);
  const T *src = dr != nullptr ? sum_out + row * cols : xr;
  for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
    y[row * cols + i] = from_f<T>(to_f(src[i]) * r * w[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// gated_act: `act(gate) * up` for a gated MLP; gate and up are rows of `cols` values with
// their own row strides (views into one fused gate_up projection, or two tensors).
// act: 0 = silu, 1 = gelu (tanh approximation).
template <typename T>
__device__ void gated_act(const T *gate, const T *up, T *out, uint32_t rows, uint32_t cols,
                          uint32_t gate_stride, uint32_t up_stride, uint32_t act) {
  const size_t n = (size_t)rows * cols;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (size_t)gridDim.x * blockDim.x) {
    const size_t r = idx / cols, c = idx % cols;
    const float g = to_f(gate[r * gate_stride + c]);
    const float u = to_f(up[r * up_stride + c]);
    float a;
    if (act == 0) {
      a = g / (1.f + expf(-g));
    } else {
      const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      a = 0.5f * g * (1.f + tanhf(inner));
    }
    out[idx] = from_f<T>(a * u);
  }
}

// ---------------------------------------------------------------------------------------------
// sample_rows: the next token of each row of `logits` [S, vocab] (f32, adjusted in place), one
// block of SAMPLE_THREADS per row, so only ids and requested logprobs leave the device.
//   params_f [S, 6] = {temperature, top_p, min_p, uniform draw in [0, 1), repetition penalty, -}
//   params_u [S, 5] = {top_k (0: none), logprobs + 1 (0: none), first adjustment, adjustments,
//                      row of `masks` (0xffffffff: unconstrained)}
//   masks [M, mask_words]: tokens an output constraint allows (bit t % 32 of word t / 32)
//   adj_tokens [A], adj_values [A, 2] = {1: apply the repetition penalty, value to add}
//   saved [A]: scratch for the raw logits the adjustments overwrite
//   out_ids / out_lp [S, 1 + MAX_TOP]: the token (and its raw logprob), then the top-n raw
//   logprobs (ties to the lower id).
// Temperature <= 0 takes the argmax. Otherwise the kept set is {scaled >= tau}: tau is the
// largest of max - NEGLIGIBLE_GAP, the top_k-th largest value, the top_p nucleus bound (both
// found exactly by find_threshold over order-preserving integer keys of the floats) and
// max + ln(min_p); the token is the first in id order whose cumulative mass exceeds
// uniform * (kept mass). Deterministic: fixed reduction orders and integer histograms.
#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define MAX_TOP 20
#define NEGLIGIBLE_GAP 30.f

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Block-wide reduction with `op` (a sum or a max); every thread gets the result. `scratch`
// holds SAMPLE_WARPS values.
template <typename Op>
__device__ float block_reduce(float v, float *scratch, Op op, float identity) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float result = identity;
  for (int w = 0; w < SAMPLE_WARPS; ++w) result = op(result, scratch[w]);
  return result;
}

__device__ float block_sum(float v, float *scratch) {
  return block_reduce(v, scratch, [](float a, float b) { return a + b; }, 0.f);
}

__device__ float block_max(float v, float *scratch) {
  return block_reduce(v, scratch, [](float a, float b) { return fmaxf(a, b); }, -INFINITY);
}

// The largest value and its lowest index.
__device__ void block_argmax(float v, uint32_t i, float *vals, uint32_t *idxs, float *best_v,
                             uint32_t *best_i) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, v, o);
    const uint32_t oi = __shfl_xor_sync(FULL_MASK, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    vals[warp] = v;
    idxs[warp] = i;
  }
  __syncthreads();
  float bv = vals[0];
  uint32_t bi = idxs[0];
  for (int w = 1; w < SAMPLE_WARPS; ++w) {
    if (vals[w] > bv || (vals[w] == bv && idxs[w] < bi)) {
      bv = vals[w];
      bi = idxs[w];
    }
  }
  *best_v = bv;
  *best_i = bi;
}

// Weight of a scaled logit in find_threshold: 1 (counting) or its mass exp(s - mx) in 2^32
// fixed point (integer sums are exact, so the result does not depend on thread order).
__device__ __forceinline__ unsigned long long threshold_weight(float s, float mx, bool mass) {
  return mass ? (unsigned long long)(expf(s - mx) * 4294967296.f) : 1ull;
}

// The largest key K in [lo, hi] whose weight W(K) (of every scaled logit with key >= K) is at
// least `target` (lo when even W(lo) falls short), by rounds of SAMPLE_THREADS-bin histograms
// over the remaining key range: 4-5 passes over the row instead of a 32-step bisection.
__device__ uint32_t find_threshold(const float *row, uint32_t vocab, float inv_t, float mx, bool mass,
                                   uint32_t lo, uint32_t hi, unsigned long long target,
                                   unsigned long long *hist, unsigned long long *pick) {
  unsigned long long above = 0;  // weight of the keys above the range
  while (lo < hi) {
    const unsigned long long span = (unsigned long long)(hi - lo) + 1;
    const unsigned long long width = (span + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t bins = (uint32_t)((span + width - 1) / width);
    hist[threadIdx.x] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
      const float s = row[i] * inv_t;
      const uint32_t k = order_key(s);
      if (k >= lo && k <= hi) atomicAdd(&hist[(k - lo) / width], threshold_weight(s, mx, mass));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = above;
      uint32_t b = bins - 1;
      for (; b > 0; --b) {
        if (acc + hist[b] >= target) break;
        acc += hist[b];
      }
      pick[0] = b;
      pick[1] = acc;
    }
    __syncthreads();
    const uint32_t b = (uint32_t)pick[0];
    above = pick[1];
    const unsigned long long new_lo = lo + b * width;
    hi = (uint32_t)min((unsigned long long)hi, new_lo + width - 1);
    lo = (uint32_t)new_lo;
    __syncthreads();
  }
  return lo;
}

__device__ void row_argmax(const float *row, uint32_t vocab, float *vals, uint32_t *idxs,
                           float *best_v, uint32_t *best_i) {
  float v = -INFINITY;
  uint32_t idx = 0xffffffffu;
  for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
    if (row[i] > v || idx == 0xffffffffu) {
      v = row[i];
      idx = i;
    }
  }
  block_argmax(v, idx, vals, idxs, best_v, best_i);
}

extern "C" __global__ void sample_rows(float *logits, uint32_t vocab, const float *params_f,
                                       const uint32_t *params_u, const uint32_t *adj_tokens,
                                       const float *adj_values, float *saved, const uint32_t *masks,
                                       uint32_t mask_words, uint32_t *out_ids, float *out_lp) {
  __shared__ float scratch[SAMPLE_WARPS];
  __shared__ uint32_t scratch_i[SAMPLE_WARPS];
  __shared__ float thread_mass[SAMPLE_THREADS];
  __shared__ uint32_t top_ids[MAX_TOP];
  __shared__ float top_vals[MAX_TOP];
  __shared__ uint32_t chosen_shared;
  __shared__ unsigned long long hist[SAMPLE_THREADS];
  __shared__ unsigned long long pick[2];
  const uint32_t row_id = blockIdx.x;
  float *row = logits + (size_t)row_id * vocab;
  const float *pf = params_f + row_id * 6;
  const uint32_t *pu = params_u + row_id * 5;
  const float temperature = pf[0], top_p = pf[1], min_p = pf[2], uniform = pf[3];
  const float rep_penalty = pf[4];
  const uint32_t top_k = pu[0], want_lp = pu[1], adj_first = pu[2], adj_count = pu[3];
  const uint32_t mask_row = pu[4];
  uint32_t *ids_out = out_ids + row_id * (1 + MAX_TOP);
  float *lp_out = out_lp + row_id * (1 + MAX_TOP);

  // 1) Logprobs of the raw logits: log Z, then the top n by repeated argmax.
  float log_z = 0.f;
  if (want_lp > 0) {
    float m = -INFINITY;
    for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) m = fmaxf(m, row[i]);
    m = block_max(m, scratch);
    float z = 0.f;
    for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) z += expf(row[i] - m);
    log_z = m + logf(block_sum(z, scratch));
    const uint32_t n = min(want_lp - 1, (uint32_t)MAX_TOP);
    for (uint32_t j = 0; j < n; ++j) {
      float v;
      uint32_t i;
      row_argmax(row, vocab, scratch, scratch_i, &v, &i);
      __syncthreads();
      if (threadIdx.x == 0) {
        top_ids[j] = i;
        top_vals[j] = v;
        ids_out[1 + j] = i;
        lp_out[1 + j] = v - log_z;
        row[i] = -INFINITY;
      }
      __syncthreads();
    }
    if (threadIdx.x < n) row[top_ids[threadIdx.x]] = top_vals[threadIdx.x];
    __syncthreads();
  }

  // 2) Penalties and bias, keeping the raw values.
  for (uint32_t j = threadIdx.x; j < adj_count; j += SAMPLE_THREADS) {
    const uint32_t a = adj_first + j, t = adj_tokens[a];
    float l = row[t];
    saved[a] = l;
    if (adj_values[2 * a] != 0.f) l = l > 0.f ? l / rep_penalty : l * rep_penalty;
    row[t] = l + adj_values[2 * a + 1];
  }
  __syncthreads();
  // 2b) The output constraint: tokens it does not allow can never be chosen.
  if (mask_row != 0xffffffffu) {
    const uint32_t *m = masks + (size_t)mask_row * mask_words;
    for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
      const uint32_t w = i / 32;
      if (w >= mask_words || ((m[w] >> (i % 32)) & 1u) == 0) row[i] = -INFINITY;
    }
  }
  __syncthreads();

  // 3) The token.
  float best_v;
  uint32_t best_i;
  row_argmax(row, vocab, scratch, scratch_i, &best_v, &best_i);
  uint32_t chosen = best_i;
  if (temperature > 0.f && best_v > -INFINITY) {
    const float inv_t = 1.f / temperature;
    const float mx = best_v * inv_t;
    float tau = mx - NEGLIGIBLE_GAP;
    if (top_k > 0) {
      const uint32_t k = find_threshold(row, vocab, inv_t, mx, false, order_key(tau), order_key(mx),
                                        top_k, hist, pick);
      tau = fmaxf(tau, key_value(k));
    }
    if (top_p < 1.f) {
      // The nucleus: the largest threshold whose mass reaches top_p of the mass kept so far.
      if (threadIdx.x == 0) pick[0] = 0;
      __syncthreads();
      unsigned long long z = 0;
      for (uint32_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        const float s = row[i] * inv_t;
        if (s >= tau) z += threshold_weight(s, mx, true);
      }
      atomicAdd(&pick[0], z);
      __syncthreads();
      const unsigned long long target = (unsigned long long)((double)top_p * (double)pick[0]);
      __syncthreads();
      const uint32_t k = find_threshold(row, vocab, inv_t, mx, true, order_key(tau), order_key(mx),
                                        target, hist, pick);
      tau = fmaxf(tau, key_value(k));
    }
    if (min_p > 0.f) tau = fmaxf(tau, mx + logf(min_p));
    // Each thread owns a contiguous range of ids; an exclusive scan of their masses finds the
    // range holding uniform * total, then its owner walks it.
    const uint32_t chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const uint32_t begin = min(threadIdx.x * chunk, vocab), end = min(begin + chunk, vocab);
    float own = 0.f;
    for (uint32_t i = begin; i < end; ++i) {
      const float s = row[i] * inv_t;
      own += s >= tau ? expf(s - mx) : 0.f;
    }
    thread_mass[threadIdx.x] = own;
    if (threadIdx.x == 0) chosen_shared = best_i;
    __syncthreads();
    if (threadIdx.x == 0) {
      float acc = 0.f;
      for (int t = 0; t < SAMPLE_THREADS; ++t) {
        const float m = thread_mass[t];
        thread_mass[t] = acc;
        acc += m;
      }
      scratch[0] = acc;
    }
    __syncthreads();
    const float r = uniform * scratch[0];
    float acc = thread_mass[threadIdx.x];
    if (own > 0.f && r >= acc && r < acc + own) {
      uint32_t pick = begin;
      for (uint32_t i = begin; i < end; ++i) {
        const float s = row[i] * inv_t;
        if (s < tau) continue;
        pick = i;
        acc += expf(s - mx);
        if (r < acc) break;
      }
      chosen_shared = pick;
    }
    __syncthreads();
    chosen = chosen_shared;
  }

  // 4) Out: the token, and its raw logprob.
  if (threadIdx.x == 0) {
    ids_out[0] = chosen;
    if (want_lp > 0) lp_out[0] = row[chosen] - log_z;
  }
  __syncthreads();
  for (uint32_t j = threadIdx.x; j < adj_count; j += SAMPLE_THREADS) {
    if (adj_tokens[adj_first + j] == chosen) lp_out[0] = saved[adj_first + j] - log_z;
  }
}

// ---------------------------------------------------------------------------------------------
// prefill_attention: causal attention of prefill tiles on the tensor cores (mma.sync m16n8k16:
// f16/bf16 operands, f32 accumulators) in FlashAttention-2's structure. One block of 4 warps per
// (tile of up to PF_ROWS consecutive tokens of one sequence, query head); each warp owns 16
// query rows, whose fragments it keeps in registers; K/V tiles of PF_KEYS keys are staged in
// shared memory as stored and shared by the warps; the online softmax runs in registers. Tiles:
// `tiles[4*i..]` as paged_attention's. For head dims that are multiples of 16 up to PF_MAX_D,
// without soft-capping or sinks (paged_attention takes those): a prefill query reads its
// context from shared memory at tensor-core speed instead of one dot product per lane.
#define PF_ROWS 64
#define PF_KEYS 64
#define PF_MAX_D 128
#define PF_PAD 8

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pair(T lo, T hi) {
  const uint16_t l = *reinterpret_cast<const uint16_t *>(&lo);
  const uint16_t h = *reinterpret_cast<const uint16_t *>(&hi);
  return (uint32_t)l | ((uint32_t)h << 16);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ void prefill_attention(const T *q, const T *k_cache, const T *v_cache,
                                  const uint32_t *ctx_slots, const uint32_t *tiles, T *out,
                                  uint32_t hq, uint32_t hkv, uint32_t d, float scale,
                                  uint32_t window) {
  extern __shared__ __align__(16) unsigned char pf_smem[];
  const uint32_t ld = d + PF_PAD;
  T *k_s = reinterpret_cast<T *>(pf_smem);
  T *v_s = k_s + PF_KEYS * ld;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t g = lane / 4, tig = lane % 4;
  const uint32_t *tile = tiles + 4 * blockIdx.x;
  const uint32_t t0 = tile[0], nq = tile[1], ctx = tile[2], p0 = tile[3];
  const uint32_t head = blockIdx.y, kvh = head / (hq / hkv);
  const size_t kv_width = (size_t)hkv * d;
  const uint32_t ksteps = d / 16, nblocks = d / 8;

  // This warp's 16 query rows as A fragments, one per 16 dims (zero beyond the tile).
  uint32_t qa[PF_MAX_D / 16][4];
  const uint32_t r_lo = warp * 16 + g, r_hi = r_lo + 8;
#pragma unroll
  for (uint32_t kk = 0; kk < PF_MAX_D / 16; ++kk) {
    if (kk >= ksteps) break;
#pragma unroll
    for (int part = 0; part < 4; ++part) {
      const uint32_t r = (part & 1) ? r_hi : r_lo;
      const uint32_t dim = kk * 16 + tig * 2 + ((part & 2) ? 8 : 0);
      qa[kk][part] = r < nq ? *reinterpret_cast<const uint32_t *>(q + ((size_t)(t0 + r) * hq + head) * d + dim)
                            : 0u;
    }
  }
  float o[PF_MAX_D / 8][4];
#pragma unroll
  for (uint32_t nb = 0; nb < PF_MAX_D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const uint32_t pos[2] = {p0 + r_lo, p0 + r_hi};
  uint32_t lo_key[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) lo_key[h] = (window != 0 && pos[h] + 1 > window) ? pos[h] + 1 - window : 0;

  const uint32_t key_hi = p0 + nq - 1;
  const uint32_t key_lo = (window != 0 && p0 + 1 > window) ? p0 + 1 - window : 0;
  constexpr uint32_t VEC = 16 / sizeof(T);
  const uint32_t chunks = d / VEC;
  for (uint32_t k0 = key_lo; k0 <= key_hi; k0 += PF_KEYS) {
    const uint32_t n = min((uint32_t)PF_KEYS, key_hi + 1 - k0);
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < PF_KEYS * chunks; c += blockDim.x) {
      const uint32_t j = c / chunks, i = (c % chunks) * VEC;
      uint4 kb = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
      if (j < n) {
        const size_t at = (size_t)ctx_slots[ctx + k0 + j] * kv_width + (size_t)kvh * d + i;
        kb = *reinterpret_cast<const uint4 *>(k_cache + at);
        vb = *reinterpret_cast<const uint4 *>(v_cache + at);
      }
      *reinterpret_cast<uint4 *>(k_s + j * ld + i) = kb;
      *reinterpret_cast<uint4 *>(v_s + j * ld + i) = vb;
    }
    __syncthreads();
    if (warp * 16 >= nq) continue;  // this warp has no rows in the tile (it still loads)

    // S = Q K^T for the tile's keys: s[j] covers keys j*8 .. j*8+7.
    float s[PF_KEYS / 8][4];
#pragma unroll
    for (uint32_t j = 0; j < PF_KEYS / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
      const T *kr = k_s + (j * 8 + g) * ld + tig * 2;
#pragma unroll
      for (uint32_t kk = 0; kk < PF_MAX_D / 16; ++kk) {
        if (kk >= ksteps) break;
        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(kr + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(kr + kk * 16 + 8);
        mma_16816<T>(s[j], qa[kk], b0, b1);
      }
    }
    // Scale and mask (causal, window, the tile's end); each half-row's max over the tile.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (uint32_t j = 0; j < PF_KEYS / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const uint32_t jj = j * 8 + tig * 2 + (e & 1), key = k0 + jj;
        const bool ok = jj < n && key <= pos[h] && key >= lo_key[h];
        s[j][e] = ok ? s[j][e] * scale : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[j][e]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(FULL_MASK, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(FULL_MASK, tile_max[h], 2));
      const float m_new = fmaxf(m[h], tile_max[h]);
      alpha[h] = m_new == -INFINITY ? 1.f : expf(m[h] - m_new);
      m[h] = m_new;
    }
    float psum[2] = {0.f, 0.f};
#pragma unroll
    for (uint32_t j = 0; j < PF_KEYS / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        s[j][e] = s[j][e] == -INFINITY ? 0.f : expf(s[j][e] - m[h]);
        psum[h] += s[j][e];
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      psum[h] += __shfl_xor_sync(FULL_MASK, psum[h], 1);
      psum[h] += __shfl_xor_sync(FULL_MASK, psum[h], 2);
      l[h] = l[h] * alpha[h] + psum[h];
    }
#pragma unroll
    for (uint32_t nb = 0; nb < PF_MAX_D / 8; ++nb) {
      o[nb][0] *= alpha[0];
      o[nb][1] *= alpha[0];
      o[nb][2] *= alpha[1];
      o[nb][3] *= alpha[1];
    }
    // O += P V: P's accumulators are the A fragments of 16 keys at a time.
#pragma unroll
    for (uint32_t ks = 0; ks < PF_KEYS / 16; ++ks) {
      const uint32_t pa[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                              pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                              pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      const T *v0 = v_s + (ks * 16 + tig * 2) * ld + g;
#pragma unroll
      for (uint32_t nb = 0; nb < PF_MAX_D / 8; ++nb) {
        if (nb >= nblocks) break;
        const T *vr = v0 + nb * 8;
        const uint32_t b0 = pair<T>(vr[0], vr[ld]);
        const uint32_t b1 = pair<T>(vr[8 * ld], vr[9 * ld]);
        mma_16816<T>(o[nb], pa, b0, b1);
      }
    }
  }

  // The normalized rows of this warp.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t r = h ? r_hi : r_lo;
    if (r >= nq) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    T *row = out + ((size_t)(t0 + r) * hq + head) * d + tig * 2;
#pragma unroll
    for (uint32_t nb = 0; nb < PF_MAX_D / 8; ++nb) {
      if (nb >= nblocks) break;
      *reinterpret_cast<uint32_t *>(row + nb * 8) = pack2<T>(o[nb][2 * h] * inv, o[nb][2 * h + 1] * inv);
    }
  }
}

#define INSTANTIATE_PREFILL(T, SUFFIX)                                                          \
  extern "C" __global__ void prefill_attention_##SUFFIX(                                        \
      const T *q, const T *k_cache, const T *v_cache, const uint32_t *ctx_slots,                \
      const uint32_t *tiles, T *out, uint32_t hq, uint32_t hkv, uint32_t d, float scale,         \
      uint32_t window) {                                                                        \
    prefill_attention<T>(q, k_cache, v_cache, ctx_slots, tiles, out, hq, hkv, d, scale, window); \
  }

INSTANTIATE_PREFILL(__half, f16)
INSTANTIATE_PREFILL(__nv_bfloat16, bf16)

#define INSTANTIATE(T, SUFFIX)                                                                  \
  extern "C" __global__ void qkv_store_##SUFFIX(                                                \
      const T *q, const T *k, const T *v, uint32_t q_stride, uint32_t k_stride,                 \
      uint32_t v_stride, const T *bias, const float *q_norm, const float *k_norm, float eps,    \
      const T *cos_table, const T *sin_table, const uint32_t *positions, const uint32_t *slots, \
      T *q_out, T *k_cache, T *v_cache, uint32_t num_tokens, uint32_t hq, uint32_t hkv,         \
      uint32_t d, uint32_t rotary_dim, uint32_t interleaved) {                                  \
    qkv_store<T>(q, k, v, q_stride, k_stride, v_stride, bias, q_norm, k_norm, eps, cos_table,   \
                 sin_table, positions, slots, q_out, k_cache, v_cache, num_tokens, hq, hkv, d,  \
                 rotary_dim, interleaved);                                                      \
  }                                                                                             \
  extern "C" __global__ void paged_attention_##SUFFIX(                                          \
      const T *q, const T *k_cache, const T *v_cache, const uint32_t *ctx_slots,                \
      const uint32_t *tiles, T *out, float *partial, uint32_t num_tokens, uint32_t hq,          \
      uint32_t hkv, uint32_t d, uint32_t heads_per_block, uint32_t kt, uint32_t splits,         \
      float scale, float softcap, uint32_t window, const float *sinks) {                        \
    paged_attention<T>(q, k_cache, v_cache, ctx_slots, tiles, out, partial, num_tokens, hq, hkv, \
                       d, heads_per_block, kt, splits, scale, softcap, window, sinks);          \
  }                                                                                             \
  extern "C" __global__ void attention_combine_##SUFFIX(const float *partial, T *out,           \
                                                        uint32_t rows, uint32_t d,              \
                                                        uint32_t splits) {                      \
    attention_combine<T>(partial, out, rows, d, splits);                                        \
  }                                                                                             \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *delta, const float *w,  \
                                                   T *sum_out, T *y, uint32_t cols, float eps) { \
    add_rms_norm<T>(x, delta, w, sum_out, y, cols, eps);                                        \
  }                                                                                             \
  extern "C" __global__ void gated_act_##SUFFIX(const T *gate, const T *up, T *out,             \
                                                uint32_t rows, uint32_t cols,                   \
                                                uint32_t gate_stride, uint32_t up_stride,       \
                                                uint32_t act) {                                 \
    gated_act<T>(gate, up, out, rows, cols, gate_stride, up_stride, act);                       \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

#include "moe.cuh"
