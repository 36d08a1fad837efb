#include <doctest/doctest.h>
#include <cuda_bf16.h>

#include "dash/core/cuda.hpp"
#include "dash/core/dtype.hpp"
#include "support/gpu.hpp"
#include "support/random.hpp"

using namespace dash;

namespace {
// bf16 rounding on the device must match the host's (round to nearest, ties to even).
__global__ void to_bf16_bits(TensorView<const float> in, TensorView<unsigned short> out) {
  const index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x;
  if (i < in.numel()) out.data[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in.data[i]));
}
}  // namespace

TEST_CASE("DeviceTensor round-trips host data and bf16 rounding matches the host") {
  if (!test::gpu_available()) return;
  Rng rng = test::rng_for("device tensor");
  const Tensor<float> host = test::random_tensor<float>(Shape{3, 1000}, rng, 100.0);
  const auto device = cuda::DeviceTensor<float>::from_host(host.view());
  const Tensor<float> back = device.to_host();
  for (index_t i = 0; i < host.numel(); ++i) CHECK(back.data()[i] == host.data()[i]);

  cuda::DeviceTensor<unsigned short> bits(host.shape());
  to_bf16_bits<<<(host.numel() + 255) / 256, 256>>>(device.view(), bits.view());
  cuda::check(cudaGetLastError(), "to_bf16_bits launch");
  const Tensor<unsigned short> got = bits.to_host();
  for (index_t i = 0; i < host.numel(); ++i) CHECK(got.data()[i] == bf16(host.data()[i]).bits);
}
