// Fused spatial pyramid pooling on the CPU (He et al. 2014, Sec. 2.3): all levels of all windows in
// one pass, reading the conv5 maps channels-last so the innermost loop runs over contiguous channels
// (auto-vectorised by the compiler) and the output is written once, in its final layout.
//
// Bins are the paper's: bin i of n over a length of w cells spans floor(i*w/n) .. ceil((i+1)*w/n)-1
// (0-based, inclusive), computed in exact integer arithmetic. A level m dividing the finest level n
// is the max over r x r blocks of fine bins (r = n / m; their union is exactly coarse bin i, see
// spp.py); other levels are pooled from the map directly. Ties keep the first cell in row-major
// scan order, like torchvision's roi_pool.
//
// Loaded by spp_det/ops/_ext.py with torch.ops.load_library; registers torch.ops.spp_det.pyramid_pool.
// Light headers rather than <ATen/ATen.h>: they halve the one-time compile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// A new [rows, cols] tensor on memory advised for transparent huge pages. The output of 2,000
// windows is 100 MB of fresh memory per call; faulting it in 4 KB pages cost ~130 ms (more than the
// pooling), in 2 MB pages ~10 ms. Plain empty() where huge pages are not available.
at::Tensor empty_huge(int64_t rows, int64_t cols, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(rows) * size_t(cols) * options.dtype().itemsize();
  if (bytes >= kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* data = nullptr;
    if (posix_memalign(&data, kHuge, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure leaves normal pages
      return at::from_blob(data, {rows, cols}, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty({rows, cols}, options);
}

// floor(a / b) and ceil(a / b) for a >= 0, b > 0.
inline int64_t floor_div(int64_t a, int64_t b) { return a / b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Everything per window is force-inlined into pool_window so that one wrapper compiled for AVX2
// (below) vectorises all of it 8 floats wide; the default build stays baseline x86-64 (SSE2), so
// the cached library runs on any CPU, and the AVX2 copy is chosen at run time.
#define SPP_INLINE inline __attribute__((always_inline))

// Max over the cells y0..y1, x0..x1 (inclusive) of an [H, W, C] map, channels c0 .. c0 + cb - 1
// (``map`` points at channel c0), into acc[cb] (and the winning flat cell index y * W + x into
// arg[cb] when Track).
template <typename T, bool Track>
SPP_INLINE void pool_bin(const T* map, int64_t W, int64_t stride, int64_t cb, int64_t y0, int64_t y1, int64_t x0,
                         int64_t x1, T* __restrict acc, int64_t* __restrict arg) {
  const T* first = map + (y0 * W + x0) * stride;
  std::copy(first, first + cb, acc);
  if (Track) std::fill(arg, arg + cb, y0 * W + x0);
  for (int64_t y = y0; y <= y1; ++y) {
    for (int64_t x = (y == y0 ? x0 + 1 : x0); x <= x1; ++x) {
      const T* __restrict cell = map + (y * W + x) * stride;
      if (Track) {
        const int64_t where = y * W + x;
        for (int64_t c = 0; c < cb; ++c) {
          if (cell[c] > acc[c]) {
            acc[c] = cell[c];
            arg[c] = where;
          }
        }
      } else {
        for (int64_t c = 0; c < cb; ++c) acc[c] = std::max(acc[c], cell[c]);  // first max kept on ties
      }
    }
  }
}

// All n x n bins of one level, bin-major: bins[(i * n + j) * cb + c].
template <typename T, bool Track>
SPP_INLINE void pool_level(const T* map, int64_t W, int64_t stride, int64_t cb, int64_t x1, int64_t y1, int64_t w,
                           int64_t h, int64_t n, T* bins, int64_t* args) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ys = y1 + floor_div(i * h, n), ye = y1 + ceil_div((i + 1) * h, n) - 1;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t xs = x1 + floor_div(j * w, n), xe = x1 + ceil_div((j + 1) * w, n) - 1;
      const int64_t bin = i * n + j;
      pool_bin<T, Track>(map, W, stride, cb, ys, ye, xs, xe, bins + bin * cb, Track ? args + bin * cb : nullptr);
    }
  }
}

// Level m = finest / r from the finest level's bins: the max over r x r blocks, in row-major order.
template <typename T, bool Track>
SPP_INLINE void coarsen(const T* fine, const int64_t* fine_arg, int64_t finest, int64_t m, int64_t cb, T* coarse,
                        int64_t* coarse_arg) {
  const int64_t r = finest / m;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      T* __restrict acc = coarse + (i * m + j) * cb;
      int64_t* __restrict acc_arg = Track ? coarse_arg + (i * m + j) * cb : nullptr;
      for (int64_t a = 0; a < r; ++a) {
        for (int64_t bb = 0; bb < r; ++bb) {
          const int64_t src = ((i * r + a) * finest + (j * r + bb)) * cb;
          const T* __restrict v = fine + src;
          if (a == 0 && bb == 0) {
            std::copy(v, v + cb, acc);
            if (Track) std::copy(fine_arg + src, fine_arg + src + cb, acc_arg);
          } else if (Track) {
            const int64_t* va = fine_arg + src;
            for (int64_t c = 0; c < cb; ++c) {
              // Equal maxima from different fine bins: keep the earlier cell in scan order, as a
              // direct pass over the coarse bin would.
              if (v[c] > acc[c] || (v[c] == acc[c] && va[c] < acc_arg[c])) {
                acc[c] = v[c];
                acc_arg[c] = va[c];
              }
            }
          } else {
            for (int64_t c = 0; c < cb; ++c) acc[c] = std::max(acc[c], v[c]);
          }
        }
      }
    }
  }
}

