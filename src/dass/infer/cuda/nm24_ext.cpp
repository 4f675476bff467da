// Python binding of the 2:4 CUDA kernels: checks the arguments (every refusal names what is
// wrong), allocates the output (and the split-K workspace) and launches on torch's stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "nm24_params.h"

namespace {

// Split-K arrival counters of the register and shared-memory kernels: zero between calls (each
// call's last block resets its own), so they are allocated and zeroed once per device and kept
// for the life of the process. Calls take their counters round-robin from kRegions regions, so
// products that run at the same time on different streams (or inside one CUDA graph) do not
// share counters unless more than kRegions are in flight at once.
//
// They are a raw cudaMalloc, not a torch tensor: a tensor made by the first split-K call lands
// in whatever memory pool PyTorch's allocator is routing to at that moment, which inside a
// compiled step's CUDA-graph warm-up is Inductor's graph pool; the pool does not know the
// tensor is alive, may hand its bytes to other tensors, and frees them with the graphs.
constexpr int kRegions = 64;
constexpr int kRegionSize = 4096;  // row blocks one split-K call may have

int* counters_for(const torch::Tensor& like, int64_t blocks) {
  static std::mutex mu;
  static std::vector<int*> per_device;
  static std::vector<int> next;
  TORCH_CHECK(blocks <= kRegionSize, "dass nm24 cuda: ", blocks, " row blocks need more split-K counters than ",
              kRegionSize, " (use splits=1)");
  std::lock_guard<std::mutex> lock(mu);
  const int dev = like.get_device();
  if ((int)per_device.size() <= dev) {
    per_device.resize(dev + 1, nullptr);
    next.resize(dev + 1, 0);
  }
  if (per_device[dev] == nullptr) {
    // cudaMalloc and a synchronous zeroing are not allowed while a stream is being captured
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "dass nm24 cuda: the first split-K call on a device must run outside CUDA-graph capture "
                "(run the product once eagerly first)");
    const c10::cuda::CUDAGuard guard(like.device());
    const size_t bytes = sizeof(int) * (size_t)kRegions * kRegionSize;
    int* ptr = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&ptr, bytes));
    C10_CUDA_CHECK(cudaMemset(ptr, 0, bytes));
    C10_CUDA_CHECK(cudaDeviceSynchronize());  // zero before any stream's first use
    per_device[dev] = ptr;
  }
  const int r = next[dev];
  next[dev] = (r + 1) % kRegions;
  return per_device[dev] + (int64_t)r * kRegionSize;
}

// The kernels read x in 16-byte pieces (cp.async): a contiguous x whose storage starts off a
// 16-byte boundary (a view at an odd offset) is copied to an aligned tensor first.
torch::Tensor aligned_tokens(const torch::Tensor& x) {
  torch::Tensor c = x.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The checks every product shares: x is [T, K], 16-bit, on the GPU; the packed operands are
// contiguous int32 there too.
void check_operands(const torch::Tensor& x, const torch::Tensor& vals, const torch::Tensor& meta) {
  TORCH_CHECK(x.is_cuda() && vals.is_cuda() && meta.is_cuda(), "dass nm24 cuda: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2, "dass nm24 cuda: x must be [T, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf,
              "dass nm24 cuda: x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(vals.scalar_type() == torch::kInt && meta.scalar_type() == torch::kInt,
              "dass nm24 cuda: packed values and metadata must be int32");
  TORCH_CHECK(vals.is_contiguous() && meta.is_contiguous(), "dass nm24 cuda: packed tensors must be contiguous");
}

// The packed operands hold an [N, K] matrix of this orientation (0 input, 1 output) and the
// shape fits its tiles (16 rows and groups of 64 along K, or 32 rows and 32 along K);
// returns the rows of one tile.
int64_t packed_rows(const torch::Tensor& vals, const torch::Tensor& meta, int64_t N, int64_t K, int64_t orientation) {
  const int64_t rows = orientation == 0 ? 16 : 32;
  const int64_t kmul = orientation == 0 ? 64 : 32;
  TORCH_CHECK(N % rows == 0 && K % kmul == 0, "dass nm24 cuda: shape [", N, ", ", K, "] needs N % ", rows,
              " == 0 and K % ", kmul, " == 0");
  TORCH_CHECK(vals.numel() * 4 == N * K, "dass nm24 cuda: values hold ", vals.numel() * 4, " bytes, [", N, ", ", K,
              "] needs ", N * K);
  TORCH_CHECK(meta.numel() * 32 == N * K, "dass nm24 cuda: metadata holds ", meta.numel() * 4, " bytes, [", N, ", ",
              K, "] needs ", N * K / 8);
  return rows;
}

// The wgmma kernels run on compute capability 9.0 only (sm_90a).
void check_sm90(const torch::Tensor& x, const char* what) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device());
  TORCH_CHECK(major == 9 && minor == 0, "dass nm24 cuda: ", what, " needs compute capability 9.0, got ", major, ".",
              minor);
}

