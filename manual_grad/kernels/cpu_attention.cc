// Fused causal/full multi-head attention for CPUs, forward and hand-written backward, called
// from JAX through the XLA FFI (manual_grad/kernels/cpu_attention.py builds and registers it).
//
// Layout: q, k, v, out and their cotangents are time-major, (B, T, H, D): the layout of the
// projection x W_qkv that produces them and of the merged heads that W_o consumes, so XLA hands
// them over without transposing. lse is (B, H, T).
//
// One head, S = q k^T / sqrt(D), rho = softmax(mask(S)) row by row, Delta = dL/dout:
//   forward:  out = rho v; saves out and lse = m + log sum_j exp(S_ij - m)  (B, H, T)
//   backward: rho_ij = exp(S_ij - lse_i) recomputed tile by tile; delta_i = rowsum(Delta o out)
//             dv = rho^T Delta;  dS = rho o (Delta v^T - delta);  dq = dS k / sqrt(D);
//             dk = dS^T q / sqrt(D)
// The (T, T) matrix is never stored: tiles of BQ x BK scores live in a thread's cache.
// Work is split over XLA's own intra-op thread pool (no second pool to fight over the cores):
// the forward over (batch, head, query tile), the backward over (batch, head), each of which
// keeps its own dq accumulator, so no two threads write one row.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;     // BQ = BK: a 64 x 64 float tile is 16 KiB (L1)

// --- parallel loop on XLA's thread pool ----------------------------------------------------
//
// parallel_for(pool, n, make_worker): every thread that joins claims items 0..n-1 from an
// atomic counter; the first item it claims makes its worker (a callable holding that thread's
// scratch buffers). The caller works too and returns once every item is done, so a pool task
// that starts late finds nothing left and touches only the shared counters (never the caller's
// frame), and a pool with no free thread cannot deadlock the call.

struct LoopState {
  explicit LoopState(int64_t n) : n(n) {}
  const int64_t n;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable all_done;
};

template <typename MakeWorker>
void run_items(LoopState& state, MakeWorker& make_worker) {
  int64_t item = state.next.fetch_add(1);
  if (item >= state.n) return;
  auto worker = make_worker();
  for (; item < state.n; item = state.next.fetch_add(1)) {
    worker(item);
    if (state.done.fetch_add(1) + 1 == state.n) {
      std::lock_guard<std::mutex> lock(state.mutex);
      state.all_done.notify_all();
    }
  }
}

template <typename MakeWorker>
void parallel_for(ffi::ThreadPool& pool, int64_t n, MakeWorker make_worker) {
  auto state = std::make_shared<LoopState>(n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([state, &make_worker] { run_items(*state, make_worker); });
  run_items(*state, make_worker);
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done.load() == state->n; });
}

// --- vectors and a 4 x 2W register-tiled GEMM: C (+)= A B, all row-major --------------------

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(32), aligned(4))); static constexpr int W = 8; };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(32), aligned(8))); static constexpr int W = 4; };

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// One register tile: rows i..i+MR, columns j..j+2W of C (+)= op(A) B, where op(A) = A
// (A[i][p] at A[i * lda + p]) or, with TransA, A^T (A[i][p] at A[p * lda + i]).
template <typename T, int MR, bool TransA>
inline void micro_tile(int64_t i, int64_t j, int64_t k, const T* A, int64_t lda, const T* B,
                       int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V c[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c[r][0] = accumulate ? load(C + (i + r) * ldc + j) : V{};
    c[r][1] = accumulate ? load(C + (i + r) * ldc + j + W) : V{};
  }
  for (int64_t p = 0; p < k; ++p) {
    const V b0 = load(B + p * ldb + j), b1 = load(B + p * ldb + j + W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = TransA ? A[p * lda + i + r] : A[(i + r) * lda + p];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    store(C + (i + r) * ldc + j, c[r][0]);
    store(C + (i + r) * ldc + j + W, c[r][1]);
  }
}

// C[m x n] = (accumulate ? C : 0) + op(A)[m x k] B[k x n], row-major with leading dimensions
// lda, ldb, ldc; op(A) = A, or A^T with TransA (A stored k x m).
template <typename T, bool TransA = false>
void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc, bool accumulate) {
  constexpr int NR = 2 * Vec<T>::W;
  int64_t j = 0;
  for (; j + NR <= n; j += NR) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) micro_tile<T, 8, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
    for (; i + 4 <= m; i += 4) micro_tile<T, 4, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
    for (; i < m; ++i) micro_tile<T, 1, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
  }
  for (; j < n; ++j) {                       // the last n % NR columns
    for (int64_t i = 0; i < m; ++i) {
      T c = accumulate ? C[i * ldc + j] : T(0);
      for (int64_t p = 0; p < k; ++p) c += (TransA ? A[p * lda + i] : A[i * lda + p]) * B[p * ldb + j];
      C[i * ldc + j] = c;
    }
  }
}

