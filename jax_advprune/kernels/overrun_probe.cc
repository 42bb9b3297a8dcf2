// The scratchpad overrun of oneDNN's strided 1x1 kernel-gradient convolution, measured on oneDNN itself.
//
// For each shape read from stdin ("n h w c o stride", one per line) it builds oneDNN's convolution backward-weights
// primitive (1x1 kernel, the given stride, no padding, nhwc activations, weights in the format oneDNN picks) with a
// user scratchpad of exactly the size the primitive asks for, followed by CANARY_BYTES of a known byte, executes
// it, and prints "n h w c o stride scratchpad_bytes overrun_bytes implementation": overrun_bytes is how far past the
// scratchpad's end the canary was overwritten (0: not at all). The canary belongs to this program, so an overrun is
// measured, not suffered. Threads and instruction set come from the environment (OMP_NUM_THREADS,
// ONEDNN_MAX_CPU_ISA). Built and run by jax_advprune.kernels.overrun_probe; not part of the custom call.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

namespace {

constexpr size_t kCanaryBytes = 64 * 1024;
constexpr unsigned char kCanary = 0xA5;

using dnnl::memory;
using tag = memory::format_tag;

int64_t ProbeOne(dnnl::engine& engine, dnnl::stream& stream, int64_t n, int64_t h, int64_t w, int64_t c, int64_t o,
                 int64_t s, size_t* scratchpad_bytes, std::string* implementation) {
  const int64_t ho = (h - 1) / s + 1, wo = (w - 1) / s + 1;
  const memory::desc x({n, c, h, w}, memory::data_type::f32, tag::nhwc);
  const memory::desc y({n, o, ho, wo}, memory::data_type::f32, tag::nhwc);
  const memory::desc w_any({o, c, 1, 1}, memory::data_type::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::dims strides = {s, s}, pads = {0, 0};
  auto forward = dnnl::convolution_forward::primitive_desc(engine, dnnl::prop_kind::forward_training,
                                                           dnnl::algorithm::convolution_direct, x, w_any, y, strides,
                                                           pads, pads, attr);
  auto backward = dnnl::convolution_backward_weights::primitive_desc(
      engine, dnnl::algorithm::convolution_direct, x, w_any, y, strides, pads, pads, forward, attr);
  *implementation = backward.impl_info_str();
  const memory::desc pad_desc = backward.scratchpad_desc();
  *scratchpad_bytes = pad_desc.get_size();
  std::vector<unsigned char> pad(*scratchpad_bytes + kCanaryBytes, kCanary);
  std::vector<float> xs(n * h * w * c, 0.5f), dys(n * ho * wo * o, 0.25f);
  std::vector<unsigned char> dws(backward.diff_weights_desc().get_size() + 64);
  memory x_mem(x, engine, xs.data()), dy_mem(y, engine, dys.data());
  memory dw_mem(backward.diff_weights_desc(), engine, dws.data());
  memory pad_mem(pad_desc, engine, pad.data());
  dnnl::convolution_backward_weights(backward).execute(
      stream,
      {{DNNL_ARG_SRC, x_mem}, {DNNL_ARG_DIFF_DST, dy_mem}, {DNNL_ARG_DIFF_WEIGHTS, dw_mem}, {DNNL_ARG_SCRATCHPAD, pad_mem}});
  stream.wait();
  int64_t overrun = 0;
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (pad[*scratchpad_bytes + i] != kCanary) overrun = static_cast<int64_t>(i) + 1;
  }
  return overrun;
}

}  // namespace

int main() {
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  int64_t n, h, w, c, o, s;
  while (std::cin >> n >> h >> w >> c >> o >> s) {
    size_t scratchpad_bytes = 0;
    std::string implementation;
    const int64_t overrun = ProbeOne(engine, stream, n, h, w, c, o, s, &scratchpad_bytes, &implementation);
    std::printf("%ld %ld %ld %ld %ld %ld %zu %ld %s\n", n, h, w, c, o, s, scratchpad_bytes, overrun,
                implementation.c_str());
    std::fflush(stdout);
  }
  return 0;
}
