// Fused multi-head self-attention for x86 CPUs with AVX512-BF16, as XLA FFI custom calls.
//
// Inputs are the packed projection qkv (B, N, 3, H, D) in bfloat16; the forward pass returns
// softmax(q k^T * scale) v as (B, N, H, D) bfloat16 plus the row log-sum-exp (B, H, N) float32,
// the backward pass returns d(qkv) (B, N, 3, H, D). The forward pass works on blocks of 64 query
// rows (their 64 x N scores stay in the core's cache); the backward pass on 64 x 64 tiles, one
// task per (batch, head, range of key blocks) looping over all query blocks. No (N, N) matrix is
// ever held. All matmuls take bfloat16 operands and accumulate in float32 (vdpbf16ps); softmax,
// the log-sum-exp and dS run in float32. Packed operands and per-worker scratch live in a
// workspace output that XLA allocates.
//
// Matmul layout: C[M x Nc] = A[M x K] . B[K x Nc] with A bfloat16 row-major (K even) and B
// pre-packed into panels of 32 columns with pairs of consecutive k interleaved,
// Bp[panel][k/2][32][2], the operand order of vdpbf16ps.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bf16 = uint16_t;
constexpr int kNR = 32;     // columns per packed panel (two zmm of float32)
constexpr int kMR = 8;      // rows per micro-tile
constexpr int kBlock = 64;  // query / key rows per task

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline bf16 ToBf16(float f) {  // round to nearest even, as _mm512_cvtneps_pbh
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline float FromBf16(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- packing ---------------------------------------------------------------------------------

// B = X^T for X (rows x k_dim) with row stride ldx: Bp[panel][kp][j][t] = X[panel*32 + j][2kp + t].
// Rows past `rows` (up to the panel padding) are zero.
void PackTransposed(const bf16* x, int64_t ldx, int64_t rows, int64_t k_dim, bf16* out) {
  const int64_t kpairs = k_dim / 2, panels = RoundUp(rows, kNR) / kNR;
  for (int64_t p = 0; p < panels; ++p) {
    bf16* dst = out + p * kpairs * kNR * 2;
    for (int64_t j = 0; j < kNR; ++j) {
      const int64_t r = p * kNR + j;
      if (r < rows) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(x + r * ldx);
        uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
        for (int64_t kp = 0; kp < kpairs; ++kp) d32[kp * kNR + j] = src[kp];
      } else {
        uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
        for (int64_t kp = 0; kp < kpairs; ++kp) d32[kp * kNR + j] = 0;
      }
    }
  }
}

// B = X for X (k_rows x cols) with row stride ldx: Bp[panel][kp][j][t] = X[2kp + t][panel*32 + j].
// k is padded to k_pad (even) and columns to a multiple of 32, with zeros.
void PackNormal(const bf16* x, int64_t ldx, int64_t k_rows, int64_t k_pad, int64_t cols,
                bf16* out) {
  const int64_t kpairs = k_pad / 2, panels = RoundUp(cols, kNR) / kNR;
  for (int64_t p = 0; p < panels; ++p) {
    bf16* dst = out + p * kpairs * kNR * 2;
    for (int64_t kp = 0; kp < kpairs; ++kp) {
      for (int t = 0; t < 2; ++t) {
        const int64_t k = 2 * kp + t;
        for (int64_t j = 0; j < kNR; ++j) {
          const int64_t c = p * kNR + j;
          dst[(kp * kNR + j) * 2 + t] = (k < k_rows && c < cols) ? x[k * ldx + c] : 0;
        }
      }
    }
  }
}

// X^T for X (rows x d) with row stride ldx, as plain row-major (d x n_pad); columns past
// `rows` are zero. The A operand of matmuls that contract over tokens.
void PackPlainT(const bf16* x, int64_t ldx, int64_t rows, int64_t d, int64_t n_pad, bf16* out) {
  for (int64_t c = 0; c < d; ++c) {
    bf16* dst = out + c * n_pad;
    for (int64_t t = 0; t < rows; ++t) dst[t] = x[t * ldx + c];
    for (int64_t t = rows; t < n_pad; ++t) dst[t] = 0;
  }
}

// ---- matmul ----------------------------------------------------------------------------------

template <int MR, bool ACC>
inline void MicroKernel(const bf16* a, int64_t lda, const bf16* bp, int64_t kpairs, float* c,
                        int64_t ldc) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = ACC ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = ACC ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + kp * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + kp * 64 + 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

template <bool ACC>
void GemmImpl(const bf16* a, int64_t lda, int64_t m, const bf16* bp, int64_t kpairs,
              int64_t panel_stride, int64_t n_cols, float* c, int64_t ldc) {
  const int64_t panels = RoundUp(n_cols, kNR) / kNR;
  for (int64_t p = 0; p < panels; ++p) {
    const bf16* panel = bp + p * panel_stride;
    float* cp = c + p * kNR;
    int64_t i = 0;
    for (; i + kMR <= m; i += kMR)
      MicroKernel<kMR, ACC>(a + i * lda, lda, panel, kpairs, cp + i * ldc, ldc);
    const bf16* ai = a + i * lda;
    float* ci = cp + i * ldc;
    switch (m - i) {
      case 7: MicroKernel<7, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 6: MicroKernel<6, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 5: MicroKernel<5, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 4: MicroKernel<4, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 3: MicroKernel<3, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 2: MicroKernel<2, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      case 1: MicroKernel<1, ACC>(ai, lda, panel, kpairs, ci, ldc); break;
      default: break;
    }
  }
}

// C[m x round32(n_cols)] (=|+=) A[m x 2*kpairs] . Bp, float32, row stride ldc. Panels of Bp
// are panel_stride elements apart (a k sub-range of a larger packed operand), by default
// kpairs * 64.
void Gemm(const bf16* a, int64_t lda, int64_t m, const bf16* bp, int64_t kpairs, int64_t n_cols,
          float* c, int64_t ldc, int64_t panel_stride = -1, bool accumulate = false) {
  if (panel_stride < 0) panel_stride = kpairs * kNR * 2;
  if (accumulate)
    GemmImpl<true>(a, lda, m, bp, kpairs, panel_stride, n_cols, c, ldc);
  else
    GemmImpl<false>(a, lda, m, bp, kpairs, panel_stride, n_cols, c, ldc);
}

// ---- vector helpers --------------------------------------------------------------------------

// exp(x) for float32 lanes: Cephes expf polynomial after range reduction by ln 2 (~1 ulp).
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 TailMask(int64_t remaining) {
  if (remaining <= 0) return 0;
  return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

// 16 float32 -> 16 bfloat16 (round to nearest even), masked store.
inline void StoreBf16(bf16* dst, __m512 v, __mmask16 mask) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(dst, mask, h);
}

// Rows a and b (16 float32 each) as 16 bfloat16 pairs (a[j], b[j]): the k-pair layout of a
// packed operand, written for two consecutive k at once.
inline void StorePairs(bf16* dst, __m512 a, __m512 b) {
  alignas(64) static const int16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                               6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                               12, 28, 13, 29, 14, 30, 15, 31};
  const __m256i ha = (__m256i)_mm512_cvtneps_pbh(a);
  const __m256i hb = (__m256i)_mm512_cvtneps_pbh(b);
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(ha), hb, 1);
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), both));
}