// --- exp: vectorised for float (|rel err| < 2e-7 on [-87, 88]), libm for double ---------------

inline Vec<float>::type exp_vec(Vec<float>::type x) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(32)));
  const V hi = V{} + 88.0f, lo = V{} - 87.0f;
  const auto underflow = x < lo;                   // exp(-inf) of a masked score: exactly 0
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  // x = n ln2 + r, |r| <= ln2 / 2;  e^x = 2^n e^r
  V fn = x * 1.44269504088896341f;
  fn = fn + (fn >= 0 ? V{} + 0.5f : V{} - 0.5f);
  const VI n = __builtin_convertvector(fn, VI);
  const V nf = __builtin_convertvector(n, V);
  V r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? V{} : p * scale;
}

// row[j] = exp(row[j] - shift) for j < n; returns the sum.
inline float exp_row(float* row, int64_t n, float shift) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::W;
  V acc{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = exp_vec(load(row + j) - shift);
    store(row + j, e);
    acc += e;
  }
  float sum = 0;
  for (int w = 0; w < W; ++w) sum += acc[w];
  for (; j < n; ++j) sum += (row[j] = std::exp(row[j] - shift));
  return sum;
}

inline double exp_row(double* row, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] - shift));
  return sum;
}

// max_j row[j], vectorised (-inf entries included; n >= 1).
template <typename T>
inline T row_max(const T* row, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  T m = row[0];
  int64_t j = 0;
  if (n >= W) {
    V acc = load(row);
    for (j = W; j + W <= n; j += W) {
      const V x = load(row + j);
      acc = x > acc ? x : acc;
    }
    for (int w = 0; w < W; ++w) m = std::max(m, acc[w]);
  }
  for (; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// Scores of query rows [i0, i0+mq) against key rows [j0, j0+nk): S = Qs Kt, the causal mask
// applied as -inf (Qs: the query tile already scaled by 1/sqrt(D); Kt: that key tile's K^T,
// (D, kTile)).
template <typename T>
void tile_scores(const T* Qs, int64_t D, const T* Kt, int64_t i0, int64_t mq, int64_t j0,
                 int64_t nk, bool causal, T* S) {
  gemm<T>(mq, nk, D, Qs, D, Kt, kTile, S, nk, false);
  if (causal && j0 + nk - 1 > i0) {
    for (int64_t i = 0; i < mq; ++i)
      for (int64_t j = std::max<int64_t>(0, i0 + i - j0 + 1); j < nk; ++j)
        S[i * nk + j] = -std::numeric_limits<T>::infinity();
  }
}

struct Dims {
  int64_t B, H, T, D;
  int64_t C() const { return H * D; }        // row stride of every (B, T, H, D) array
  int64_t n_tiles() const { return (T + kTile - 1) / kTile; }
  int64_t offset(int64_t bh) const { return (bh / H) * T * C() + (bh % H) * D; }   // row 0 of a head
};

// Tiles of K^T (or V^T): block (b*H + h, key tile t) is x[b, tile t, h]^T, (D, kTile), zero-padded
// past T. Packed once, so every tile GEMM reads a contiguous 16 KiB block (rows of a (D, T)
// transpose would sit a power of two apart and collide in the cache).
template <typename T>
std::vector<T> transposed_tiles(ffi::ThreadPool& pool, const T* x, const Dims& d) {
  const int64_t n_tiles = d.n_tiles(), block = d.D * kTile, ld = d.C();
  std::vector<T> out(d.B * d.H * n_tiles * block, T(0));
  parallel_for(pool, d.B * d.H, [&] {
    return [&](int64_t bh) {
      const T* head = x + d.offset(bh);
      for (int64_t t = 0; t < n_tiles; ++t) {
        T* dst = out.data() + (bh * n_tiles + t) * block;
        for (int64_t j = 0; j < std::min(kTile, d.T - t * kTile); ++j)
          for (int64_t c = 0; c < d.D; ++c) dst[c * kTile + j] = head[(t * kTile + j) * ld + c];
      }
    };
  });
  return out;
}

// --- forward: one (batch, head, query tile) per work item ----------------------------------

template <typename T>
struct ForwardScratch {
  explicit ForwardScratch(const Dims& d)
      : Qs(kTile * d.D), S(kTile * kTile), acc(kTile * d.D), m(kTile), l(kTile) {}
  std::vector<T> Qs, S, acc, m, l;
};

// One query tile: online softmax over key tiles, m (row max), l (row sum of exp),
// acc = sum exp(S - m) v; then out = acc / l and lse = m + log l.
template <typename T>
void forward_tile(const T* q, const std::vector<T>& Kt, const T* v, const Dims& d, bool causal,
                  int64_t item, ForwardScratch<T>& w, T* out, T* lse) {
  const int64_t ld = d.C(), n_tiles = d.n_tiles();
  const int64_t bh = item / n_tiles, qt = n_tiles - 1 - item % n_tiles;   // longest rows first
  const int64_t i0 = qt * kTile, mq = std::min(kTile, d.T - i0), base = d.offset(bh);
  const T scale = T(1) / std::sqrt(T(d.D));
  for (int64_t i = 0; i < mq; ++i)
    for (int64_t c = 0; c < d.D; ++c) w.Qs[i * d.D + c] = q[base + (i0 + i) * ld + c] * scale;
  std::fill(w.acc.begin(), w.acc.end(), T(0));
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<T>::infinity());
  std::fill(w.l.begin(), w.l.end(), T(0));
  const int64_t k_end = causal ? i0 + mq : d.T;
  for (int64_t j0 = 0; j0 < k_end; j0 += kTile) {
    const int64_t nk = std::min(kTile, k_end - j0);
    tile_scores(w.Qs.data(), d.D, Kt.data() + (bh * n_tiles + j0 / kTile) * d.D * kTile, i0, mq,
                j0, nk, causal, w.S.data());
    for (int64_t i = 0; i < mq; ++i) {
      T* row = w.S.data() + i * nk;
      const T m_new = std::max(w.m[i], row_max(row, nk));   // key 0 is visible: finite
      const T correction = std::exp(w.m[i] - m_new);
      w.l[i] = w.l[i] * correction + exp_row(row, nk, m_new);
      w.m[i] = m_new;
      if (correction != T(1))
        for (int64_t c = 0; c < d.D; ++c) w.acc[i * d.D + c] *= correction;
    }
    gemm<T>(mq, d.D, nk, w.S.data(), nk, v + base + j0 * ld, ld, w.acc.data(), d.D, true);  // += rho v
  }
  for (int64_t i = 0; i < mq; ++i) {
    for (int64_t c = 0; c < d.D; ++c) out[base + (i0 + i) * ld + c] = w.acc[i * d.D + c] / w.l[i];
    lse[bh * d.T + i0 + i] = w.m[i] + std::log(w.l[i]);
  }
}

template <typename T>
void attention_forward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, const Dims& d,
                       bool causal, T* out, T* lse) {
  const std::vector<T> Kt = transposed_tiles(pool, k, d);
  parallel_for(pool, d.B * d.H * d.n_tiles(), [&] {
    return [&, w = ForwardScratch<T>(d)](int64_t item) mutable {
      forward_tile(q, Kt, v, d, causal, item, w, out, lse);
    };
  });
}

