// The CUDA side of core: checked runtime calls that throw dash::Error; DeviceTensor<T>, the
// owning device array whose view() is the TensorView<T> (device = cuda) that kernels take;
// bf16 transfers to and from host float/double; and Workspace, the one scratch allocation that
// launchers carve per call, so that a step allocates nothing.
// Include only where the CUDA runtime is available (CUDA sources, or host code linked to cudart).
//
// Every kernel defined in dash's headers is a template (a thread count at least), so that each
// translation unit that includes it instantiates the same weak definition: a plain __global__
// function in a header is a strong definition per translation unit, and two .cu files of one
// program would not link.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/core/parallel.hpp"
#include "dash/core/tensor.hpp"

namespace dash::cuda {

// Device storage type of bf16 tensors; the same bits as dash::bf16 on the host.
using bfloat16 = __nv_bfloat16;
static_assert(sizeof(bfloat16) == sizeof(bf16));

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail("CUDA: ", what, ": ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

// Number of usable devices; 0 when there is no driver or no device (never throws).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return n;
}

template <class T>
class DeviceTensor {
 public:
  DeviceTensor() = default;
  explicit DeviceTensor(Shape s) : shape_(s) {
    if (s.numel() > 0) check(cudaMalloc(&data_, sizeof(T) * static_cast<std::size_t>(s.numel())), "cudaMalloc");
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& other) noexcept
      : shape_(other.shape_), data_(std::exchange(other.data_, nullptr)) {}
  DeviceTensor& operator=(DeviceTensor&& other) noexcept {
    std::swap(shape_, other.shape_);
    std::swap(data_, other.data_);
    return *this;
  }
  ~DeviceTensor() {
    if (data_) cudaFree(data_);
  }

  const Shape& shape() const { return shape_; }
  index_t numel() const { return shape_.numel(); }
  T* data() { return data_; }
  const T* data() const { return data_; }
  TensorView<T> view() { return {data_, shape_, Device::cuda}; }
  TensorView<const T> view() const { return {data_, shape_, Device::cuda}; }

  static DeviceTensor from_host(TensorView<const T> host) {
    require_host(host, "DeviceTensor::from_host: source");
    require(host.contiguous(), "DeviceTensor::from_host: source must be contiguous");
    DeviceTensor d(host.shape);
    if (d.numel() > 0)
      check(cudaMemcpy(d.data_, host.data, sizeof(T) * static_cast<std::size_t>(d.numel()), cudaMemcpyHostToDevice),
            "cudaMemcpy to device");
    return d;
  }

  // Asynchronous byte fill on `stream` (0xFF makes every bf16 and fp32 element a NaN).
  void fill_bytes(int byte, cudaStream_t stream = nullptr) {
    if (numel() > 0)
      check(cudaMemsetAsync(data_, byte, sizeof(T) * static_cast<std::size_t>(numel()), stream), "cudaMemsetAsync");
  }

  Tensor<T> to_host() const {
    Tensor<T> host(shape_);
    if (numel() > 0)
      check(cudaMemcpy(host.data(), data_, sizeof(T) * static_cast<std::size_t>(numel()), cudaMemcpyDeviceToHost),
            "cudaMemcpy to host");
    return host;
  }

