// Mixture-of-experts on the device, with no copy to the host (so decode steps with experts are
// captured as CUDA graphs): the router's choice per token (moe_route), each expert's rows grouped
// into tiles (moe_align), every tile's rows multiplied by its expert's weights on the tensor
// cores (moe_gemm: dense bf16/f16, or Q8_0 blocks dequantized in shared memory, so experts stay
// packed), the gated activation with per-expert biases (moe_act), and the weighted sum of each
// token's experts (moe_combine). vLLM's fused_moe has the same structure (moe_align_block_size,
// then one grouped GEMM per projection); this is our own, in the style of the kernels above.
//
// A "pair" is one (token, chosen expert): pair p = token * top_k + slot. Every expert's pairs are
// padded to whole tiles of BM rows; tile i belongs to expert tile_expert[i] and holds the pairs
// sorted[i*BM ..] (MOE_NONE pads). Which order an expert's pairs take within its tiles does not
// matter: every output element is one row's dot product, summed in the same order wherever the
// row sits.
//
// Included by kernels.cu, whose helpers (to_f, from_f, warp_max, warp_sum, mma_16816) it uses.

#define MOE_NONE 0xffffffffu
#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOP_K 16
#define MOE_BN 64
#define MOE_BK 64
#define MOE_LD (MOE_BK + 8)
#define MOE_THREADS 128
#define MOE_DENSE 0
#define MOE_Q8_0 1

// moe_route: one warp per token over its router scores [T, E] (f32): the softmax, the top_k
// largest probabilities (ties to the lower expert), renormalized when `normalize`, each times
// its expert's scale when `scales` is given; written as ids/weights [T, top_k] with the slots in
// ascending expert order (the order transformers adds the experts' outputs in).
extern "C" __global__ void moe_route(const float *scores, uint32_t tokens, uint32_t experts,
                                     uint32_t top_k, uint32_t normalize, const float *scales,
                                     uint32_t *ids, float *weights) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t t = blockIdx.x * (blockDim.x / 32) + warp;
  if (t >= tokens) return;
  const float *s = scores + (size_t)t * experts;
  constexpr uint32_t ROUTE_PER_LANE = MOE_MAX_EXPERTS / 32;
  float p[ROUTE_PER_LANE];
  float mx = -INFINITY;