// --- backward: one (batch, head) per work item -----------------------------------------------

template <typename T>
struct BackwardScratch {
  explicit BackwardScratch(const Dims& d)
      : Qs(d.T * d.D), dq(d.T * d.D), delta(d.T), P(kTile * kTile), dP(kTile * kTile),
        dk(kTile * d.D), dv(kTile * d.D) {}
  std::vector<T> Qs, dq, delta, P, dP, dk, dv;
};

// The arrays of one call, each moved to one head's row 0 (rows C apart); Kt, Vt: the head's
// first tile block; lse: the head's row.
template <typename T>
struct Head {
  const T *q, *k, *o, *dO, *lse, *Kt, *Vt;
  T *dq, *dk, *dv;
};

// Key tile j0:j0+nk against query tile i0:i0+mq: accumulates dv, dk (of the key tile) and dq.
template <typename T>
void backward_tile(const Head<T>& x, const Dims& d, bool causal, int64_t i0, int64_t mq,
                   int64_t j0, int64_t nk, BackwardScratch<T>& w) {
  const int64_t ld = d.C(), block = (j0 / kTile) * d.D * kTile;
  T *P = w.P.data(), *dP = w.dP.data();
  tile_scores(w.Qs.data() + i0 * d.D, d.D, x.Kt + block, i0, mq, j0, nk, causal, P);
  for (int64_t i = 0; i < mq; ++i) exp_row(P + i * nk, nk, x.lse[i0 + i]);   // rho = exp(S - lse)
  gemm<T, true>(nk, d.D, mq, P, nk, x.dO + i0 * ld, ld, w.dv.data(), d.D, true);   // += rho^T Delta
  gemm<T>(mq, nk, d.D, x.dO + i0 * ld, ld, x.Vt + block, kTile, dP, nk, false);   // G = Delta v^T
  for (int64_t i = 0; i < mq; ++i)                       // dS = rho o (G - delta)
    for (int64_t j = 0; j < nk; ++j) P[i * nk + j] *= dP[i * nk + j] - w.delta[i0 + i];
  gemm<T>(mq, d.D, nk, P, nk, x.k + j0 * ld, ld, w.dq.data() + i0 * d.D, d.D, true);   // += dS k
  gemm<T, true>(nk, d.D, mq, P, nk, x.q + i0 * ld, ld, w.dk.data(), d.D, true);       // += dS^T q
}