 private:
  Shape shape_ = Shape{0};
  T* data_ = nullptr;
};

// Host float or double values, rounded to bf16 (nearest even) on all cores, copied to the
// device as `rows` rows of `cols` values placed `pitch` elements apart from `dst` on: the
// whole of a matrix (pitch = cols), or a block of columns of a wider one. A 3B model's weights
// are gigabytes, so the rounding buffer is written before it is read rather than zeroed first.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
void copy_to_device_bf16(const T* host, index_t rows, index_t cols, bfloat16* dst, index_t pitch) {
  require(cols <= pitch, "copy_to_device_bf16: rows of ", cols, " values ", pitch, " apart");
  const std::size_t count = std::size_t(rows) * std::size_t(cols);
  if (count == 0) return;
  const auto rounded = std::make_unique_for_overwrite<std::uint16_t[]>(count);
  parallel_for(index_t(count), index_t(1) << 20, [&](index_t begin, index_t end) {
    for (index_t i = begin; i < end; ++i) rounded[std::size_t(i)] = bf16(static_cast<float>(host[i])).bits;
  });
  const std::size_t row_bytes = sizeof(std::uint16_t) * std::size_t(cols);
  check(cudaMemcpy2D(dst, sizeof(bfloat16) * std::size_t(pitch), rounded.get(), row_bytes, row_bytes,
                     std::size_t(rows), cudaMemcpyHostToDevice),
        "cudaMemcpy2D to device");
}

// bf16 copy on the device of a host float or double tensor, rounded to nearest even.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
DeviceTensor<bfloat16> to_device_bf16(TensorView<const T> host) {
  require_host(host, "to_device_bf16: source");
  require(host.contiguous(), "to_device_bf16: source must be contiguous");
  DeviceTensor<bfloat16> d(host.shape);
  copy_to_device_bf16(host.data, 1, host.numel(), d.data(), host.numel());
  return d;
}

// The parts one after the other along their first dimension (rank 1, or rank 2 of one row
// width), then zero rows up to `rows` in all, as one bf16 device tensor: stacked projection
// weights that one GEMM reads.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
DeviceTensor<bfloat16> stacked_to_device_bf16(const std::vector<std::reference_wrapper<const Tensor<T>>>& parts,
                                              index_t rows = 0) {
  require(!parts.empty(), "stacked_to_device_bf16: no parts");
  const Tensor<T>& first = parts.front().get();
  const index_t width = first.rank() == 1 ? 1 : first.dim(1);
  index_t filled = 0;
  for (const Tensor<T>& p : parts) {
    require(p.rank() == first.rank() && (p.rank() == 1 || p.dim(1) == width),
            "stacked_to_device_bf16: parts of different widths");
    filled += p.dim(0);
  }
  rows = std::max(rows, filled);
  DeviceTensor<bfloat16> out(first.rank() == 1 ? Shape{rows} : Shape{rows, width});
  if (rows > filled)
    check(cudaMemset(out.data() + filled * width, 0, sizeof(bfloat16) * std::size_t((rows - filled) * width)),
          "cudaMemset (stacked padding)");
  bfloat16* at = out.data();
  for (const Tensor<T>& p : parts) {
    copy_to_device_bf16(p.data(), 1, p.numel(), at, p.numel());
    at += p.numel();
  }
  return out;
}

// A device tensor of bf16 or float, widened to double on the host.
template <class T>
Tensor<double> to_host_double(const DeviceTensor<T>& device) {
  Tensor<double> out(device.shape());
  if constexpr (std::is_same_v<T, bfloat16>) {
    std::vector<bf16> raw(static_cast<std::size_t>(device.numel()));
    if (!raw.empty())
      check(cudaMemcpy(raw.data(), device.data(), sizeof(bf16) * raw.size(), cudaMemcpyDeviceToHost),
            "cudaMemcpy to host");
    for (index_t i = 0; i < out.numel(); ++i) out.data()[i] = static_cast<double>(raw[std::size_t(i)]);
  } else {
    const Tensor<T> host = device.to_host();
    for (index_t i = 0; i < out.numel(); ++i) out.data()[i] = static_cast<double>(host.data()[i]);
  }
  return out;
}

// Scratch memory for launchers: grown (never per step) to the largest request, then carved
// front to back for the duration of one call. Carves are 256-byte aligned.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (base_) cudaFree(base_);
  }

  static constexpr std::size_t alignment = 256;
  static constexpr std::size_t aligned(std::size_t bytes) { return (bytes + alignment - 1) / alignment * alignment; }

  // Makes room for `bytes` (synchronising the device only when it has to grow) and rewinds.
  void reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      if (base_) check(cudaFree(base_), "cudaFree (workspace)");
      base_ = nullptr;
      check(cudaMalloc(&base_, bytes), "cudaMalloc (workspace)");
      capacity_ = bytes;
    }
    used_ = 0;
  }
  void rewind() { used_ = 0; }

  template <class T>
  T* carve(std::size_t count, const char* what) {
    const std::size_t bytes = aligned(sizeof(T) * count);
    require(used_ + bytes <= capacity_, "Workspace: ", what, " needs ", bytes, " bytes but only ", capacity_ - used_,
            " of ", capacity_, " are left; reserve() the launcher's workspace_bytes() first");
    T* p = reinterpret_cast<T*>(static_cast<char*>(base_) + used_);
    used_ += bytes;
    return p;
  }

  std::size_t capacity() const { return capacity_; }

 private:
  void* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
};

}  // namespace dash::cuda