#pragma unroll
  for (uint32_t i = 0; i < ROUTE_PER_LANE; ++i) {
    const uint32_t e = lane + 32 * i;
    p[i] = e < experts ? s[e] : -INFINITY;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_max(mx);
  float total = 0.f;
#pragma unroll
  for (uint32_t i = 0; i < ROUTE_PER_LANE; ++i) {
    p[i] = lane + 32 * i < experts ? expf(p[i] - mx) : 0.f;
    total += p[i];
  }
  total = warp_sum(total);
  uint32_t chosen[MOE_MAX_TOP_K];
  float prob[MOE_MAX_TOP_K];
  uint32_t taken = 0;
  float kept = 0.f;
  for (uint32_t j = 0; j < top_k; ++j) {
    float best = -1.f;
    uint32_t best_e = MOE_NONE;
#pragma unroll
    for (uint32_t i = 0; i < ROUTE_PER_LANE; ++i) {
      const uint32_t e = lane + 32 * i;
      if (e < experts && !((taken >> i) & 1u) && p[i] > best) {
        best = p[i];
        best_e = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(FULL_MASK, best, o);
      const uint32_t other_e = __shfl_xor_sync(FULL_MASK, best_e, o);
      if (other > best || (other == best && other_e < best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
    chosen[j] = best_e;
    prob[j] = best / total;
    kept += prob[j];
  }
  if (lane != 0) return;
  for (uint32_t j = 1; j < top_k; ++j) {  // ascending expert order
    const uint32_t e = chosen[j];
    const float v = prob[j];
    uint32_t i = j;
    for (; i > 0 && chosen[i - 1] > e; --i) {
      chosen[i] = chosen[i - 1];
      prob[i] = prob[i - 1];
    }
    chosen[i] = e;
    prob[i] = v;
  }
  for (uint32_t j = 0; j < top_k; ++j) {
    float w = normalize ? prob[j] / kept : prob[j];
    if (scales != nullptr) w *= scales[chosen[j]];
    ids[(size_t)t * top_k + j] = chosen[j];
    weights[(size_t)t * top_k + j] = w;
  }
}

// moe_align: one block. Counts each expert's pairs, gives every expert with pairs
// ceil(count / bm) consecutive tiles, and writes `tile_expert` [max_tiles] (MOE_NONE past the
// used ones) and `sorted` [max_tiles * bm] (the pair of each tile row, MOE_NONE pads).
extern "C" __global__ void moe_align(const uint32_t *ids, uint32_t pairs, uint32_t experts,
                                     uint32_t bm, uint32_t max_tiles, uint32_t *sorted,
                                     uint32_t *tile_expert) {
  __shared__ uint32_t count[MOE_MAX_EXPERTS], first_tile[MOE_MAX_EXPERTS], cursor[MOE_MAX_EXPERTS];
  __shared__ uint32_t used_tiles;
  for (uint32_t e = threadIdx.x; e < experts; e += blockDim.x) {
    count[e] = 0;
    cursor[e] = 0;
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < pairs; i += blockDim.x) atomicAdd(&count[ids[i]], 1u);
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t tiles = 0;
    for (uint32_t e = 0; e < experts; ++e) {
      first_tile[e] = tiles;
      tiles += (count[e] + bm - 1) / bm;
    }
    used_tiles = tiles;
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < max_tiles * bm; i += blockDim.x) sorted[i] = MOE_NONE;
  for (uint32_t i = used_tiles + threadIdx.x; i < max_tiles; i += blockDim.x) tile_expert[i] = MOE_NONE;
  for (uint32_t e = threadIdx.x; e < experts; e += blockDim.x) {
    const uint32_t n = (count[e] + bm - 1) / bm;
    for (uint32_t i = 0; i < n; ++i) tile_expert[first_tile[e] + i] = e;
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const uint32_t e = ids[i];
    sorted[first_tile[e] * bm + atomicAdd(&cursor[e], 1u)] = i;
  }
}

// Zeroes a warp's accumulators: MT row tiles of 16 by two column tiles of 8 (4 per thread each).
template <uint32_t MT>
__device__ __forceinline__ void zero_tiles(float (&t)[MT][2][4]) {
#pragma unroll
  for (uint32_t mt = 0; mt < MT; ++mt)
#pragma unroll
    for (uint32_t nt = 0; nt < 2; ++nt)
#pragma unroll
      for (uint32_t i = 0; i < 4; ++i) t[mt][nt][i] = 0.f;
}

// moe_gemm: c[p, n] = sum_k a[p / a_row_div, k] * W_e[n, k] for every pair p of every tile
// (a_row_div = top_k reads the token's row for the first projection, 1 the pair's own row).
// One block of 4 warps per (MOE_BN output columns, tile of BM rows); each warp owns 16 columns
// of all BM rows (mma.sync m16n8k16, f32 accumulators). Per MOE_BK step the A tile is staged in
// shared memory in the MMA type TM (activations rounded to it) and the W tile as stored: dense
// rows in 16-byte loads; Q8_0 rows as their raw 34-byte blocks (f16 scale, 32 int8), loaded
// in consecutive halfwords (blocks are only 2-byte aligned) and turned into B fragments by
// the one warp that reads them: exact integers, each 32-wide block's partial product scaled
// by its scale in f32, so the dequantized values are never rounded. W is [E, N, K] (dense) or
// E*N rows of K/32 Q8_0 blocks.
// Without `sorted` and `tile_expert` (null), it is a dense product of one matrix: tile i holds
// rows i*BM .. i*BM + BM of the `m_rows` rows. Every row's sums are the same mma steps over k
// in order whichever tile (and tile height) it lands in, so the product is batch invariant:
// `row_gemm` below, the dense layers' product under --deterministic.
template <typename TA, typename TM, int WF, int BM>
__device__ void moe_gemm(const TA *a, uint32_t a_stride, uint32_t a_row_div, const uint8_t *w,
                         const uint32_t *sorted, const uint32_t *tile_expert, TA *c,
                         uint32_t n_out, uint32_t k_in, uint32_t m_rows) {
  constexpr uint32_t RAW_LD = 36;  // halfwords per Q8_0 row of a step: 2 blocks of 17, padded
  constexpr uint32_t W_HALVES = WF == MOE_DENSE ? MOE_BN * MOE_LD : MOE_BN * RAW_LD;
  __shared__ __align__(16) TM a_s[BM * MOE_LD];
  __shared__ __align__(16) uint16_t w_s[W_HALVES];
  __shared__ uint32_t rows_s[BM];
  const uint32_t tile = blockIdx.y, e = tile_expert != nullptr ? tile_expert[tile] : 0;
  if (e == MOE_NONE) return;
  const uint32_t n0 = blockIdx.x * MOE_BN;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  for (uint32_t r = threadIdx.x; r < BM; r += blockDim.x) {
    const uint32_t row = tile * BM + r;
    rows_s[r] = sorted != nullptr ? sorted[row] : (row < m_rows ? row : MOE_NONE);
  }
  __syncthreads();
  constexpr uint32_t MT = BM / 16;
  float acc[MT][2][4];
  zero_tiles<MT>(acc);
  const size_t q8_row_bytes = (size_t)(k_in / 32) * 34;
  // Two int8 weights of Q8_0 row `row` (of the block's tile) at even k (< MOE_BK) as a TM pair.
  const auto q8_pair = [&](uint32_t row, uint32_t k) {
    const uint8_t *bytes = reinterpret_cast<const uint8_t *>(w_s + row * RAW_LD) + (k / 32) * 34 + 2 + k % 32;
    const uint16_t two = *reinterpret_cast<const uint16_t *>(bytes);
    return pack2<TM>((float)(int8_t)(two & 0xff), (float)(int8_t)(two >> 8));
  };
  const auto q8_scale = [&](uint32_t row, uint32_t kb) {
    return __half2float(*reinterpret_cast<const __half *>(reinterpret_cast<const uint8_t *>(w_s + row * RAW_LD) + kb * 34));
  };

  for (uint32_t k0 = 0; k0 < k_in; k0 += MOE_BK) {
    for (uint32_t i = threadIdx.x; i < BM * MOE_BK; i += blockDim.x) {
      const uint32_t r = i / MOE_BK, kk = i % MOE_BK, p = rows_s[r];
      float x = 0.f;
      if (p != MOE_NONE && k0 + kk < k_in) x = to_f(a[(size_t)(p / a_row_div) * a_stride + k0 + kk]);
      a_s[r * MOE_LD + kk] = from_f<TM>(x);
    }
    if constexpr (WF == MOE_DENSE) {
      const TM *we = reinterpret_cast<const TM *>(w) + (size_t)e * n_out * k_in;
      TM *b_s = reinterpret_cast<TM *>(w_s);
      constexpr uint32_t VEC = 8, CHUNKS = MOE_BK / VEC;
      if (k_in % VEC == 0) {
        for (uint32_t i = threadIdx.x; i < MOE_BN * CHUNKS; i += blockDim.x) {
          const uint32_t j = i / CHUNKS, kk = (i % CHUNKS) * VEC;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (n0 + j < n_out && k0 + kk < k_in)
            v = *reinterpret_cast<const uint4 *>(we + (size_t)(n0 + j) * k_in + k0 + kk);
          *reinterpret_cast<uint4 *>(b_s + j * MOE_LD + kk) = v;
        }
      } else {
        // Rows not 16-byte aligned (row_gemm of a width that is no multiple of 8): one value
        // at a time.
        for (uint32_t i = threadIdx.x; i < MOE_BN * MOE_BK; i += blockDim.x) {
          const uint32_t j = i / MOE_BK, kk = i % MOE_BK;
          TM v = from_f<TM>(0.f);
          if (n0 + j < n_out && k0 + kk < k_in) v = we[(size_t)(n0 + j) * k_in + k0 + kk];
          b_s[j * MOE_LD + kk] = v;
        }
      }
    } else {
      const uint8_t *we = w + (size_t)e * n_out * q8_row_bytes + (size_t)(k0 / 32) * 34;
      for (uint32_t i = threadIdx.x; i < MOE_BN * 34; i += blockDim.x) {
        const uint32_t j = i / 34, h = i % 34;
        uint16_t v = 0;
        if (n0 + j < n_out && k0 + (h / 17) * 32 < k_in)
          v = reinterpret_cast<const uint16_t *>(we + (size_t)(n0 + j) * q8_row_bytes)[h];
        w_s[j * RAW_LD + h] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (uint32_t kb = 0; kb < MOE_BK / 32; ++kb) {
      float part[MT][2][4];
      zero_tiles<MT>(part);
#pragma unroll
      for (uint32_t ks = 0; ks < 2; ++ks) {
        const uint32_t kk = kb * 32 + ks * 16 + tig * 2;
        uint32_t bf[2][2];
#pragma unroll
        for (uint32_t nt = 0; nt < 2; ++nt) {
          const uint32_t row = warp * 16 + nt * 8 + g;
          if constexpr (WF == MOE_DENSE) {
            const TM *br = reinterpret_cast<const TM *>(w_s) + row * MOE_LD + kk;
            bf[nt][0] = *reinterpret_cast<const uint32_t *>(br);
            bf[nt][1] = *reinterpret_cast<const uint32_t *>(br + 8);
          } else {
            bf[nt][0] = q8_pair(row, kk);
            bf[nt][1] = q8_pair(row, kk + 8);
          }
        }
#pragma unroll
        for (uint32_t mt = 0; mt < MT; ++mt) {
          const TM *ar = a_s + (mt * 16 + g) * MOE_LD + kk;
          const uint32_t af[4] = {*reinterpret_cast<const uint32_t *>(ar),
                                  *reinterpret_cast<const uint32_t *>(ar + 8 * MOE_LD),
                                  *reinterpret_cast<const uint32_t *>(ar + 8),
                                  *reinterpret_cast<const uint32_t *>(ar + 8 * MOE_LD + 8)};
#pragma unroll
          for (uint32_t nt = 0; nt < 2; ++nt) {
            if constexpr (WF == MOE_DENSE) {
              mma_16816<TM>(acc[mt][nt], af, bf[nt][0], bf[nt][1]);
            } else {
              mma_16816<TM>(part[mt][nt], af, bf[nt][0], bf[nt][1]);
            }
          }
        }
      }
      if constexpr (WF != MOE_DENSE) {
#pragma unroll
        for (uint32_t nt = 0; nt < 2; ++nt) {
          const uint32_t col = warp * 16 + nt * 8 + tig * 2;
          const float s0 = q8_scale(col, kb), s1 = q8_scale(col + 1, kb);
#pragma unroll
          for (uint32_t mt = 0; mt < MT; ++mt) {
            acc[mt][nt][0] += part[mt][nt][0] * s0;
            acc[mt][nt][1] += part[mt][nt][1] * s1;
            acc[mt][nt][2] += part[mt][nt][2] * s0;
            acc[mt][nt][3] += part[mt][nt][3] * s1;
          }
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (uint32_t mt = 0; mt < MT; ++mt)
#pragma unroll
    for (uint32_t nt = 0; nt < 2; ++nt) {
      const uint32_t col = n0 + warp * 16 + nt * 8 + tig * 2;
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) {
        const uint32_t p = rows_s[mt * 16 + g + 8 * h];
        if (p == MOE_NONE) continue;
        TA *dst = c + (size_t)p * n_out + col;
        if (col < n_out) dst[0] = from_f<TA>(acc[mt][nt][2 * h]);
        if (col + 1 < n_out) dst[1] = from_f<TA>(acc[mt][nt][2 * h + 1]);
      }
    }
}

// moe_act: out[p, j] = act(gate + bias) * (up + bias) for each pair's [gate | up] row of `gu`
// [pairs, 2 * inter], the biases (f32 [E, 2 * inter], or none) those of the pair's expert.
// act: 0 SiLU, 1 tanh GELU, 2 gpt-oss's clamped SwiGLU (`alpha`, `limit`).
template <typename T>
__device__ void moe_act(const T *gu, const float *bias, const uint32_t *ids, T *out,
                        uint32_t pairs, uint32_t inter, uint32_t act, float alpha, float limit) {
  const size_t n = (size_t)pairs * inter;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (size_t)gridDim.x * blockDim.x) {
    const size_t p = idx / inter, j = idx % inter;
    float g = to_f(gu[p * 2 * inter + j]), u = to_f(gu[p * 2 * inter + inter + j]);
    if (bias != nullptr) {
      const float *b = bias + (size_t)ids[p] * 2 * inter;
      g += b[j];
      u += b[inter + j];
    }
    float y;
    if (act == 0) {
      y = g / (1.f + expf(-g)) * u;
    } else if (act == 1) {
      const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      y = 0.5f * g * (1.f + tanhf(inner)) * u;
    } else {
      g = fminf(g, limit);
      u = fminf(fmaxf(u, -limit), limit);
      y = (u + 1.f) * (g / (1.f + expf(-alpha * g)));
    }
    out[idx] = from_f<T>(y);
  }
}

// moe_combine: out[t, h] = sum over the token's slots (ascending expert order) of
// weight * (y[pair, h] + bias[expert, h]), in f32, rounded once.
template <typename T>
__device__ void moe_combine(const T *y, const float *bias, const uint32_t *ids, const float *weights,
                            T *out, uint32_t tokens, uint32_t top_k, uint32_t hidden) {
  const size_t n = (size_t)tokens * hidden;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (size_t)gridDim.x * blockDim.x) {
    const size_t t = idx / hidden, h = idx % hidden;
    float sum = 0.f;
    for (uint32_t j = 0; j < top_k; ++j) {
      const size_t p = t * top_k + j;
      float v = to_f(y[p * hidden + h]);
      if (bias != nullptr) v += bias[(size_t)ids[p] * hidden + h];
      sum += weights[p] * v;
    }
    out[idx] = from_f<T>(sum);
  }
}

#define INSTANTIATE_MOE_GEMM(TA, TM, WF, BM, NAME)                                             \
  extern "C" __global__ void NAME(const TA *a, uint32_t a_stride, uint32_t a_row_div,          \
                                  const uint8_t *w, const uint32_t *sorted,                    \
                                  const uint32_t *tile_expert, TA *c, uint32_t n_out,          \
                                  uint32_t k_in) {                                             \
    moe_gemm<TA, TM, WF, BM>(a, a_stride, a_row_div, w, sorted, tile_expert, c, n_out, k_in, 0); \
  }

// row_gemm: c[m, n] = sum_k a[m, k] * W[n, k] for the m_rows rows of `a`, batch invariant (see
// moe_gemm); one block per (MOE_BN output columns, BM rows).
#define INSTANTIATE_ROW_GEMM(T, BM, NAME)                                                       \
  extern "C" __global__ void NAME(const T *a, const uint8_t *w, T *c, uint32_t m_rows,          \
                                  uint32_t n_out, uint32_t k_in) {                              \
    moe_gemm<T, T, MOE_DENSE, BM>(a, k_in, 1, w, nullptr, nullptr, c, n_out, k_in, m_rows);     \
  }

// Dense experts compute in their own type; Q8_0 experts take the activations as bf16.
INSTANTIATE_MOE_GEMM(__nv_bfloat16, __nv_bfloat16, MOE_DENSE, 16, moe_gemm_dense_m16_bf16)
INSTANTIATE_MOE_GEMM(__nv_bfloat16, __nv_bfloat16, MOE_DENSE, 64, moe_gemm_dense_m64_bf16)
INSTANTIATE_MOE_GEMM(__half, __half, MOE_DENSE, 16, moe_gemm_dense_m16_f16)
INSTANTIATE_MOE_GEMM(__half, __half, MOE_DENSE, 64, moe_gemm_dense_m64_f16)
INSTANTIATE_MOE_GEMM(float, __nv_bfloat16, MOE_Q8_0, 16, moe_gemm_q8_0_m16_f32)
INSTANTIATE_MOE_GEMM(float, __nv_bfloat16, MOE_Q8_0, 64, moe_gemm_q8_0_m64_f32)
INSTANTIATE_MOE_GEMM(__nv_bfloat16, __nv_bfloat16, MOE_Q8_0, 16, moe_gemm_q8_0_m16_bf16)
INSTANTIATE_MOE_GEMM(__nv_bfloat16, __nv_bfloat16, MOE_Q8_0, 64, moe_gemm_q8_0_m64_bf16)
INSTANTIATE_ROW_GEMM(__nv_bfloat16, 16, row_gemm_m16_bf16)
INSTANTIATE_ROW_GEMM(__nv_bfloat16, 64, row_gemm_m64_bf16)
INSTANTIATE_ROW_GEMM(__half, 16, row_gemm_m16_f16)
INSTANTIATE_ROW_GEMM(__half, 64, row_gemm_m64_f16)

#define INSTANTIATE_MOE(T, SUFFIX)                                                              \
  extern "C" __global__ void moe_act_##SUFFIX(const T *gu, const float *bias, const uint32_t *ids, \
                                              T *out, uint32_t pairs, uint32_t inter,           \
                                              uint32_t act, float alpha, float limit) {          \
    moe_act<T>(gu, bias, ids, out, pairs, inter, act, alpha, limit);                           \
  }                                                                                             \
  extern "C" __global__ void moe_combine_##SUFFIX(const T *y, const float *bias,                 \
                                                  const uint32_t *ids, const float *weights,    \
                                                  T *out, uint32_t tokens, uint32_t top_k,      \
                                                  uint32_t hidden) {                            \
    moe_combine<T>(y, bias, ids, weights, out, tokens, top_k, hidden);                          \
  }

INSTANTIATE_MOE(float, f32)
INSTANTIATE_MOE(__half, f16)
INSTANTIATE_MOE(__nv_bfloat16, bf16)