template <typename T>
void backward_head(const Head<T>& x, const Dims& d, bool causal, BackwardScratch<T>& w) {
  const int64_t ld = d.C(), n_tiles = d.n_tiles();
  const T scale = T(1) / std::sqrt(T(d.D));
  for (int64_t i = 0; i < d.T; ++i) {
    T s = 0;
    for (int64_t c = 0; c < d.D; ++c) {
      w.Qs[i * d.D + c] = x.q[i * ld + c] * scale;
      s += x.dO[i * ld + c] * x.o[i * ld + c];
    }
    w.delta[i] = s;                                      // rowsum(Delta o out)
  }
  std::fill(w.dq.begin(), w.dq.end(), T(0));
  for (int64_t kt = 0; kt < n_tiles; ++kt) {
    const int64_t j0 = kt * kTile, nk = std::min(kTile, d.T - j0);
    std::fill(w.dk.begin(), w.dk.end(), T(0));
    std::fill(w.dv.begin(), w.dv.end(), T(0));
    for (int64_t qt = causal ? kt : 0; qt < n_tiles; ++qt)
      backward_tile(x, d, causal, qt * kTile, std::min(kTile, d.T - qt * kTile), j0, nk, w);
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < d.D; ++c) {
        x.dk[(j0 + j) * ld + c] = w.dk[j * d.D + c] * scale;
        x.dv[(j0 + j) * ld + c] = w.dv[j * d.D + c];
      }
  }
  for (int64_t i = 0; i < d.T; ++i)
    for (int64_t c = 0; c < d.D; ++c) x.dq[i * ld + c] = w.dq[i * d.D + c] * scale;
}

template <typename T>
void attention_backward(ffi::ThreadPool& pool, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, const T* dout, const Dims& d, bool causal, T* dq, T* dk,
                        T* dv) {
  const std::vector<T> Kt = transposed_tiles(pool, k, d), Vt = transposed_tiles(pool, v, d);
  const int64_t block = d.n_tiles() * d.D * kTile;
  parallel_for(pool, d.B * d.H, [&] {
    return [&, w = BackwardScratch<T>(d)](int64_t bh) mutable {
      const int64_t o = d.offset(bh);
      const Head<T> x{q + o, k + o, out + o, dout + o, lse + bh * d.T, Kt.data() + bh * block,
                      Vt.data() + bh * block, dq + o, dk + o, dv + o};
      backward_head(x, d, causal, w);
    };
  });
}

