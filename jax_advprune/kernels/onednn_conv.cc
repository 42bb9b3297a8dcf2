// 2-D convolution through oneDNN as an XLA FFI custom call: float32, NHWC activations, HWIO kernels.
//
// One handler, three operations (attribute `mode`):
//   0 forward          a = x (N, H, W, C),   b = w (KH, KW, C, O) -> y (N, HO, WO, O)
//   1 input gradient   a = dy (N, HO, WO, O), b = w               -> dx (N, H, W, C)
//   2 kernel gradient  a = x,                 b = dy              -> dw (KH, KW, C, O)
// Strides (sh, sw) and paddings (pt, pb, pl, pr) in pixels; `threads` > 0 sets the OpenMP
// threads of the calling thread (one XLA:CPU device thread per call). Kernels are reordered
// into oneDNN's preferred layout on every call (they are small next to the activations).
// Built on first use by jax_advprune/kernels/onednn.py.
#include <cstdint>
#include <omp.h>
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

static dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The kernel in the layout a primitive wants: the caller's HWIO buffer itself, or a reordered copy.
static memory KernelAs(const memory::desc& wanted, const memory::desc& user, float* data, dnnl::engine& engine,
                       dnnl::stream& stream) {
  memory user_mem(user, engine, data);
  if (wanted == user) return user_mem;
  memory reordered(wanted, engine);
  dnnl::reorder(user_mem, reordered).execute(stream, user_mem, reordered);
  return reordered;
}

static ffi::Error Conv(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                       int64_t mode, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                       int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  // x (N, H, W, C), w (KH, KW, C, O), y (N, HO, WO, O); which buffer is which depends on mode.
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 4 || bd.size() != 4 || od.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn_conv: every operand must have rank 4");
  }
  memory::dims x_dims, w_dims, y_dims;
  if (mode == 0) {         // y = conv(x, w): a = x, b = w, out = y
    x_dims = {ad[0], ad[3], ad[1], ad[2]}; w_dims = {bd[3], bd[2], bd[0], bd[1]}; y_dims = {od[0], od[3], od[1], od[2]};
  } else if (mode == 1) {  // dx: a = dy, b = w, out = dx
    y_dims = {ad[0], ad[3], ad[1], ad[2]}; w_dims = {bd[3], bd[2], bd[0], bd[1]}; x_dims = {od[0], od[3], od[1], od[2]};
  } else if (mode == 2) {  // dw: a = x, b = dy, out = dw
    x_dims = {ad[0], ad[3], ad[1], ad[2]}; y_dims = {bd[0], bd[3], bd[1], bd[2]}; w_dims = {od[3], od[2], od[0], od[1]};
  } else {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "mode must be 0 (forward), 1 (input gradient) or 2 (kernel gradient)");
  }
  memory::dims strides = {sh, sw}, pad_l = {pt, pl}, pad_r = {pb, pr};
  auto& engine = Engine();
  dnnl::stream stream(engine);
  memory::desc x_user(x_dims, memory::data_type::f32, tag::nhwc), y_user(y_dims, memory::data_type::f32, tag::nhwc);
  memory::desc w_user(w_dims, memory::data_type::f32, tag::hwio);
  memory::desc w_any(w_dims, memory::data_type::f32, tag::any);
  try {
    auto fwd_pd = dnnl::convolution_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x_user, w_any, y_user, strides, pad_l, pad_r);
    if (mode == 0) {
      memory x_mem(x_user, engine, a.typed_data()), y_mem(y_user, engine, out->typed_data());
      memory w_prim = KernelAs(fwd_pd.weights_desc(), w_user, b.typed_data(), engine, stream);
      dnnl::convolution_forward(fwd_pd).execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_WEIGHTS, w_prim}, {DNNL_ARG_DST, y_mem}});
    } else if (mode == 1) {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          engine, dnnl::algorithm::convolution_direct, x_user, w_any, y_user, strides, pad_l, pad_r, fwd_pd);
      memory dy_mem(y_user, engine, a.typed_data()), dx_mem(x_user, engine, out->typed_data());
      memory w_prim = KernelAs(pd.weights_desc(), w_user, b.typed_data(), engine, stream);
      dnnl::convolution_backward_data(pd).execute(stream, {{DNNL_ARG_DIFF_DST, dy_mem}, {DNNL_ARG_WEIGHTS, w_prim}, {DNNL_ARG_DIFF_SRC, dx_mem}});
    } else {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          engine, dnnl::algorithm::convolution_direct, x_user, w_any, y_user, strides, pad_l, pad_r, fwd_pd);
      memory x_mem(x_user, engine, a.typed_data()), dy_mem(y_user, engine, b.typed_data());
      memory dw_mem(w_user, engine, out->typed_data());
      memory dw_prim = dw_mem;
      if (pd.diff_weights_desc() != w_user) dw_prim = memory(pd.diff_weights_desc(), engine);
      dnnl::convolution_backward_weights(pd).execute(stream, {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_DST, dy_mem}, {DNNL_ARG_DIFF_WEIGHTS, dw_prim}});
      if (dw_prim != dw_mem) dnnl::reorder(dw_prim, dw_mem).execute(stream, dw_prim, dw_mem);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

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
