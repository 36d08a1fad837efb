// Tensor<T>: an owning, contiguous, row-major host array with a shape.
// TensorView<T>: the small non-owning view (pointer, shape, strides, device) that functions
// and kernels take. A view of const T is read-only. Not a general tensor library: just what
// the operators and the model need.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <span>
#include <string_view>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "dash/core/device.hpp"
#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/core/shape.hpp"

namespace dash {

template <class T>
struct TensorView {
  using value_type = T;

  T* data = nullptr;
  Shape shape;
  std::array<index_t, Shape::max_rank> stride{};
  Device device = Device::cpu;

  TensorView() = default;
  TensorView(T* ptr, Shape s, Device dev = Device::cpu)
      : data(ptr), shape(s), stride(s.strides()), device(dev) {}
  TensorView(T* ptr, Shape s, std::array<index_t, Shape::max_rank> strides, Device dev)
      : data(ptr), shape(s), stride(strides), device(dev) {}
  // A view of T converts to a view of const T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  TensorView(const TensorView<U>& other)  // NOLINT(google-explicit-constructor)
      : data(other.data), shape(other.shape), stride(other.stride), device(other.device) {}

  DASH_HOST_DEVICE int rank() const { return shape.rank(); }
  DASH_HOST_DEVICE index_t dim(int axis) const { return shape[axis]; }
  DASH_HOST_DEVICE index_t numel() const { return shape.numel(); }
  DASH_HOST_DEVICE bool empty() const { return data == nullptr || numel() == 0; }
  bool contiguous() const { return stride == shape.strides(); }

  template <class... I>
  DASH_HOST_DEVICE T& operator()(I... i) const {
    static_assert(sizeof...(I) <= Shape::max_rank);
    const index_t idx[] = {static_cast<index_t>(i)...};
    index_t offset = 0;
    for (std::size_t a = 0; a < sizeof...(I); ++a) offset += idx[a] * stride[a];
    return data[offset];
  }
};

// Tag of the Tensor constructor that leaves the elements unset, for a caller about to write
// every one of them (a loader filling gigabytes would otherwise first zero them, on one core).
struct Uninitialized {};
inline constexpr Uninitialized uninitialized{};

namespace detail {

// std::allocator whose element construction without arguments leaves trivial types unset.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

}  // namespace detail

template <class T>
class Tensor {
 public:
  using value_type = T;

  Tensor() = default;
  explicit Tensor(Shape s) : shape_(s), storage_(static_cast<std::size_t>(s.numel()), T{}) {}
  Tensor(Shape s, T fill) : shape_(s), storage_(static_cast<std::size_t>(s.numel()), fill) {}
  Tensor(Shape s, Uninitialized) : shape_(s), storage_(static_cast<std::size_t>(s.numel())) {}

  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int axis) const { return shape_[axis]; }
  index_t numel() const { return shape_.numel(); }
  bool empty() const { return storage_.empty(); }

  T* data() { return storage_.data(); }
  const T* data() const { return storage_.data(); }
  std::span<T> flat() { return storage_; }
  std::span<const T> flat() const { return storage_; }

  TensorView<T> view() { return {data(), shape_}; }
  TensorView<const T> view() const { return {data(), shape_}; }
  operator TensorView<T>() { return view(); }              // NOLINT(google-explicit-constructor)
  operator TensorView<const T>() const { return view(); }  // NOLINT(google-explicit-constructor)

  template <class... I>
  T& operator()(I... i) {
    return view()(i...);
  }
  template <class... I>
  const T& operator()(I... i) const {
    return view()(i...);
  }

  void fill(T value) { std::fill(storage_.begin(), storage_.end(), value); }
  // Same element count, new shape.
  Tensor& reshape(Shape s) {
    require(s.numel() == shape_.numel(), "Tensor::reshape: ", shape_, " has ", shape_.numel(),
            " elements, ", s, " needs ", s.numel());
    shape_ = s;
    return *this;
  }

 private:
  Shape shape_ = Shape{0};  // a default tensor is empty, not a scalar
  std::vector<T, detail::DefaultInitAllocator<T>> storage_;
};

// Copies a host view element by element into a new contiguous tensor.
template <class T>
Tensor<std::remove_const_t<T>> clone(TensorView<T> v) {
  require(v.device == Device::cpu, "clone: view is on ", name_of(v.device), ", expected cpu");
  Tensor<std::remove_const_t<T>> out(v.shape);
  if (v.contiguous()) {
    std::copy_n(v.data, v.numel(), out.data());
    return out;
  }
  const auto dst = out.view();
  std::array<index_t, Shape::max_rank> idx{};
  for (index_t n = 0; n < v.numel(); ++n) {
    index_t src = 0, to = 0;
    for (int a = 0; a < v.rank(); ++a) src += idx[a] * v.stride[a], to += idx[a] * dst.stride[a];
    dst.data[to] = v.data[src];
    for (int a = v.rank() - 1; a >= 0 && ++idx[a] == v.dim(a); --a) idx[a] = 0;
  }
  return out;
}

template <class To, class From>
Tensor<To> cast(TensorView<const From> v) {
  Tensor<std::remove_const_t<From>> src = clone(v);
  Tensor<To> out(v.shape);
  for (index_t i = 0; i < out.numel(); ++i) out.data()[i] = static_cast<To>(src.data()[i]);
  return out;
}

// Checks used at API boundaries: each names the tensor (`what`) and what was expected.
template <class T>
void require_shape(TensorView<T> v, const Shape& expected, std::string_view what) {
  require(v.shape == expected, what, ": shape ", v.shape, ", expected ", expected);
}

template <class T>
void require_rank(TensorView<T> v, int rank, std::string_view what) {
  require(v.rank() == rank, what, ": rank ", v.rank(), " (shape ", v.shape, "), expected ", rank);
}

template <class T>
void require_host(TensorView<T> v, std::string_view what) {
  require(v.device == Device::cpu, what, ": on ", name_of(v.device), ", expected cpu");
}

template <class T>
void require_finite(TensorView<T> v, std::string_view what) {
  const auto check = [&](const std::remove_const_t<T>* data, index_t n) {
    for (index_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(data[i]);
      require(std::isfinite(x), what, ": element ", i, " is ", x, ", expected a finite value");
    }
  };
  if (v.contiguous()) {
    check(v.data, v.numel());
  } else {
    const Tensor<std::remove_const_t<T>> c = clone(v);
    check(c.data(), c.numel());
  }
}

}  // namespace dash
