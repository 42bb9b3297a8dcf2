// 2-D convolution through oneDNN as an XLA FFI custom call: float32, NHWC activations, HWIO kernels.
//
// One handler, three operations (attribute `mode`):
//   0 forward          a = x (N, H, W, C),   b = w (KH, KW, C, O) -> y (N, HO, WO, O)
//   1 input gradient   a = dy (N, HO, WO, O), b = w               -> dx (N, H, W, C)
//   2 kernel gradient  a = x,                 b = dy              -> dw (KH, KW, C, O)
// Strides (sh, sw) and paddings (pt, pb, pl, pr) in pixels; `threads` > 0 sets the OpenMP
// threads of the calling thread (one XLA:CPU device thread per call; OpenMP keeps the
// setting per thread). Built on first use by jax_advprune/kernels/onednn.py.
//
// Safety (what every call checks before oneDNN touches memory):
// - the three buffers form one convolution: ranks, matching channels and batch, output
//   sizes equal to floor((in + pads - kernel) / stride) + 1, and the bottom/right paddings
//   equal to the tight ones the stride implies, max(0, (out - 1) * stride + kernel - in - pad_lo);
// - strided 1x1 convolutions are refused: oneDNN 3.2's jit 1x1 kernel-gradient kernels (AVX2
//   and AVX-512) write up to hundreds of bytes past the scratchpad they book for them when the
//   input has fewer channels than one SIMD block; onednn.py subsamples the input and sends a
//   stride-1 convolution instead;
// - every buffer oneDNN allocates for a call (scratchpad, reordered kernels) comes from this file,
//   followed by a guard tail: bytes written into it make the call return an error (the results
//   are then not used), and never reach the heap's bookkeeping;
// - a descriptor oneDNN builds that disagrees with the buffers is an error, never a write.
// Any refusal is an ffi::Error; nothing here aborts. AdvpruneOnednnConvPlan runs the same checks
// without executing, so that Python sends a refused shape to XLA at trace time.
//
// Checked build (-DADVPRUNE_GUARD_PAGES, with -fsanitize=address,undefined): oneDNN's kernels are
// generated machine code that AddressSanitizer does not instrument, so each buffer oneDNN reads
// or writes (the operands copied, the scratchpad, the reordered kernels) is placed against a
// PROT_NONE page: an access past either end faults at the faulting instruction.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define ADVPRUNE_X86 1
#endif
#ifdef ADVPRUNE_GUARD_PAGES
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using Dims4 = std::array<int64_t, 4>;

namespace {

constexpr int64_t kMaxDim = int64_t{1} << 31;
constexpr int64_t kMaxElements = int64_t{1} << 40;
constexpr size_t kAlign = 64;
constexpr size_t kGuardTail = 64 * 1024;  // canary bytes after each buffer oneDNN gets from us
constexpr unsigned char kCanary = 0xA5;

// One convolution, whatever the mode: x (N, H, W, C), w (KH, KW, C, O), y (N, HO, WO, O).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr;
};

std::string Shape(const Dims4& d) {
  return "(" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " + std::to_string(d[2]) + ", " +
         std::to_string(d[3]) + ")";
}

int64_t Product(const Dims4& d) { return d[0] * d[1] * d[2] * d[3]; }

int64_t TightPadding(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad_lo) {
  return std::max<int64_t>(0, (out - 1) * stride + kernel - in - pad_lo);
}

