// Fused causal/full multi-head attention for CPUs, forward and hand-written backward, called
// from JAX through the XLA FFI (manual_grad/kernels/cpu_attention.py builds and registers it).
//
// Layout: time-major. q, k, v arrive packed as the projection x W_qkv makes them, qkv
// (B, T, 3, H, D), and their cotangents leave as one dqkv of that shape; out and its
// cotangent are (B, T, H, D), the merged heads that W_o consumes. So XLA hands the arrays over
// without slicing, concatenating or transposing them. lse is (B, H, T).
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_tiles.h"

namespace {

using namespace manual_grad_cpu;  // NOLINT: the tiles, GEMM and exp of cpu_tiles.h

struct Dims {
  int64_t B, H, T, D;
  int64_t C() const { return H * D; }        // row stride of out and dout, (B, T, H, D)
  int64_t ld() const { return 3 * C(); }     // row stride of qkv and dqkv, (B, T, 3, H, D)
  int64_t n_tiles() const { return (T + kTile - 1) / kTile; }
  int64_t offset(int64_t bh) const { return (bh / H) * T * C() + (bh % H) * D; }   // row 0 of a head
  int64_t qkv_offset(int64_t bh) const { return (bh / H) * T * ld() + (bh % H) * D; }   // q's; k +C, v +2C
};

// Tiles of K^T (or V^T; x points at k or v in qkv): block (b*H + h, key tile t) is
// x[b, tile t, h]^T, (D, kTile), zero-padded
// past T. Packed once, so every tile GEMM reads a contiguous 16 KiB block (rows of a (D, T)
// transpose would sit a power of two apart and collide in the cache).
template <typename T>
std::vector<T> transposed_tiles(ffi::ThreadPool& pool, const T* x, const Dims& d) {
  const int64_t n_tiles = d.n_tiles(), block = d.D * kTile, ld = d.ld();
  std::vector<T> out(d.B * d.H * n_tiles * block, T(0));
  parallel_for(pool, d.B * d.H, [&] {
    return [&](int64_t bh) {
      const T* head = x + d.qkv_offset(bh);
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
  const int64_t ld = d.ld(), ldo = d.C(), n_tiles = d.n_tiles();
  const int64_t bh = item / n_tiles, qt = n_tiles - 1 - item % n_tiles;   // longest rows first
  const int64_t i0 = qt * kTile, mq = std::min(kTile, d.T - i0), base = d.qkv_offset(bh);
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
      const T correction = m_new == w.m[i] ? T(1) : std::exp(w.m[i] - m_new);
      w.l[i] = w.l[i] * correction + exp_row(row, nk, m_new);
      w.m[i] = m_new;
      if (correction != T(1))
        for (int64_t c = 0; c < d.D; ++c) w.acc[i * d.D + c] *= correction;
    }
    gemm<T>(mq, d.D, nk, w.S.data(), nk, v + base + j0 * ld, ld, w.acc.data(), d.D, true);  // += rho v
  }
  for (int64_t i = 0; i < mq; ++i) {
    for (int64_t c = 0; c < d.D; ++c) out[d.offset(bh) + (i0 + i) * ldo + c] = w.acc[i * d.D + c] / w.l[i];
    lse[bh * d.T + i0 + i] = w.m[i] + std::log(w.l[i]);
  }
}

template <typename T>
void attention_forward(ffi::ThreadPool& pool, const T* qkv, const Dims& d, bool causal, T* out,
                       T* lse) {
  const T *q = qkv, *v = qkv + 2 * d.C();
  const std::vector<T> Kt = transposed_tiles(pool, qkv + d.C(), d);
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

// The arrays of one call, each moved to one head's row 0 (q, k, dq, dk, dv rows 3C apart, o and
// dO rows C apart); Kt, Vt: the head's first tile block; lse: the head's row.
template <typename T>
struct Head {
  const T *q, *k, *o, *dO, *lse, *Kt, *Vt;
  T *dq, *dk, *dv;
};

// Key tile j0:j0+nk against query tile i0:i0+mq: accumulates dv, dk (of the key tile) and dq.
template <typename T>
void backward_tile(const Head<T>& x, const Dims& d, bool causal, int64_t i0, int64_t mq,
                   int64_t j0, int64_t nk, BackwardScratch<T>& w) {
  const int64_t ld = d.ld(), ldo = d.C(), block = (j0 / kTile) * d.D * kTile;
  T *P = w.P.data(), *dP = w.dP.data();
  tile_scores(w.Qs.data() + i0 * d.D, d.D, x.Kt + block, i0, mq, j0, nk, causal, P);
  for (int64_t i = 0; i < mq; ++i) exp_row(P + i * nk, nk, x.lse[i0 + i]);   // rho = exp(S - lse)
  gemm<T, true>(nk, d.D, mq, P, nk, x.dO + i0 * ldo, ldo, w.dv.data(), d.D, true);   // += rho^T Delta
  gemm<T>(mq, nk, d.D, x.dO + i0 * ldo, ldo, x.Vt + block, kTile, dP, nk, false);   // G = Delta v^T
  for (int64_t i = 0; i < mq; ++i)                       // dS = rho o (G - delta)
    for (int64_t j = 0; j < nk; ++j) P[i * nk + j] *= dP[i * nk + j] - w.delta[i0 + i];
  gemm<T>(mq, d.D, nk, P, nk, x.k + j0 * ld, ld, w.dq.data() + i0 * d.D, d.D, true);   // += dS k
  gemm<T, true>(nk, d.D, mq, P, nk, x.q + i0 * ld, ld, w.dk.data(), d.D, true);       // += dS^T q
}

template <typename T>
void backward_head(const Head<T>& x, const Dims& d, bool causal, BackwardScratch<T>& w) {
  const int64_t ld = d.ld(), ldo = d.C(), n_tiles = d.n_tiles();
  const T scale = T(1) / std::sqrt(T(d.D));
  for (int64_t i = 0; i < d.T; ++i) {
    T s = 0;
    for (int64_t c = 0; c < d.D; ++c) {
      w.Qs[i * d.D + c] = x.q[i * ld + c] * scale;
      s += x.dO[i * ldo + c] * x.o[i * ldo + c];
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
void attention_backward(ffi::ThreadPool& pool, const T* qkv, const T* out, const T* lse,
                        const T* dout, const Dims& d, bool causal, T* dqkv) {
  const int64_t C = d.C(), block = d.n_tiles() * d.D * kTile;
  const std::vector<T> Kt = transposed_tiles(pool, qkv + C, d), Vt = transposed_tiles(pool, qkv + 2 * C, d);
  parallel_for(pool, d.B * d.H, [&] {
    return [&, w = BackwardScratch<T>(d)](int64_t bh) mutable {
      const int64_t i = d.qkv_offset(bh), o = d.offset(bh);
      const Head<T> x{qkv + i, qkv + i + C, out + o, dout + o, lse + bh * d.T, Kt.data() + bh * block,
                      Vt.data() + bh * block, dqkv + i, dqkv + i + C, dqkv + i + 2 * C};
      backward_head(x, d, causal, w);
    };
  });
}

// --- FFI bindings: qkv, dqkv (..., T, 3, H, D); out, dout (..., T, H, D); lse (..., H, T) ---

ffi::Error dims_of(const ffi::AnyBuffer& qkv, Dims* d) {
  const auto shape = qkv.dimensions();
  const size_t r = shape.size();
  if (r < 4 || shape[r - 3] != 3) return ffi::Error::InvalidArgument("qkv must be (..., T, 3, H, D)");
  d->B = 1;
  for (size_t i = 0; i + 4 < r; ++i) d->B *= shape[i];
  d->T = shape[r - 4];
  d->H = shape[r - 2];
  d->D = shape[r - 1];
  return ffi::Error::Success();
}

template <typename T>
T* data(ffi::AnyBuffer& b) { return b.typed_data<T>(); }

template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& b) { return b->typed_data<T>(); }

// Runs run(T{}) with T = float or double, the element type of q: one dtype switch for both
// entry points.
template <typename Run>
ffi::Error for_dtype(const ffi::AnyBuffer& q, Run&& run) {
  switch (q.element_type()) {
    case ffi::F32: run(float{}); return ffi::Error::Success();
    case ffi::F64: run(double{}); return ffi::Error::Success();
    default: return ffi::Error::InvalidArgument("cpu attention kernel: float32 or float64 only");
  }
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, bool causal) {
  Dims d;
  if (auto e = dims_of(qkv, &d); e.failure()) return e;
  return for_dtype(qkv, [&](auto zero) {
    using T = decltype(zero);
    attention_forward(pool, data<T>(qkv), d, causal, data<T>(out), data<T>(lse));
  });
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer out,
                         ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dqkv,
                         bool causal) {
  Dims d;
  if (auto e = dims_of(qkv, &d); e.failure()) return e;
  return for_dtype(qkv, [&](auto zero) {
    using T = decltype(zero);
    attention_backward(pool, data<T>(qkv), data<T>(out), data<T>(lse), data<T>(dout), d, causal,
                       data<T>(dqkv));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgAttentionForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()       // qkv (..., T, 3, H, D)
                                  .Ret<ffi::AnyBuffer>()       // out
                                  .Ret<ffi::AnyBuffer>()       // lse (..., H, T), row-major
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MgAttentionBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()       // qkv
                                  .Arg<ffi::AnyBuffer>()       // out
                                  .Arg<ffi::AnyBuffer>()       // lse
                                  .Arg<ffi::AnyBuffer>()       // dout
                                  .Ret<ffi::AnyBuffer>()       // dqkv (..., T, 3, H, D)
                                  .Attr<bool>("causal"));
