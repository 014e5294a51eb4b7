// What the quantized linear layers of every family share (int8.cpp, int4.cpp): the
// driver that cuts y[M, N] = x[M, K] . W^T into threads (tasks of a few 16-row panels)
// and register tiles (MB rows of x by NB panels), picks the tile instance for the
// ragged edges, and stores the results with the bias in y's dtype.
// Included by the per-ISA copies only; everything lives in lowbit::cpu::LOWBIT_ISA.
#pragma once
#include "rows.h"

namespace lowbit::cpu::LOWBIT_ISA {

constexpr int kPanelRows = 16;     // every CPU weight layout groups output rows by 16
constexpr int kTaskPanels = 4;     // 64 output rows per thread task

// The arguments every linear kernel takes besides its weights. x: [M, K] rows ldx elements
// apart; y: [M, N] rows ldy apart, both of dtype x_dtype; bias: [N] of bias_dtype or null.
struct LinearArgs {
  const void* x;
  int x_dtype;
  int64_t M, K, ldx;
  int64_t N;
  const void* bias;
  int bias_dtype;
  void* y;
  int64_t ldy;
  int nthreads;
};

inline int check_linear_args(const LinearArgs& a) {
  if (!a.x || !a.y) return kInvalidArgument;
  if (a.M < 0 || a.K <= 0 || a.N <= 0 || a.ldx < a.K || a.ldy < a.N) return kInvalidArgument;
  if (!valid_dtype(a.x_dtype) || (a.bias && !valid_dtype(a.bias_dtype))) return kInvalidArgument;
  return kOk;
}

// Columns of output panel p that exist (16, or fewer in the last panel).
inline int panel_cols(const LinearArgs& a, int64_t p) {
  return static_cast<int>(std::min<int64_t>(kPanelRows, a.N - p * kPanelRows));
}

// yrow[col0 + i] = acc[i] + bias[col0 + i] in y's dtype, for the `cols` columns of a panel.
inline void store_panel_row(const LinearArgs& a, const float* acc, int64_t col0, int cols, void* yrow) {
  if (cols == kPanelRows) {
    for (int i = 0; i < kPanelRows; i += kW) {
      VF v = vf_load(acc + i);
      if (a.bias) v = vf_add(v, load_vec(a.bias, a.bias_dtype, col0 + i));
      store_vec(yrow, a.x_dtype, col0 + i, v);
    }
    return;
  }
  for (int i = 0; i < cols; ++i) {
    float v = acc[i];
    if (a.bias) v += load_elem(a.bias, a.bias_dtype, col0 + i);
    store_elem(yrow, a.x_dtype, col0 + i, v);
  }
}

// Picks the tile instance for a (possibly partial) mb x nb tile: T::tile<MB, NB> writes
// out[m * T::kNB + n][0..16) = the fp32 results (before bias) of row m0 + m, panel p0 + n.
template <class T, int MB = T::kMB, int NB = T::kNB>
void run_tile(const T& t, int mb, int nb, int64_t m0, int64_t p0, float (*out)[kPanelRows]) {
  if constexpr (MB > 1) {
    if (mb < MB) return run_tile<T, MB - 1, NB>(t, mb, nb, m0, p0, out);
  }
  if constexpr (NB > 1) {
    if (nb < NB) return run_tile<T, MB, NB - 1>(t, mb, nb, m0, p0, out);
  }
  t.template tile<MB, NB>(m0, p0, out);
}

// The driver: threads take tasks of kTaskPanels panels; inside a task the rows of x go
// by T::kMB and the panels by T::nb_for(mb) <= T::kNB (decode-sized tiles may span more panels).
template <class T>
void run_panels(const LinearArgs& a, const T& t) {
  const int64_t npanels = (a.N + kPanelRows - 1) / kPanelRows;
  const size_t ysize = elem_size(a.x_dtype);
  int64_t tasks = (npanels + kTaskPanels - 1) / kTaskPanels;
  parallel_for(tasks, a.nthreads, [&](int64_t task) {
    const int64_t p_end = std::min(npanels, (task + 1) * kTaskPanels);
    for (int64_t m0 = 0; m0 < a.M; m0 += T::kMB) {
      const int mb = static_cast<int>(std::min<int64_t>(T::kMB, a.M - m0));
      const int nb_step = T::nb_for(mb);
      for (int64_t p0 = task * kTaskPanels; p0 < p_end; p0 += nb_step) {
        const int nb = static_cast<int>(std::min<int64_t>(nb_step, p_end - p0));
        alignas(64) float out[T::kMB * T::kNB][kPanelRows];
        run_tile(t, mb, nb, m0, p0, out);
        for (int n = 0; n < nb; ++n)
          for (int m = 0; m < mb; ++m)
            store_panel_row(a, out[m * T::kNB + n], (p0 + n) * kPanelRows, panel_cols(a, p0 + n),
                            static_cast<char*>(a.y) + (m0 + m) * a.ldy * ysize);
      }
    }
  });
}

}  // namespace lowbit::cpu::LOWBIT_ISA
