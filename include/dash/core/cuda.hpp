// The CUDA side of core: checked runtime calls that throw dash::Error, and DeviceTensor<T>, the
// owning device array whose view() is the TensorView<T> (device = cuda) that kernels take.
// Include only where the CUDA runtime is available (CUDA sources, or host code linked to cudart).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "dash/core/error.hpp"
#include "dash/core/tensor.hpp"

namespace dash::cuda {

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

}  // namespace dash::cuda
