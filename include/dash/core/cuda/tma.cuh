// Hopper's asynchronous copies (sm_90): mbarriers, the tensor memory accelerator (TMA:
// tiled loads through a tensor map, bulk copies, bulk reductions) and the fence between the
// generic and the async proxy; on the host, the encoder of tensor maps.
//
// An mbarrier is a 64-bit word in shared memory that completes a phase once its expected
// arrivals have arrived and its expected transaction bytes have landed; phases alternate
// parity 0, 1, 0, … and a waiter names the parity of the phase it waits for (a freshly
// initialised barrier is in phase 0, and "the phase before it", parity 1, counts as complete).
// TMA loads and bulk copies count their bytes on a barrier (complete_tx), announced by one
// arrival with mbarrier_arrive_expect_tx. Bulk reductions and stores are tracked per thread in
// bulk groups instead, like cp.async. The async proxy (TMA and the tensor cores' operand reads)
// sees ordinary shared-memory stores only after fence_proxy_async_shared().
#pragma once

#include <cuda.h>  // CUtensorMap and its enums; the encoder itself comes from the driver at run time
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"

namespace dash::cuda {

namespace ptx {

__device__ __forceinline__ void mbarrier_init(std::uint32_t barrier, std::uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(arrivals));
}

// Makes initialised barriers visible to the other threads and to the async proxy.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also raises the phase's expected transaction bytes by `bytes`.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(std::uint32_t barrier, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(std::uint32_t barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier) : "memory");
}

// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(std::uint32_t barrier, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n"
      "}\n" ::"r"(barrier),
      "r"(parity)
      : "memory");
}

// Fetches a tensor map (a __grid_constant__ kernel parameter) into the descriptor cache ahead of
// its first use.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

// The box of a 4-d map at coordinates (c0, c1, c2, c3), innermost first, into shared memory at
// `dst`; completion is counted in bytes on `barrier`. Coordinates past the tensor read as zeros.
__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, std::uint32_t dst, std::uint32_t barrier, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(barrier)
      : "memory");
}

// The box of a 3-d map at (c0, c1, c2) += the box in shared memory at `src`, asynchronously
// (added in L2; coordinates past the tensor are clipped); tracked by this thread's bulk groups.
__device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* map, std::uint32_t src, int c0, int c1, int c2) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<std::uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory into shared
// memory at `dst`, counted on `barrier`.
__device__ __forceinline__ void bulk_copy_to_shared(std::uint32_t dst, const void* src, std::uint32_t bytes,
                                                    std::uint32_t barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(barrier)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until at most Pending of this thread's bulk groups still read shared memory.
template <int Pending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(Pending) : "memory");
}
// Until at most Pending of this thread's bulk groups are incomplete.
template <int Pending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// This thread's earlier shared-memory writes become visible to the async proxy's reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace ptx

using TensorMapEncoder = PFN_cuTensorMapEncodeTiled_v12000;

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no -lcuda needed).
inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encode = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    require(found == cudaDriverEntryPointSuccess && entry != nullptr,
            "the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<TensorMapEncoder>(entry);
  }();
  return encode;
}

}  // namespace dash::cuda