// Writes bins [n*n][cb] (bin-major) of one level into out[cb][n*n] (channel-major) and, when
// Track, the argmax as flat indices into the [N, C, H, W] features: (b * C + c) * H * W + cell.
template <typename T, bool Track>
SPP_INLINE void write_level(const T* bins, const int64_t* args, int64_t nn, int64_t cb, int64_t plane,
                            int64_t image_base, T* __restrict out, int64_t* __restrict out_arg) {
  for (int64_t c = 0; c < cb; ++c) {
    for (int64_t k = 0; k < nn; ++k) out[c * nn + k] = bins[k * cb + c];
  }
  if (Track) {
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t base = image_base + c * plane;
      for (int64_t k = 0; k < nn; ++k) out_arg[c * nn + k] = base + args[k * cb + c];
    }
  }
}

// Channels go in blocks of kBlock: the finest level's bins of one block (36 x 64 floats for the
// paper's pyramid) stay in L1, and reading them back channel-major for the output does not thrash
// it (a whole 256-channel row of bins is 36 KB at a 1 KB stride: 4x slower).
constexpr int64_t kBlock = 64;  // measured: 32 and 256 are slower, 128 about the same

// Everything about one window and one image's shapes; scratch holds 4 x finest^2 x kBlock values.
template <typename T>
struct Window {
  const T* image;           // [H, W, C] channels-last map of the window's image
  int64_t W, C, plane;      // map width, channels, H * W
  int64_t x1, y1, w, h;     // the window's first cell and size in cells
  int64_t image_base;       // b * C * H * W: flat offset of the image in [N, C, H, W]
  const int64_t* levels;    // pyramid levels, output order
  const int64_t* offset;    // column offset of each level in a pooled vector
  int64_t num_levels, finest;
  T* out;                   // [D] the window's pooled vector
  int64_t* out_arg;         // [D] its argmax (Track only)
  T* fine; T* other;        // scratch [finest^2][kBlock] each
  int64_t* fine_arg; int64_t* other_arg;
};

template <typename T, bool Track>
SPP_INLINE void pool_window(const Window<T>& q) {
  for (int64_t c0 = 0; c0 < q.C; c0 += kBlock) {
    const int64_t cb = std::min(kBlock, q.C - c0);
    const T* map = q.image + c0;
    const int64_t image_base = q.image_base + c0 * q.plane;
    pool_level<T, Track>(map, q.W, q.C, cb, q.x1, q.y1, q.w, q.h, q.finest, q.fine, q.fine_arg);
    for (int64_t l = 0; l < q.num_levels; ++l) {
      const int64_t m = q.levels[l];
      T* dst = q.out + q.offset[l] + c0 * m * m;  // channel-major within the level
      int64_t* dst_arg = Track ? q.out_arg + q.offset[l] + c0 * m * m : nullptr;
      if (m == q.finest) {
        write_level<T, Track>(q.fine, q.fine_arg, m * m, cb, q.plane, image_base, dst, dst_arg);
        continue;
      }
      if (q.finest % m == 0) {
        coarsen<T, Track>(q.fine, q.fine_arg, q.finest, m, cb, q.other, q.other_arg);
      } else {  // does not divide the finest level: pool the map directly
        pool_level<T, Track>(map, q.W, q.C, cb, q.x1, q.y1, q.w, q.h, m, q.other, q.other_arg);
      }
      write_level<T, Track>(q.other, q.other_arg, m * m, cb, q.plane, image_base, dst, dst_arg);
    }
  }
}