// ---- parallel loop on XLA's intra-op pool ----------------------------------------------------

// Runs f(i, slot) for i in [0, n) on the calling thread and up to slots - 1 of the pool's
// threads; `slot` < slots numbers the worker, for its scratch memory. Items are claimed from a
// shared counter, and the caller returns once every item is finished; a pool task that starts
// late finds no item left and touches only the shared counters, so nothing it holds points into
// the caller's stack when it runs.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t slots, const F& f) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> workers{0};
  };
  auto counters = std::make_shared<Counters>();
  const F* fn = &f;
  auto work = [counters, fn, n]() {
    int64_t slot = -1;
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      if (slot < 0) slot = counters->workers.fetch_add(1);
      (*fn)(i, slot);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min({pool.num_threads(), n - 1, slots - 1});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ---- shapes ----------------------------------------------------------------------------------

struct Dims {
  int64_t b, n, h, d;
  int64_t n_pad;   // keys padded to the panel width (also the even k of P . V)
  int64_t d_pad;   // head dim padded to the panel width
  int64_t row;     // stride between tokens in qkv: 3 * h * d
  int64_t orow;    // stride between tokens in o / do: h * d
  int64_t pack;    // elements of one packed (N x D) operand
  const bf16* q(const bf16* qkv, int64_t bi, int64_t hi, int64_t t, int which) const {
    return qkv + (bi * n + t) * row + which * h * d + hi * d;
  }
};

ffi::Error CheckQkv(const ffi::AnyBuffer& qkv, Dims* dims) {
  if (qkv.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("cpu_attention: qkv must be bfloat16");
  auto s = qkv.dimensions();
  if (s.size() != 5 || s[2] != 3)
    return ffi::Error::InvalidArgument("cpu_attention: qkv must be (B, N, 3, H, D)");
  dims->b = s[0];
  dims->n = s[1];
  dims->h = s[3];
  dims->d = s[4];
  if (dims->d % 2)
    return ffi::Error::InvalidArgument("cpu_attention: head dim must be even");
  dims->n_pad = RoundUp(dims->n, kNR);
  dims->d_pad = RoundUp(dims->d, kNR);
  dims->row = 3 * dims->h * dims->d;
  dims->orow = dims->h * dims->d;
  dims->pack = dims->n_pad * dims->d_pad;
  return ffi::Error::Success();
}

// Scratch of one worker, carved from the workspace that XLA allocates with the outputs, so that
// the kernel's memory shows in XLA's buffer assignment and nothing is allocated per call.
// cpu_attention.workspace_bytes in Python computes the same sizes.
struct Scratch {
  float* s;    // scores (kBlock x n_pad)
  float* out;  // kBlock x d_pad
  bf16* p;     // probabilities
};

// Forward: packed K^T and V per (b, h), then one scratch slot per worker.
struct Workspace {
  int64_t big, small, packs_bytes, slot_bytes;
  explicit Workspace(const Dims& dm) {
    big = kBlock * dm.n_pad;
    small = kBlock * dm.d_pad;
    packs_bytes = 2 * dm.b * dm.h * dm.pack * 2;
    slot_bytes = big * (4 + 2) + small * 4;
  }
  int64_t Total(int64_t slots) const { return packs_bytes + slots * slot_bytes; }
  bf16* Pack(char* base, int64_t i, const Dims& dm) const {
    return reinterpret_cast<bf16*>(base) + i * dm.pack;
  }
  Scratch Slot(char* base, int64_t i) const {
    char* at = base + packs_bytes + i * slot_bytes;
    Scratch sc{};
    sc.s = reinterpret_cast<float*>(at);
    sc.out = reinterpret_cast<float*>(at + big * 4);
    sc.p = reinterpret_cast<bf16*>(at + big * 4 + small * 4);
    return sc;
  }
};

// Key ranges per (b, h) in the backward pass: enough tasks for every worker twice over.
int64_t Splits(const Dims& dm, int64_t slots) {
  const int64_t bh = dm.b * dm.h, key_blocks = (dm.n + kBlock - 1) / kBlock;
  return std::min(key_blocks, std::max<int64_t>(1, (2 * slots + bh - 1) / bh));
}

struct TileScratch {
  float* s;    // scores of a (query block, key block) tile, kBlock x kBlock
  float* dp;   // dP of the tile
  bf16* ds;    // dS, row-major (queries x keys)
  bf16* pp;    // P packed with pairs over queries (B operand of dV^T)
  bf16* dsp;   // dS packed the same way (B operand of dK^T)
  float* dkt;  // dK^T of the key block, d_pad x kBlock
  float* dvt;  // dV^T of the key block
};

// Backward: 5 packed operands per (b, h), delta, per-split partial dQ, one slot per worker.
struct BwdWorkspace {
  int64_t splits, tile, packs_bytes, delta_bytes, dq_bytes, slot_bytes, d_pad;
  BwdWorkspace(const Dims& dm, int64_t slots) {
    const int64_t bh = dm.b * dm.h;
    splits = Splits(dm, slots);
    tile = kBlock * kBlock;
    d_pad = dm.d_pad;
    packs_bytes = 5 * bh * dm.pack * 2;
    delta_bytes = RoundUp(bh * dm.n * 4, 64);
    dq_bytes = bh * splits * dm.n_pad * dm.d_pad * 4;
    slot_bytes = 2 * tile * 4 + 3 * tile * 2 + 2 * dm.d_pad * kBlock * 4;
  }
  int64_t Total(int64_t slots) const {
    return packs_bytes + delta_bytes + dq_bytes + slots * slot_bytes;
  }
  bf16* Pack(char* base, int64_t i, const Dims& dm) const {
    return reinterpret_cast<bf16*>(base) + i * dm.pack;
  }
  float* Delta(char* base) const { return reinterpret_cast<float*>(base + packs_bytes); }
  float* Dq(char* base) const {
    return reinterpret_cast<float*>(base + packs_bytes + delta_bytes);
  }
  TileScratch Slot(char* base, int64_t i) const {
    char* at = base + packs_bytes + delta_bytes + dq_bytes + i * slot_bytes;
    TileScratch sc{};
    sc.s = reinterpret_cast<float*>(at);
    sc.dp = sc.s + tile;
    sc.dkt = sc.dp + tile;
    sc.dvt = sc.dkt + d_pad * kBlock;
    sc.ds = reinterpret_cast<bf16*>(sc.dvt + d_pad * kBlock);
    sc.pp = sc.ds + tile;
    sc.dsp = sc.pp + tile;
    return sc;
  }
};

template <typename Layout>
ffi::Error CheckWorkspace(const ffi::AnyBuffer& ws, const Layout& layout, int64_t slots) {
  if (slots < 1 || static_cast<int64_t>(ws.size_bytes()) < layout.Total(slots))
    return ffi::Error::InvalidArgument("cpu_attention: workspace too small for its slots");
  return ffi::Error::Success();
}

// ---- forward ---------------------------------------------------------------------------------

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer qkv_buf, float scale, int64_t slots,
                   ffi::Result<ffi::AnyBuffer> o_buf, ffi::Result<ffi::AnyBuffer> lse_buf,
                   ffi::Result<ffi::AnyBuffer> ws_buf) {
  Dims dm;
  if (auto err = CheckQkv(qkv_buf, &dm); err.failure()) return err;
  const Workspace layout(dm);
  if (auto err = CheckWorkspace(*ws_buf, layout, slots); err.failure()) return err;
  char* ws = reinterpret_cast<char*>(ws_buf->untyped_data());
  const bf16* qkv = reinterpret_cast<const bf16*>(qkv_buf.untyped_data());
  bf16* o = reinterpret_cast<bf16*>(o_buf->untyped_data());
  float* lse = reinterpret_cast<float*>(lse_buf->untyped_data());
  const int64_t bh = dm.b * dm.h;

  // K^T (panels over keys, pairs over d) and V (pairs over keys, panels over d) per (b, h).
  auto kt = [&](int64_t i) { return layout.Pack(ws, i, dm); };
  auto vn = [&](int64_t i) { return layout.Pack(ws, bh + i, dm); };
  ParallelFor(pool, bh, slots, [&](int64_t i, int64_t) {
    const int64_t bi = i / dm.h, hi = i % dm.h;
    PackTransposed(dm.q(qkv, bi, hi, 0, 1), dm.row, dm.n, dm.d, kt(i));
    PackNormal(dm.q(qkv, bi, hi, 0, 2), dm.row, dm.n, dm.n_pad, dm.d, vn(i));
  });

  const int64_t blocks = (dm.n + kBlock - 1) / kBlock;
  ParallelFor(pool, bh * blocks, slots, [&](int64_t task, int64_t slot) {
    const int64_t i = task / blocks, q0 = (task % blocks) * kBlock;
    const int64_t bi = i / dm.h, hi = i % dm.h, m = std::min<int64_t>(kBlock, dm.n - q0);
    const Scratch sc = layout.Slot(ws, slot);
    float* s = sc.s;
    bf16* p = sc.p;
    Gemm(dm.q(qkv, bi, hi, q0, 0), dm.row, m, kt(i), dm.d / 2, dm.n, s, dm.n_pad);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < m; ++r) {
      float* sr = s + r * dm.n_pad;
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < dm.n; j += 16) {
        const __mmask16 mk = TailMask(dm.n - j);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + j), vscale);
        vmax = _mm512_mask_max_ps(vmax, mk, vmax, x);
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      const __m512 vm = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < dm.n; j += 16) {
        const __mmask16 mk = TailMask(dm.n - j);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + j), vscale);
        const __m512 e = _mm512_maskz_mov_ps(mk, Exp(_mm512_sub_ps(x, vm)));
        _mm512_mask_storeu_ps(sr + j, mk, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      const float sum = _mm512_reduce_add_ps(vsum);
      const __m512 inv = _mm512_set1_ps(1.0f / sum);
      bf16* pr = p + r * dm.n_pad;
      for (int64_t j = 0; j < dm.n_pad; j += 16) {
        const __mmask16 mk = TailMask(dm.n - j);  // zero past n
        const __m512 x = _mm512_maskz_loadu_ps(mk, sr + j);
        StoreBf16(pr + j, _mm512_mul_ps(x, inv), 0xffff);
      }
      lse[i * dm.n + q0 + r] = mx + std::log(sum);
    }
    float* out = sc.out;
    Gemm(p, dm.n_pad, m, vn(i), dm.n_pad / 2, dm.d, out, dm.d_pad);
    for (int64_t r = 0; r < m; ++r) {
      bf16* orow = o + (bi * dm.n + q0 + r) * dm.orow + hi * dm.d;
      for (int64_t c = 0; c < dm.d; c += 16)
        StoreBf16(orow + c, _mm512_loadu_ps(out + r * dm.d_pad + c), TailMask(dm.d - c));
    }
  });
  return ffi::Error::Success();
}

