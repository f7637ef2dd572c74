// Building blocks of the CPU kernels (cpu_attention.cc): a parallel loop on XLA's intra-op
// thread pool, a register-tiled GEMM (C (+)= op(A) B, row-major), a vectorised exp and row
// max, and the masked score tile of attention.
#ifndef MANUAL_GRAD_KERNELS_CPU_TILES_H_
#define MANUAL_GRAD_KERNELS_CPU_TILES_H_

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

namespace manual_grad_cpu {

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

// --- vectors and an 8 x 2W register-tiled GEMM: C (+)= A B, all row-major --------------------

// The widest vector the target has: 64 bytes with AVX-512 (32 registers, so the 8 x 2 tile of
// accumulators and its operands stay in registers), else 32.
#ifdef __AVX512F__
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// A vector of N lanes of T (loaded and stored unaligned, through memcpy).
template <typename T, int N>
struct Lanes { typedef T type __attribute__((vector_size(N * sizeof(T)), aligned(sizeof(T)))); };

template <typename T> struct Vec {
  static constexpr int W = kVecBytes / sizeof(T);
  typedef typename Lanes<T, W>::type type;
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// Horizontal sum and max of a vector of N lanes: halves added (or maxed) lane by lane, log2 N
// steps, instead of N dependent scalar operations.

template <typename T, int N, bool Max>
inline T reduce(typename Lanes<T, N>::type v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    typename Lanes<T, N / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce<T, N / 2, Max>(Max ? (lo > hi ? lo : hi) : lo + hi);
  }
}

template <typename T>
inline T sum_lanes(typename Vec<T>::type v) { return reduce<T, Vec<T>::W, false>(v); }

template <typename T>
inline T max_lanes(typename Vec<T>::type v) { return reduce<T, Vec<T>::W, true>(v); }

// One register tile: rows i..i+MR, columns j..j+NV*W of C (+)= op(A) B, where op(A) = A
// (A[i][p] at A[i * lda + p]) or, with TransA, A^T (A[i][p] at A[p * lda + i]).
template <typename T, int MR, int NV, bool TransA>
inline void micro_tile(int64_t i, int64_t j, int64_t k, const T* A, int64_t lda, const T* B,
                       int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? load(C + (i + r) * ldc + j + v * W) : V{};
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = load(B + p * ldb + j + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = TransA ? A[p * lda + i + r] : A[(i + r) * lda + p];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) store(C + (i + r) * ldc + j + v * W, c[r][v]);
}

// Rows 0..m of the column strip j..j+NV*W.
template <typename T, int NV, bool TransA>
inline void column_strip(int64_t m, int64_t j, int64_t k, const T* A, int64_t lda, const T* B,
                         int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) micro_tile<T, 8, NV, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
  for (; i + 4 <= m; i += 4) micro_tile<T, 4, NV, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
  for (; i < m; ++i) micro_tile<T, 1, NV, TransA>(i, j, k, A, lda, B, ldb, C, ldc, accumulate);
}

// C[m x n] = (accumulate ? C : 0) + op(A)[m x k] B[k x n], row-major with leading dimensions
// lda, ldb, ldc; op(A) = A, or A^T with TransA (A stored k x m). Strips of two vectors, then
// one, then the last n % W columns one by one.
template <typename T, bool TransA = false>
void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::W;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) column_strip<T, 2, TransA>(m, j, k, A, lda, B, ldb, C, ldc, accumulate);
  for (; j + W <= n; j += W) column_strip<T, 1, TransA>(m, j, k, A, lda, B, ldb, C, ldc, accumulate);
  for (; j < n; ++j) {
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
  using VI = Lanes<int32_t, Vec<float>::W>::type;
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
  float sum = sum_lanes<float>(acc);
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
    m = max_lanes<T>(acc);
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

}  // namespace manual_grad_cpu

#endif  // MANUAL_GRAD_KERNELS_CPU_TILES_H_