// K-steps of 32 a K-slice (a multiple of ks) and the number of slices when a call asks for
// `splits` of them (fewer where the K-steps run out).
std::pair<int64_t, int64_t> k_slices(int64_t K, int64_t ks, int64_t splits) {
  const int64_t ksteps = K / 32;
  TORCH_CHECK(ks == 2 || ks == 4, "dass nm24 cuda: ks must be 2 or 4");
  TORCH_CHECK(ksteps % ks == 0, "dass nm24 cuda: K / 32 = ", ksteps, " is not a multiple of ks = ", ks);
  TORCH_CHECK(splits >= 1, "dass nm24 cuda: splits must be >= 1");
  int64_t sps = (ksteps + splits - 1) / splits;
  sps = (sps + ks - 1) / ks * ks;
  const int64_t nsplit = (ksteps + sps - 1) / sps;
  return {sps, nsplit};
}

// The launch arguments every kernel takes (the caller adds the split-K workspace and counters).
dass24::Params params_for(const torch::Tensor& x, const torch::Tensor& vals, const torch::Tensor& meta,
                          const torch::Tensor& y, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t sps,
                          int64_t wg_swap) {
  dass24::Params p;
  p.vals = reinterpret_cast<const uint4*>(vals.data_ptr<int>());
  p.meta = reinterpret_cast<const uint32_t*>(meta.data_ptr<int>());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.ws = nullptr;
  p.bias = nullptr;
  p.counters = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_cuda(),
                "dass nm24 cuda: bias must be [N] of x's dtype on the GPU");
    p.bias = bias->contiguous().data_ptr();
  }
  p.N = (int)N;
  p.K = (int)x.size(1);
  p.T = (int)x.size(0);
  p.steps_per_split = (int)sps;
  p.wg_swap = (int)wg_swap;
  p.act = -1;
  p.pdl = 0;
  return p;
}

// y = ws (+ bias): the end of a product whose K-slices added into the fp32 workspace.
void finish(const dass24::Params& p, bool bf, cudaStream_t stream) {
  const cudaError_t err = bf ? dass24::finish_bf16(p.ws, p.bias, p.y, p.N, (long)p.T * p.N, stream)
                             : dass24::finish_f16(p.ws, p.bias, p.y, p.N, (long)p.T * p.N, stream);
  TORCH_CHECK(err == cudaSuccess, "dass nm24 cuda: finish failed: ", cudaGetErrorString(err));
}