// ---- backward --------------------------------------------------------------------------------

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer qkv_buf, ffi::AnyBuffer o_buf,
                    ffi::AnyBuffer lse_buf, ffi::AnyBuffer do_buf, float scale, int64_t slots,
                    ffi::Result<ffi::AnyBuffer> dqkv_buf, ffi::Result<ffi::AnyBuffer> ws_buf) {
  Dims dm;
  if (auto err = CheckQkv(qkv_buf, &dm); err.failure()) return err;
  const BwdWorkspace layout(dm, slots);
  if (auto err = CheckWorkspace(*ws_buf, layout, slots); err.failure()) return err;
  if (o_buf.element_type() != ffi::DataType::BF16 || do_buf.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("cpu_attention: o and do must be bfloat16");
  char* ws = reinterpret_cast<char*>(ws_buf->untyped_data());
  const bf16* qkv = reinterpret_cast<const bf16*>(qkv_buf.untyped_data());
  const bf16* o = reinterpret_cast<const bf16*>(o_buf.untyped_data());
  const bf16* dout = reinterpret_cast<const bf16*>(do_buf.untyped_data());
  const float* lse = reinterpret_cast<const float*>(lse_buf.untyped_data());
  bf16* dqkv = reinterpret_cast<bf16*>(dqkv_buf->untyped_data());
  const int64_t bh = dm.b * dm.h, splits = layout.splits;
  const int64_t blocks = (dm.n + kBlock - 1) / kBlock;

  // Per (b, h): K^T and V^T (panels over keys, pairs over d) for S and dP, K (pairs over keys)
  // for dQ, and Q^T, dO^T plain (d x tokens) as the A operands of dK^T and dV^T.
  enum { kKt, kVt, kKn, kQT, kDOT };
  auto pack_at = [&](int which, int64_t i) { return layout.Pack(ws, which * bh + i, dm); };
  float* delta = layout.Delta(ws);
  float* dq_all = layout.Dq(ws);
  ParallelFor(pool, bh, slots, [&](int64_t i, int64_t) {
    const int64_t bi = i / dm.h, hi = i % dm.h;
    const bf16* q = dm.q(qkv, bi, hi, 0, 0);
    const bf16* k = dm.q(qkv, bi, hi, 0, 1);
    const bf16* v = dm.q(qkv, bi, hi, 0, 2);
    const bf16* d_o = dout + bi * dm.n * dm.orow + hi * dm.d;
    const bf16* oo = o + bi * dm.n * dm.orow + hi * dm.d;
    PackTransposed(k, dm.row, dm.n, dm.d, pack_at(kKt, i));
    PackTransposed(v, dm.row, dm.n, dm.d, pack_at(kVt, i));
    PackNormal(k, dm.row, dm.n, dm.n_pad, dm.d, pack_at(kKn, i));
    PackPlainT(q, dm.row, dm.n, dm.d, dm.n_pad, pack_at(kQT, i));
    PackPlainT(d_o, dm.orow, dm.n, dm.d, dm.n_pad, pack_at(kDOT, i));
    for (int64_t t = 0; t < dm.n; ++t) {  // delta_t = sum_d dO[t, d] * O[t, d]
      float acc = 0.f;
      for (int64_t c = 0; c < dm.d; ++c)
        acc += FromBf16(d_o[t * dm.orow + c]) * FromBf16(oo[t * dm.orow + c]);
      delta[i * dm.n + t] = acc;
    }
  });

  // One task per (b, h, key range): for each key block, loop over all query blocks with the
  // (64 x 64) tile of scores in registers' reach: P, dS once per tile; dK, dV of the block
  // accumulate in the task, dQ in the task's own partial sum (added up below).
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t panel_k = (dm.n_pad / 2) * kNR * 2;  // panel stride of the K pack over keys
  const int64_t dpairs = dm.d / 2;
  ParallelFor(pool, bh * splits, slots, [&](int64_t task, int64_t slot) {
    const int64_t i = task / splits, split = task % splits;
    const int64_t bi = i / dm.h, hi = i % dm.h;
    const int64_t j0 = blocks * split / splits, j1 = blocks * (split + 1) / splits;
    const TileScratch sc = layout.Slot(ws, slot);
    float* dq = dq_all + task * dm.n_pad * dm.d_pad;
    std::memset(dq, 0, sizeof(float) * dm.n_pad * dm.d_pad);
    const float* lse_i = lse + i * dm.n;
    const float* delta_i = delta + i * dm.n;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k0 = j * kBlock, kj = std::min<int64_t>(kBlock, dm.n - k0);
      const int64_t kcols = std::min<int64_t>(kBlock, dm.n_pad - k0);  // computed key columns
      std::memset(sc.dkt, 0, sizeof(float) * dm.d_pad * kBlock);
      std::memset(sc.dvt, 0, sizeof(float) * dm.d_pad * kBlock);
      const bf16* kt_j = pack_at(kKt, i) + (k0 / kNR) * dpairs * kNR * 2;
      const bf16* vt_j = pack_at(kVt, i) + (k0 / kNR) * dpairs * kNR * 2;
      for (int64_t qb = 0; qb < blocks; ++qb) {
        const int64_t q0 = qb * kBlock, mi = std::min<int64_t>(kBlock, dm.n - q0);
        Gemm(dm.q(qkv, bi, hi, q0, 0), dm.row, mi, kt_j, dpairs, kcols, sc.s, kBlock);
        Gemm(dout + (bi * dm.n + q0) * dm.orow + hi * dm.d, dm.orow, mi, vt_j, dpairs, kcols,
             sc.dp, kBlock);
        for (int64_t r = 0; r < mi; r += 2) {
          const bool second = r + 1 < mi;
          const __m512 l0 = _mm512_set1_ps(lse_i[q0 + r]);
          const __m512 l1 = _mm512_set1_ps(second ? lse_i[q0 + r + 1] : 0.f);
          const __m512 d0 = _mm512_set1_ps(delta_i[q0 + r]);
          const __m512 d1 = _mm512_set1_ps(second ? delta_i[q0 + r + 1] : 0.f);
          for (int64_t c = 0; c < kBlock; c += 16) {
            const __mmask16 mk = TailMask(kj - c);
            const float* s0 = sc.s + r * kBlock + c;
            const float* p0s = sc.dp + r * kBlock + c;
            const __m512 p0 = _mm512_maskz_mov_ps(
                mk, Exp(_mm512_fmsub_ps(_mm512_loadu_ps(s0), vscale, l0)));
            // Masked: columns past the last key hold no scores (stale memory), and 0 * NaN
            // would leak into dS.
            const __m512 ds0 =
                _mm512_maskz_mul_ps(mk, p0, _mm512_sub_ps(_mm512_loadu_ps(p0s), d0));
            __m512 p1 = _mm512_setzero_ps(), ds1 = _mm512_setzero_ps();
            if (second) {
              p1 = _mm512_maskz_mov_ps(
                  mk, Exp(_mm512_fmsub_ps(_mm512_loadu_ps(s0 + kBlock), vscale, l1)));
              ds1 = _mm512_maskz_mul_ps(mk, p1,
                                        _mm512_sub_ps(_mm512_loadu_ps(p0s + kBlock), d1));
            }
            StoreBf16(sc.ds + r * kBlock + c, ds0, 0xffff);
            StoreBf16(sc.ds + (r + 1) * kBlock + c, ds1, 0xffff);
            const int64_t at = ((c / kNR) * (kBlock / 2) + r / 2) * kNR * 2 + (c % kNR) * 2;
            StorePairs(sc.pp + at, p0, p1);
            StorePairs(sc.dsp + at, ds0, ds1);
          }
        }
        const int64_t qpairs = (mi + 1) / 2;
        // dQ[q0:] += dS . K[k0:]
        Gemm(sc.ds, kBlock, mi, pack_at(kKn, i) + (k0 / 2) * kNR * 2, (kj + 1) / 2, dm.d,
             dq + q0 * dm.d_pad, dm.d_pad, panel_k, /*accumulate=*/true);
        // dV^T += dO^T[:, q0:] . P ; dK^T += Q^T[:, q0:] . dS
        Gemm(pack_at(kDOT, i) + q0, dm.n_pad, dm.d, sc.pp, qpairs, kcols, sc.dvt, kBlock,
             (kBlock / 2) * kNR * 2, /*accumulate=*/true);
        Gemm(pack_at(kQT, i) + q0, dm.n_pad, dm.d, sc.dsp, qpairs, kcols, sc.dkt, kBlock,
             (kBlock / 2) * kNR * 2, /*accumulate=*/true);
      }
      for (int64_t c = 0; c < kj; ++c) {
        bf16* dk = dqkv + (bi * dm.n + k0 + c) * dm.row + dm.h * dm.d + hi * dm.d;
        bf16* dv = dk + dm.h * dm.d;
        for (int64_t e = 0; e < dm.d; ++e) {
          dk[e] = ToBf16(sc.dkt[e * kBlock + c] * scale);
          dv[e] = ToBf16(sc.dvt[e * kBlock + c]);
        }
      }
    }
  });

  // dQ = scale * (sum of the key ranges' partial sums).
  ParallelFor(pool, bh * blocks, slots, [&](int64_t task, int64_t) {
    const int64_t i = task / blocks, q0 = (task % blocks) * kBlock;
    const int64_t bi = i / dm.h, hi = i % dm.h, mi = std::min<int64_t>(kBlock, dm.n - q0);
    for (int64_t r = 0; r < mi; ++r) {
      bf16* dst = dqkv + (bi * dm.n + q0 + r) * dm.row + hi * dm.d;
      for (int64_t c = 0; c < dm.d; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t sp = 0; sp < splits; ++sp)
          acc = _mm512_add_ps(acc, _mm512_loadu_ps(
              dq_all + ((i * splits + sp) * dm.n_pad + q0 + r) * dm.d_pad + c));
        StoreBf16(dst + c, _mm512_mul_ps(acc, vscale), TailMask(dm.d - c));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideomaeAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("slots")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideomaeAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("slots")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