template <typename T, bool Track>
void pool_window_default(const Window<T>& q) { pool_window<T, Track>(q); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SPP_HAVE_AVX2 1
template <typename T, bool Track>
__attribute__((target("avx2"))) void pool_window_avx2(const Window<T>& q) { pool_window<T, Track>(q); }
#endif

template <typename T, bool Track>
void pyramid_pool_impl(const at::Tensor& maps, const at::Tensor& cells, const std::vector<int64_t>& levels,
                       at::Tensor& out, at::Tensor& argmax) {
  const int64_t H = maps.size(1), W = maps.size(2), C = maps.size(3);
  const int64_t K = cells.size(0), D = out.size(1), plane = H * W;
  const T* map_data = maps.data_ptr<T>();
  const int64_t* cell_data = cells.data_ptr<int64_t>();
  T* out_data = out.data_ptr<T>();
  int64_t* arg_data = Track ? argmax.data_ptr<int64_t>() : nullptr;
  const int64_t finest = *std::max_element(levels.begin(), levels.end());
  std::vector<int64_t> offset(levels.size());  // column offset of each level in a pooled vector
  int64_t total = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    offset[l] = total;
    total += C * levels[l] * levels[l];
  }
  TORCH_CHECK(total == D, "output width does not match the levels");
  void (*kernel)(const Window<T>&) = pool_window_default<T, Track>;
#ifdef SPP_HAVE_AVX2
  if (__builtin_cpu_supports("avx2")) kernel = pool_window_avx2<T, Track>;
#endif

  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    const int64_t scratch = finest * finest * kBlock;  // per-thread scratch
    std::vector<T> fine(scratch), other(scratch);
    std::vector<int64_t> fine_arg(Track ? scratch : 0), other_arg(Track ? scratch : 0);
    Window<T> q{};
    q.W = W, q.C = C, q.plane = plane, q.levels = levels.data(), q.offset = offset.data();
    q.num_levels = static_cast<int64_t>(levels.size()), q.finest = finest;
    q.fine = fine.data(), q.other = other.data(), q.fine_arg = fine_arg.data(), q.other_arg = other_arg.data();
    for (int64_t k = begin; k < end; ++k) {
      const int64_t* cell = cell_data + k * 5;
      const int64_t b = cell[0];
      q.image = map_data + b * plane * C;
      q.image_base = b * C * plane;
      q.x1 = cell[1], q.y1 = cell[2], q.w = cell[3] - cell[1] + 1, q.h = cell[4] - cell[2] + 1;
      q.out = out_data + k * D;
      q.out_arg = Track ? arg_data + k * D : nullptr;
      kernel(q);
    }
  });
}

// maps: [N, H, W, C] contiguous float/double (channels-last conv5); cells: [K, 5] int64
// (batch, x1, y1, x2, y2), validated by the caller. Returns (pooled [K, C * sum(n*n)], argmax
// [K, C * sum(n*n)] int64 flat indices into [N, C, H, W] when track_argmax, else an empty tensor).
std::tuple<at::Tensor, at::Tensor> pyramid_pool(const at::Tensor& maps, const at::Tensor& cells,
                                                at::IntArrayRef levels, bool track_argmax) {
  TORCH_CHECK(maps.device().is_cpu() && cells.device().is_cpu(), "pyramid_pool: CPU tensors only");
  TORCH_CHECK(maps.dim() == 4 && maps.is_contiguous(), "pyramid_pool: maps must be contiguous [N, H, W, C]");
  TORCH_CHECK(cells.dim() == 2 && cells.size(1) == 5 && cells.scalar_type() == at::kLong && cells.is_contiguous(),
              "pyramid_pool: cells must be contiguous int64 [K, 5]");
  TORCH_CHECK(!levels.empty(), "pyramid_pool: no levels");
  std::vector<int64_t> lv(levels.begin(), levels.end());
  int64_t bins = 0;
  for (int64_t n : lv) {
    TORCH_CHECK(n >= 1, "pyramid_pool: levels must be positive");
    bins += n * n;
  }
  const int64_t C = maps.size(3), K = cells.size(0);
  at::Tensor out = empty_huge(K, C * bins, maps.options());
  at::Tensor argmax = track_argmax ? empty_huge(K, C * bins, cells.options()) : at::empty({0}, cells.options());
  if (K == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "pyramid_pool", [&] {
    if (track_argmax) {
      pyramid_pool_impl<scalar_t, true>(maps, cells, lv, out, argmax);
    } else {
      pyramid_pool_impl<scalar_t, false>(maps, cells, lv, out, argmax);
    }
  });
  return {out, argmax};
}

}  // namespace

TORCH_LIBRARY(spp_det, m) {
  m.def("pyramid_pool(Tensor maps, Tensor cells, int[] levels, bool track_argmax) -> (Tensor, Tensor)");
  m.impl("pyramid_pool", c10::DispatchKey::CPU, TORCH_FN(pyramid_pool));
}