// act >= 0: the matrix is a stacked [gate; up] (N = 2 D) and the result is act(gate) * up,
// [T, D] (act 0 silu, 1 gelu tanh; even mt, compiled GLU configurations only). pdl = 1: the
// launch lets the kernel start while the one before it finishes (compute capability 9.0).
// deep = 1: the deep variant (DEEP_CONFIGS, 57-128 tokens; no GLU).
torch::Tensor mm(torch::Tensor x, torch::Tensor vals, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                 int64_t N, int64_t orientation, int64_t mt, int64_t ks, int64_t splits, int64_t wr, int64_t wt,
                 int64_t nt_min, int64_t act, int64_t pdl, int64_t deep) {
  check_operands(x, vals, meta);
  TORCH_CHECK(orientation == 0 || orientation == 1, "dass nm24 cuda: orientation must be 0 (input) or 1 (output)");
  x = aligned_tokens(x);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(T >= 1 && T <= 128, "dass nm24 cuda: 1 to 128 tokens per call, got ", T);
  const int64_t rows = packed_rows(vals, meta, N, K, orientation);
  TORCH_CHECK(act >= -1 && act <= 1, "dass nm24 cuda: act must be -1 (none), 0 (silu) or 1 (gelu tanh)");
  const bool glu = act >= 0;
  TORCH_CHECK(!(glu && deep), "dass nm24 cuda: the deep variant has no GLU epilogue");
  TORCH_CHECK(!glu || (N % (2 * rows) == 0 && mt % 2 == 0), "dass nm24 cuda: the GLU epilogue needs N % ", 2 * rows,
              " == 0 (a whole number of gate tiles) and an even mt, got N=", N, " mt=", mt);
  const auto [sps, nsplit] = k_slices(K, ks, splits);
  // nt_min: the slices of a longer call all run the configuration of its first slice
  TORCH_CHECK(nt_min >= 0 && nt_min <= 16, "dass nm24 cuda: nt_min must be 0 to 16");
  const int nt = pow2_at_least(std::max((int)((T + 7) / 8), (int)nt_min));
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto y = torch::empty({T, glu ? N / 2 : N}, x.options());
  torch::Tensor ws;
  dass24::Params p = params_for(x, vals, meta, y, bias, N, sps, 0);
  p.act = (int)act;
  p.pdl = (int)pdl;
  if (nsplit > 1) {
    // each K-slice of a block stores its partials (block rows x the block's nt * 8 tokens,
    // fp32) and the last to arrive adds them up (nm24_kernels.cuh): nothing to zero first
    TORCH_CHECK(wr >= 1 && mt >= 1 && nt >= 1, "dass nm24 cuda: bad warp shape");
    const int64_t block_rows = wr * mt * rows;
    const int64_t blocks = (N + block_rows - 1) / block_rows;
    ws = torch::empty({nsplit * blocks * block_rows * nt * 8}, x.options().dtype(torch::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = counters_for(x, blocks);
  }
  // the unit of this (variant, orientation, dtype): plain, GLU epilogue, deep variant
  using Run = cudaError_t (*)(int, int, int, int, int, const dass24::Params&, int, cudaStream_t);
  static constexpr Run kRuns[3][2][2] = {
      {{dass24::run_in_bf16, dass24::run_in_f16}, {dass24::run_out_bf16, dass24::run_out_f16}},
      {{dass24::run_glu_in_bf16, dass24::run_glu_in_f16}, {dass24::run_glu_out_bf16, dass24::run_glu_out_f16}},
      {{dass24::run_deep_in_bf16, dass24::run_deep_in_f16}, {dass24::run_deep_out_bf16, dass24::run_deep_out_f16}},
  };
  const bool bf = x.scalar_type() == torch::kBFloat16;
  const cudaError_t err = kRuns[deep ? 2 : glu ? 1 : 0][orientation][bf ? 0 : 1](mt, nt, ks, wr, wt, p, nsplit, stream);
  TORCH_CHECK(err == cudaSuccess, "dass nm24 cuda: launch failed (orientation ", orientation, glu ? ", GLU" : "", deep ? ", deep" : "",
              ", mt=", mt, " nt=", nt, " ks=", ks, " wr=", wr, " wt=", wt,
              "; a configuration that is not compiled answers 'invalid argument'): ",
              cudaGetErrorString(err));
  return y;
}

// The two staged kernels: kind 0 = shared-memory kernel (nm24_smem.cuh, 8 warps a block, wn of
// them along the tokens); kind 1 = wgmma kernel (nm24_wg.cuh, output orientation, sm_90a; wn
// is then the number of warpgroups a block, wg_swap the descriptor probe).
torch::Tensor mm_staged(int kind, torch::Tensor x, torch::Tensor vals, torch::Tensor meta,
                        c10::optional<torch::Tensor> bias, int64_t N, int64_t orientation, int64_t mt, int64_t wn,
                        int64_t ks, int64_t splits, int64_t wg_swap, int64_t ts = 1) {
  check_operands(x, vals, meta);
  TORCH_CHECK(orientation == 0 || orientation == 1, "dass nm24 cuda: orientation must be 0 (input) or 1 (output)");
  if (kind == 0) {
    TORCH_CHECK(wn == 1 || wn == 2 || wn == 4, "dass nm24 cuda: wn must be 1, 2 or 4");
  } else {
    TORCH_CHECK(orientation == 1, "dass nm24 cuda: the wgmma kernel runs the output orientation only");
    TORCH_CHECK(wn == 1 || wn == 2, "dass nm24 cuda: wg (warpgroups a block) must be 1 or 2");
    check_sm90(x, "the wgmma kernel");
  }
  x = aligned_tokens(x);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(T >= 1 && T <= 128, "dass nm24 cuda: 1 to 128 tokens per call, got ", T);
  const int64_t rows = packed_rows(vals, meta, N, K, orientation);
  const auto [sps, nsplit] = k_slices(K, ks, splits);
  const int nt = pow2_at_least((int)((T + 7) / 8));
  TORCH_CHECK(kind == 1 || nt % wn == 0, "dass nm24 cuda: ", nt, " token tiles cannot be split over wn = ", wn, " warps");
  const int64_t tiles = kind == 0 ? (8 / wn) * mt : wn * 4 * mt;  // row tiles of a block
  const int64_t block_rows = tiles * rows;
  const int64_t blocks = (N / rows + tiles - 1) / tiles;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto y = torch::empty({T, N}, x.options());
  torch::Tensor ws;
  dass24::Params p = params_for(x, vals, meta, y, bias, N, sps, wg_swap);
  if (nsplit > 1) {
    ws = torch::empty({nsplit * blocks * block_rows * nt * 8}, x.options().dtype(torch::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = counters_for(x, blocks);
  }
  const bool bf = x.scalar_type() == torch::kBFloat16;
  cudaError_t err;
  if (kind == 1)
    err = bf ? dass24::run_wg_out_bf16(mt, wn, ts, nt, ks, p, nsplit, stream)
             : dass24::run_wg_out_f16(mt, wn, ts, nt, ks, p, nsplit, stream);
  else if (orientation == 0)
    err = bf ? dass24::run_smem_in_bf16(mt, wn, nt, ks, p, nsplit, stream)
             : dass24::run_smem_in_f16(mt, wn, nt, ks, p, nsplit, stream);
  else
    err = bf ? dass24::run_smem_out_bf16(mt, wn, nt, ks, p, nsplit, stream)
             : dass24::run_smem_out_f16(mt, wn, nt, ks, p, nsplit, stream);
  TORCH_CHECK(err == cudaSuccess, "dass nm24 cuda: launch failed (", kind == 0 ? "shared-memory" : "wgmma", " kernel, orientation ", orientation,
              ", mt=", mt, " wn=", wn, " nt=", nt, " ks=", ks,
              "; a configuration that is not compiled answers 'invalid argument'): ", cudaGetErrorString(err));
  return y;
}

torch::Tensor mm_smem(torch::Tensor x, torch::Tensor vals, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                      int64_t N, int64_t orientation, int64_t mt, int64_t wn, int64_t ks, int64_t splits) {
  return mm_staged(0, x, vals, meta, bias, N, orientation, mt, wn, ks, splits, 0);
}

torch::Tensor mm_wg(torch::Tensor x, torch::Tensor vals, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                    int64_t N, int64_t mt, int64_t wg, int64_t ts, int64_t ks, int64_t splits, int64_t wg_swap) {
  TORCH_CHECK(ts == 1 || ts == 2, "dass nm24 cuda: ts (warpgroups along the tokens) must be 1 or 2");
  return mm_staged(1, x, vals, meta, bias, N, 1, mt, wg, ks, splits, wg_swap, ts);
}

// The input-orientation product by the sparse-wgmma kernel (nm24_wgs.cuh, sm_90a): wg
// warpgroups a block, mt m64 tiles a warpgroup, all the call's tokens (16-128) the wgmma's N;
// split-K with atomics into a zeroed fp32 workspace, then the finish kernel (the register kernel now finishes inside itself).
torch::Tensor mm_wgs(torch::Tensor x, torch::Tensor vals, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                     int64_t N, int64_t mt, int64_t wg, int64_t ks, int64_t wsmem, int64_t splits, int64_t wg_swap) {
  check_operands(x, vals, meta);
  TORCH_CHECK(wg >= 1 && wg <= 4, "dass nm24 cuda: wg (warpgroups a block) must be 1 to 4");
  TORCH_CHECK(wsmem == 0 || wsmem == 1, "dass nm24 cuda: ws (weight through shared memory) must be 0 or 1");
  check_sm90(x, "the sparse-wgmma kernel");
  x = aligned_tokens(x);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(T >= 1 && T <= 128, "dass nm24 cuda: 1 to 128 tokens per call, got ", T);
  packed_rows(vals, meta, N, K, 0);  // the input orientation's layout
  const auto [sps, nsplit] = k_slices(K, ks, splits);
  const int nt = std::max(2, pow2_at_least((int)((T + 7) / 8)));  // wgmma N >= 16
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto y = torch::empty({T, N}, x.options());
  torch::Tensor ws;
  dass24::Params p = params_for(x, vals, meta, y, bias, N, sps, wg_swap);
  if (nsplit > 1) {
    ws = torch::zeros({T, N}, x.options().dtype(torch::kFloat));
    p.ws = ws.data_ptr<float>();
  }
  const bool bf = x.scalar_type() == torch::kBFloat16;
  cudaError_t err = bf ? dass24::run_wgs_in_bf16(mt, wg, nt, ks, wsmem, p, nsplit, stream)
                       : dass24::run_wgs_in_f16(mt, wg, nt, ks, wsmem, p, nsplit, stream);
  TORCH_CHECK(err == cudaSuccess, "dass nm24 cuda: launch failed (sparse-wgmma kernel, mt=", mt, " wg=", wg,
              " nt=", nt, " ks=", ks, " ws=", wsmem, "; a configuration that is not compiled answers 'invalid argument'): ",
              cudaGetErrorString(err));
  if (nsplit > 1) finish(p, bf, stream);
  return y;
}

// The dense [N, K] matrix of dtype x_like's dtype from the packed layout (pruned places +0).
torch::Tensor unpack(torch::Tensor vals, torch::Tensor meta, int64_t N, int64_t K, int64_t orientation,
                     torch::Tensor like) {
  TORCH_CHECK(vals.is_cuda() && meta.is_cuda(), "dass nm24 cuda: packed tensors must be on a CUDA device");
  TORCH_CHECK(vals.scalar_type() == torch::kInt && meta.scalar_type() == torch::kInt && vals.is_contiguous() &&
                  meta.is_contiguous(),
              "dass nm24 cuda: packed values and metadata must be contiguous int32");
  TORCH_CHECK(orientation == 0 || orientation == 1, "dass nm24 cuda: orientation must be 0 (input) or 1 (output)");
  TORCH_CHECK(like.element_size() == 2, "dass nm24 cuda: the dense matrix is 16-bit");
  packed_rows(vals, meta, N, K, orientation);
  const c10::cuda::CUDAGuard guard(vals.device());
  auto out = torch::empty({N, K}, vals.options().dtype(like.scalar_type()));
  cudaError_t err = dass24::unpack(vals.data_ptr(), meta.data_ptr(), out.data_ptr(), (int)N, (int)K, (int)orientation,
                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dass nm24 cuda: unpack failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dass 2:4 sparse CUDA kernels for 1-128 tokens";
  m.def("mm", &mm, "y[T, N] = x[T, K] @ W^T from a packed 2:4 W (dass.infer.cuda.layout)", py::arg("x"),
        py::arg("vals"), py::arg("meta"), py::arg("bias"), py::arg("N"), py::arg("orientation"), py::arg("mt"),
        py::arg("ks"), py::arg("splits"), py::arg("wr") = 4, py::arg("wt") = 1, py::arg("nt_min") = 0,
        py::arg("act") = -1, py::arg("pdl") = 0, py::arg("deep") = 0);
  m.def("mm_smem", &mm_smem, "the same product by the shared-memory kernel (16-128 tokens)", py::arg("x"),
        py::arg("vals"), py::arg("meta"), py::arg("bias"), py::arg("N"), py::arg("orientation"), py::arg("mt"),
        py::arg("wn"), py::arg("ks"), py::arg("splits"));
  m.def("mm_wg", &mm_wg, "the output-orientation product by the wgmma kernel (sm_90a, 16-128 tokens)", py::arg("x"),
        py::arg("vals"), py::arg("meta"), py::arg("bias"), py::arg("N"), py::arg("mt"), py::arg("wg"), py::arg("ts"), py::arg("ks"),
        py::arg("splits"), py::arg("wg_swap") = 0);
  m.def("mm_wgs", &mm_wgs, "the input-orientation product by the sparse-wgmma kernel (sm_90a, 16-128 tokens)",
        py::arg("x"), py::arg("vals"), py::arg("meta"), py::arg("bias"), py::arg("N"), py::arg("mt"), py::arg("wg"),
        py::arg("ks"), py::arg("ws"), py::arg("splits"), py::arg("wg_swap") = 0);
  m.def("unpack", &unpack, "the dense matrix from the packed layout", py::arg("vals"), py::arg("meta"), py::arg("N"),
        py::arg("K"), py::arg("orientation"), py::arg("like"));
}