// --- FFI bindings: q, k, v, out, dout, dq, dk, dv (..., T, H, D); lse (..., H, T) ------------

ffi::Error dims_of(const ffi::AnyBuffer& q, Dims* d) {
  const auto shape = q.dimensions();
  if (shape.size() < 3) return ffi::Error::InvalidArgument("q must be (..., T, H, D)");
  const size_t r = shape.size();
  d->B = 1;
  for (size_t i = 0; i + 3 < r; ++i) d->B *= shape[i];
  d->T = shape[r - 3];
  d->H = shape[r - 2];
  d->D = shape[r - 1];
  return ffi::Error::Success();
}

template <typename T>
T* data(ffi::AnyBuffer& b) { return b.typed_data<T>(); }

template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& b) { return b->typed_data<T>(); }

template <typename T>
void forward_typed(ffi::ThreadPool& pool, ffi::AnyBuffer& q, ffi::AnyBuffer& k, ffi::AnyBuffer& v,
                   ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& lse,
                   const Dims& d, bool causal) {
  attention_forward(pool, data<T>(q), data<T>(k), data<T>(v), d, causal, data<T>(out), data<T>(lse));
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                        bool causal) {
  Dims d;
  if (auto e = dims_of(q, &d); e.failure()) return e;
  switch (q.element_type()) {
    case ffi::F32: forward_typed<float>(pool, q, k, v, out, lse, d, causal); break;
    case ffi::F64: forward_typed<double>(pool, q, k, v, out, lse, d, causal); break;
    default: return ffi::Error::InvalidArgument("cpu attention kernel: float32 or float64 only");
  }
  return ffi::Error::Success();
}

template <typename T>
void backward_typed(ffi::ThreadPool& pool, ffi::AnyBuffer& q, ffi::AnyBuffer& k, ffi::AnyBuffer& v,
                    ffi::AnyBuffer& out, ffi::AnyBuffer& lse, ffi::AnyBuffer& dout,
                    ffi::Result<ffi::AnyBuffer>& dq, ffi::Result<ffi::AnyBuffer>& dk,
                    ffi::Result<ffi::AnyBuffer>& dv, const Dims& d, bool causal) {
  attention_backward(pool, data<T>(q), data<T>(k), data<T>(v), data<T>(out), data<T>(lse),
                     data<T>(dout), d, causal, data<T>(dq), data<T>(dk), data<T>(dv));
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, bool causal) {
  Dims d;
  if (auto e = dims_of(q, &d); e.failure()) return e;
  switch (q.element_type()) {
    case ffi::F32: backward_typed<float>(pool, q, k, v, out, lse, dout, dq, dk, dv, d, causal); break;
    case ffi::F64: backward_typed<double>(pool, q, k, v, out, lse, dout, dq, dk, dv, d, causal); break;
    default: return ffi::Error::InvalidArgument("cpu attention kernel: float32 or float64 only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgAttentionForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()       // q
                                  .Arg<ffi::AnyBuffer>()       // k
                                  .Arg<ffi::AnyBuffer>()       // v
                                  .Ret<ffi::AnyBuffer>()       // out
                                  .Ret<ffi::AnyBuffer>()       // lse (..., H, T), row-major
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgAttentionBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()       // q
                                  .Arg<ffi::AnyBuffer>()       // k
                                  .Arg<ffi::AnyBuffer>()       // v
                                  .Arg<ffi::AnyBuffer>()       // out
                                  .Arg<ffi::AnyBuffer>()       // lse
                                  .Arg<ffi::AnyBuffer>()       // dout
                                  .Ret<ffi::AnyBuffer>()       // dq
                                  .Ret<ffi::AnyBuffer>()       // dk
                                  .Ret<ffi::AnyBuffer>()       // dv
                                  .Attr<bool>("causal"));