// The geometry that the buffers of `mode` describe, or why they do not describe one convolution.
std::string ReadGeometry(int64_t mode, const Dims4& a, const Dims4& b, const Dims4& out, int64_t sh, int64_t sw,
                         int64_t pt, int64_t pb, int64_t pl, int64_t pr, Geometry* g) {
  Dims4 x, w, y;
  if (mode == 0) {
    x = a; w = b; y = out;
  } else if (mode == 1) {
    y = a; w = b; x = out;
  } else if (mode == 2) {
    x = a; y = b; w = out;
  } else {
    return "mode must be 0 (forward), 1 (input gradient) or 2 (kernel gradient), got " + std::to_string(mode);
  }
  const std::string shapes = "x " + Shape(x) + ", w " + Shape(w) + ", y " + Shape(y);
  for (const Dims4* d : {&x, &w, &y}) {
    for (int64_t size : *d) {
      if (size < 1 || size >= kMaxDim) return "every dimension must be in [1, 2^31): " + shapes;
    }
    if (Product(*d) >= kMaxElements) return "an operand has 2^40 elements or more: " + shapes;
  }
  if (w[2] != x[3] || w[3] != y[3] || x[0] != y[0]) {
    return "channels or batch disagree (x's C = w's C, w's O = y's O, x's N = y's N): " + shapes;
  }
  if (sh < 1 || sw < 1) return "strides must be >= 1";
  if (pt < 0 || pb < 0 || pl < 0 || pr < 0) return "paddings must be >= 0 (negative paddings go to XLA)";
  if (pt >= kMaxDim || pb >= kMaxDim || pl >= kMaxDim || pr >= kMaxDim || sh >= kMaxDim || sw >= kMaxDim) {
    return "strides and paddings must be below 2^31";
  }
  *g = Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl, pr};
  if (g->h + pt + pb < g->kh || g->w + pl + pr < g->kw) return "the kernel is larger than the padded input: " + shapes;
  if (g->ho != (g->h + pt + pb - g->kh) / sh + 1 || g->wo != (g->w + pl + pr - g->kw) / sw + 1) {
    return "output size disagrees with floor((in + pads - kernel) / stride) + 1: " + shapes;
  }
  if (pb != TightPadding(g->h, g->ho, g->kh, sh, pt) || pr != TightPadding(g->w, g->wo, g->kw, sw, pl)) {
    return "bottom/right paddings must be the ones the stride implies (max(0, (out - 1) * stride + kernel - in - "
           "top/left)): " + shapes;
  }
#ifndef ADVPRUNE_ALLOW_STRIDED_1X1  // defined only by the memory check's positive control (see onednn.py)
  if (g->kh == 1 && g->kw == 1 && (sh > 1 || sw > 1)) {
    return "strided 1x1 convolution (oneDNN 3.2's 1x1 kernel gradient overruns its scratchpad on these; "
           "subsample the input and use stride 1)";
  }
#endif
  return "";
}

// Buffers for oneDNN, each followed by a guard: canary bytes checked after the call, or (checked build)
// PROT_NONE pages on both sides. Production buffers are kept per thread and reused across calls.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
#ifdef ADVPRUNE_GUARD_PAGES
    for (auto& m : mappings_) munmap(m.first, m.second);
#endif
  }

  // A 64-byte-aligned buffer of `bytes` (at least 1).
  void* Take(size_t bytes) {
    bytes = RoundUp(std::max<size_t>(bytes, 1), kAlign);
#ifdef ADVPRUNE_GUARD_PAGES
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t length = RoundUp(bytes, page) + 2 * page;
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    char* begin = static_cast<char*>(base);
    mprotect(begin, page, PROT_NONE);
    mprotect(begin + length - page, page, PROT_NONE);
    mappings_.emplace_back(base, length);
    return begin + length - page - bytes;  // ends where the last guard page begins
#else
    auto& blocks = ThreadBlocks();
    if (next_ == blocks.size()) blocks.emplace_back();
    Block& block = blocks[next_++];
    if (block.capacity < bytes) {
      block.data.reset(static_cast<char*>(std::aligned_alloc(kAlign, bytes + kGuardTail)));
      if (!block.data) {
        block.capacity = 0;
        return nullptr;
      }
      block.capacity = bytes;
    }
    std::memset(block.data.get() + bytes, kCanary, kGuardTail);
    used_.emplace_back(next_ - 1, bytes);
    return block.data.get();
#endif
  }

  // "" when no guard tail was written to, else how many bytes were.
  std::string CheckGuards() const {
#ifndef ADVPRUNE_GUARD_PAGES
    for (const auto& [index, bytes] : used_) {
      const char* tail = ThreadBlocks()[index].data.get() + bytes;
      size_t written = 0;
      for (size_t i = 0; i < kGuardTail; ++i) written += static_cast<unsigned char>(tail[i]) != kCanary;
      if (written) return std::to_string(written) + " bytes written past a " + std::to_string(bytes) + "-byte buffer";
    }
#endif
    return "";
  }

 private:
  static size_t RoundUp(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }
#ifdef ADVPRUNE_GUARD_PAGES
  std::vector<std::pair<void*, size_t>> mappings_;
#else
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Block {
    std::unique_ptr<char, Free> data;
    size_t capacity = 0;
  };
  static std::vector<Block>& ThreadBlocks() {
    thread_local std::vector<Block> blocks;
    return blocks;
  }
  size_t next_ = 0;
  std::vector<std::pair<size_t, size_t>> used_;  // (index in ThreadBlocks(), bytes handed out)
#endif
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN's descriptors of one convolution, all three primitives (each mode's needs the forward one).
struct Primitives {
  memory::desc x, w, y;
  dnnl::convolution_forward::primitive_desc forward;
  dnnl::convolution_backward_data::primitive_desc input_gradient;
  dnnl::convolution_backward_weights::primitive_desc kernel_gradient;
};

Primitives Describe(const Geometry& g, int64_t mode) {
  Primitives p;
  auto& engine = Engine();
  const memory::dims strides = {g.sh, g.sw}, pad_lo = {g.pt, g.pl}, pad_hi = {g.pb, g.pr};
  p.x = memory::desc({g.n, g.c, g.h, g.w}, memory::data_type::f32, tag::nhwc);
  p.y = memory::desc({g.n, g.o, g.ho, g.wo}, memory::data_type::f32, tag::nhwc);
  p.w = memory::desc({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, tag::hwio);
  const memory::desc w_any({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p.forward = dnnl::convolution_forward::primitive_desc(engine, dnnl::prop_kind::forward_training,
                                                        dnnl::algorithm::convolution_direct, p.x, w_any, p.y, strides,
                                                        pad_lo, pad_hi, attr);
  if (mode == 1) {
    p.input_gradient = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, p.x, w_any, p.y, strides, pad_lo, pad_hi, p.forward, attr);
  } else if (mode == 2) {
    p.kernel_gradient = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, p.x, w_any, p.y, strides, pad_lo, pad_hi, p.forward, attr);
  }
  return p;
}

// "" when the descriptors oneDNN chose cover exactly the caller's buffers, else the disagreement.
std::string CheckDescriptors(const Primitives& p, const Geometry& g, int64_t mode) {
  const size_t x_bytes = sizeof(float) * g.n * g.h * g.w * g.c, y_bytes = sizeof(float) * g.n * g.ho * g.wo * g.o;
  const size_t w_bytes = sizeof(float) * g.kh * g.kw * g.c * g.o;
  memory::desc src, dst, weights;
  if (mode == 0) {
    src = p.forward.src_desc(); dst = p.forward.dst_desc(); weights = p.forward.weights_desc();
  } else if (mode == 1) {
    src = p.input_gradient.diff_src_desc(); dst = p.input_gradient.diff_dst_desc(); weights = p.input_gradient.weights_desc();
  } else {
    src = p.kernel_gradient.src_desc(); dst = p.kernel_gradient.diff_dst_desc(); weights = p.kernel_gradient.diff_weights_desc();
  }
  if (src != p.x || dst != p.y) return "oneDNN's activation descriptors differ from the NHWC buffers";
  if (src.get_size() != x_bytes || dst.get_size() != y_bytes) return "oneDNN's activation sizes differ from the buffers";
  if (weights.get_dims() != p.w.get_dims() || p.w.get_size() != w_bytes) return "oneDNN's kernel dimensions differ from the HWIO buffer";
  return "";
}

const char* Implementation(const Primitives& p, int64_t mode) {
  return mode == 0 ? p.forward.impl_info_str() : mode == 1 ? p.input_gradient.impl_info_str() : p.kernel_gradient.impl_info_str();
}

memory::desc ScratchpadDesc(const Primitives& p, int64_t mode) {
  return mode == 0 ? p.forward.scratchpad_desc() : mode == 1 ? p.input_gradient.scratchpad_desc()
                                                             : p.kernel_gradient.scratchpad_desc();
}

// A memory object on a buffer of ours (or on the caller's, when `data` is given).
memory OnBuffer(const memory::desc& desc, Workspace& workspace, void* data = nullptr) {
  if (data == nullptr) data = workspace.Take(desc.get_size());
  if (data == nullptr) throw dnnl::error(dnnl_out_of_memory, "could not allocate a buffer for oneDNN");
  return memory(desc, Engine(), data);
}

// Runs `mode` on the buffers (float32, the caller's), or says why not. Nothing is written on a refusal.
std::string Run(int64_t mode, const Geometry& g, float* a, float* b, float* out) {
  try {
    Primitives p = Describe(g, mode);
    std::string wrong = CheckDescriptors(p, g, mode);
    if (!wrong.empty()) return wrong;
    auto& engine = Engine();
    dnnl::stream stream(engine);
    Workspace workspace;
#ifdef ADVPRUNE_GUARD_PAGES
    // Operands copied to guarded buffers; the result is copied back.
    const size_t a_bytes = sizeof(float) * (mode == 1 ? g.n * g.ho * g.wo * g.o : g.n * g.h * g.w * g.c);
    const size_t b_bytes = sizeof(float) * (mode == 2 ? g.n * g.ho * g.wo * g.o : g.kh * g.kw * g.c * g.o);
    const size_t out_bytes = sizeof(float) * (mode == 0 ? g.n * g.ho * g.wo * g.o : mode == 1 ? g.n * g.h * g.w * g.c
                                                                                              : g.kh * g.kw * g.c * g.o);
    float* out_caller = out;
    a = static_cast<float*>(std::memcpy(workspace.Take(a_bytes), a, a_bytes));
    b = static_cast<float*>(std::memcpy(workspace.Take(b_bytes), b, b_bytes));
    out = static_cast<float*>(workspace.Take(out_bytes));
#endif
    memory scratchpad = OnBuffer(ScratchpadDesc(p, mode), workspace);
    if (mode == 0 || mode == 1) {
      memory x_mem(p.x, engine, mode == 0 ? a : out), y_mem(p.y, engine, mode == 0 ? out : a);
      memory w_user(p.w, engine, b);
      const memory::desc wanted = mode == 0 ? p.forward.weights_desc() : p.input_gradient.weights_desc();
      memory w_prim = w_user;
      if (wanted != p.w) {
        w_prim = OnBuffer(wanted, workspace);
        dnnl::reorder(w_user, w_prim).execute(stream, w_user, w_prim);
      }
      if (mode == 0) {
        dnnl::convolution_forward(p.forward).execute(
            stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_WEIGHTS, w_prim}, {DNNL_ARG_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      } else {
        dnnl::convolution_backward_data(p.input_gradient).execute(
            stream, {{DNNL_ARG_DIFF_DST, y_mem}, {DNNL_ARG_WEIGHTS, w_prim}, {DNNL_ARG_DIFF_SRC, x_mem}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      }
    } else {
      memory x_mem(p.x, engine, a), dy_mem(p.y, engine, b), dw_mem(p.w, engine, out);
      memory dw_prim = dw_mem;
      if (p.kernel_gradient.diff_weights_desc() != p.w) dw_prim = OnBuffer(p.kernel_gradient.diff_weights_desc(), workspace);
      dnnl::convolution_backward_weights(p.kernel_gradient).execute(
          stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_DST, dy_mem}, {DNNL_ARG_DIFF_WEIGHTS, dw_prim}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (dw_prim != dw_mem) dnnl::reorder(dw_prim, dw_mem).execute(stream, dw_prim, dw_mem);
    }
    stream.wait();
#ifdef ADVPRUNE_GUARD_PAGES
    std::memcpy(out_caller, out, out_bytes);
#endif
    std::string overrun = workspace.CheckGuards();
    if (!overrun.empty()) return std::string("oneDNN (") + Implementation(p, mode) + ") " + overrun + "; its results are not used";
  } catch (const dnnl::error& e) {
    return std::string("oneDNN: ") + e.what();
  }
  return "";
}

Dims4 ToDims(ffi::Span<const int64_t> d) { return {d[0], d[1], d[2], d[3]}; }

// Denormal floats flushed to zero (MXCSR FTZ and DAZ) on the calling thread and every OpenMP thread of its team for the
// lifetime of this object, each thread's previous setting put back after: XLA:CPU computes with denormals flushed,
// and a oneDNN kernel run on threads that do not flush them (a team that PyTorch, loaded in the same process, started)
// was seen 100x slower (the 3-channel input gradient on AVX2: 200 ms instead of 2).
class FlushDenormals {
 public:
  FlushDenormals() { OnTeam(true); }
  ~FlushDenormals() { OnTeam(false); }

 private:
  static void OnTeam(bool flush) {
#ifdef ADVPRUNE_X86
    thread_local unsigned saved = 0;
    thread_local bool flushed = false;  // only a thread that flushed puts its setting back
#pragma omp parallel
    {
      if (flush && !flushed) {
        saved = _mm_getcsr();
        _mm_setcsr(saved | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
        flushed = true;
      } else if (!flush && flushed) {
        _mm_setcsr(saved);
        flushed = false;
      }
    }
#endif
  }
};

// OpenMP threads of the calling thread set to `threads` (> 0) for the lifetime of this object.
class ThreadCount {
 public:
  explicit ThreadCount(int64_t threads) : previous_(omp_get_max_threads()), changed_(threads > 0) {
    if (changed_) omp_set_num_threads(static_cast<int>(threads));
  }
  ~ThreadCount() {
    if (changed_) omp_set_num_threads(previous_);
  }

 private:
  int previous_;
  bool changed_;
};

ffi::Error Conv(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn_conv: every operand must have rank 4");
  }
  Geometry g;
  std::string why = ReadGeometry(mode, ToDims(a.dimensions()), ToDims(b.dimensions()), ToDims(out->dimensions()), sh, sw,
                                 pt, pb, pl, pr, &g);
  if (why.empty()) {
    ThreadCount thread_count(threads);
    FlushDenormals flush;
    why = Run(mode, g, a.typed_data(), b.typed_data(), out->typed_data());
  }
  if (!why.empty()) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn_conv: " + why);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdvpruneOnednnConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("threads"));

// The same checks as a call of `mode` on buffers of these shapes, without executing: 1 when the call would run
// (`message` then holds oneDNN's implementation and its scratchpad bytes), 0 when it would be refused
// (`message` says why). For Python's trace-time choice between oneDNN and XLA (ctypes).
extern "C" int AdvpruneOnednnConvPlan(int64_t mode, const int64_t* a, const int64_t* b, const int64_t* out, int64_t sh,
                                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t threads,
                                      char* message, int64_t message_size) {
  std::string text;
  int ok = 0;
  Geometry g;
  text = ReadGeometry(mode, {a[0], a[1], a[2], a[3]}, {b[0], b[1], b[2], b[3]}, {out[0], out[1], out[2], out[3]}, sh, sw,
                      pt, pb, pl, pr, &g);
  if (text.empty()) {
    ThreadCount thread_count(threads);
    try {
      Primitives p = Describe(g, mode);
      text = CheckDescriptors(p, g, mode);
      if (text.empty()) {
        ok = 1;
        text = std::string(Implementation(p, mode)) + ", scratchpad " + std::to_string(ScratchpadDesc(p, mode).get_size()) + " B";
      }
    } catch (const dnnl::error& e) {
      text = std::string("oneDNN has no primitive for it: ") + e.what();
    }
  }
  if (message_size > 0) {
    const size_t n = std::min<size_t>(text.size(), static_cast<size_t>(message_size - 1));
    std::memcpy(message, text.data(), n);
    message[n] = '\0';
  }
  return ok;
}
