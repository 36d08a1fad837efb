// The Hopper attention forward (sm_90a): TMA, mbarriers and wgmma, for d_head 64 and 128.
//
// A work item is 128 queries of one (batch, head); a CTA takes the items blockIdx.x,
// blockIdx.x + gridDim.x, … and runs three warpgroups:
//   producer   one thread issues TMA loads: per item the q tile, then per key tile (in the order
//              of forward_tiles.cuh) the k and v tiles into rings of kStages buffers, guarded
//              by mbarriers (full: bytes landed; empty: every consumer warp is done). The rings
//              run on across items, and the next item's q is loaded as soon as the consumers
//              finished their last product with the current one, so loads overlap the tail;
//   consumers  two warpgroups of 64 queries each. Per key tile n, with P_{n−1} kept in
//              registers as bf16 (the A operand of the second product):
//                S_n = Q K_nᵀ          (wgmma, A and B from shared memory, issued first)
//                O  += P_{n−1} V_{n−1} (wgmma, A from registers, V as the transposed B operand)
//                wait for S_n only; online softmax of S_n (forward_softmax.cuh) overlaps the
//                second product; wait for it; O ← α_n·O; P_n = bf16(exp(S_n − m_n))
//              and after the last tile O += P V, O /= l, lse = λ·m + ln l, stored from registers.
//              Optionally (kAlternate) the two take turns issuing their products.
// Every tile in shared memory is stored as 128-byte rows (64 bf16 of d) in the 128-byte swizzle
// that TMA writes and wgmma reads: 16-byte chunk c of row r sits at chunk c ⊕ (r mod 8); a
// 128-wide head is two such column blocks ("atoms"). Queries and keys past T are zeros from
// TMA's out-of-bounds fill and never visible to a query i < T; rows past T are not stored.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums; the encoder itself comes from the driver at run time
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dash/core/cuda.hpp"
#include "dash/core/error.hpp"
#include "dash/ops/softmax/cuda/detail/forward_softmax.cuh"
#include "dash/ops/softmax/cuda/detail/forward_tiles.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention::detail {

template <int kHeadDim>
struct HopperTile {
  static_assert(kHeadDim == 64 || kHeadDim == 128);
  static constexpr int kConsumers = 2;             // warpgroups of 64 queries
  static constexpr int kBlockM = 64 * kConsumers;  // queries per work item
  static constexpr int kBlockN = 128;              // keys per tile
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kStages = kHeadDim == 64 ? 4 : 3;  // k and v buffers each
  static constexpr int kAtoms = kHeadDim / 64;             // 128-byte column blocks along d
  static constexpr int kQAtomBytes = kBlockM * 128;
  static constexpr int kKvAtomBytes = kBlockN * 128;
  static constexpr int kQTileBytes = kAtoms * kQAtomBytes;
  static constexpr int kKvTileBytes = kAtoms * kKvAtomBytes;
  static constexpr int kBarrierBytes = 8 * (2 + 4 * kStages);
  // 1024 bytes of slack to align the tiles to the swizzle's 1024-byte period.
  static constexpr int kSharedBytes = 1024 + kQTileBytes + 2 * kStages * kKvTileBytes + kBarrierBytes;
  static_assert(kSharedBytes <= 227 * 1024);
  // The producer needs few registers; a consumer holds S (64), P (32) and O (kHeadDim / 2).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= 65536);
};

namespace hopper {

__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(std::uint32_t barrier, std::uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(arrivals));
}

__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_expect_bytes(std::uint32_t barrier, std::uint32_t bytes) {
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

// One box of the map at coordinates (d, token, head, batch) into shared memory; completion is
// counted in bytes on `barrier`.
__device__ __forceinline__ void tma_load(const CUtensorMap* map, std::uint32_t destination, std::uint32_t barrier,
                                         int d, int token, int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(destination),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(d), "r"(token), "r"(head), "r"(batch), "r"(barrier)
      : "memory");
}

template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Fetches a TMA descriptor (a kernel parameter) into the descriptor cache ahead of its first use.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

// Shared memory matrix descriptor of wgmma with the 128-byte swizzle: start address, leading
// and stride byte offsets (in 16-byte units), swizzle mode 1 in bits 62-63. For K-major
// operands the stride offset is the distance between 8-row groups and the leading offset is
// unused; for MN-major ones the leading offset is the distance between 64-element column blocks.
__device__ __forceinline__ std::uint64_t matrix_descriptor(std::uint32_t address, std::uint32_t leading_bytes,
                                                           std::uint32_t stride_bytes) {
  return std::uint64_t((address & 0x3FFFF) >> 4) | std::uint64_t((leading_bytes >> 4) & 0x3FFF) << 16 |
         std::uint64_t((stride_bytes >> 4) & 0x3FFF) << 32 | std::uint64_t(1) << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins registers that an asynchronous wgmma reads or writes at this point of the program, so
// that the compiler neither moves their other uses across the wgmma's issue or wait nor
// reuses them while it runs.
template <int N>
__device__ __forceinline__ void pin(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(std::uint32_t (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(x[i])::"memory");
}

// D (64 × 128, fp32) {=, +=} A (64 × 16, shared, K-major) · B (16 × 128, shared, K-major).
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], std::uint64_t a, std::uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}

// D (64 × 64, fp32) += A (64 × 16, registers) · B (16 × 64, shared, MN-major).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const std::uint32_t (&a)[4], std::uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// D (64 × 128, fp32) += A (64 × 16, registers) · B (16 × 128, shared, MN-major).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const std::uint32_t (&a)[4], std::uint64_t b) {
  if constexpr (N == 64)
    wgmma_m64n64k16_rs(d, a, b);
  else
    wgmma_m64n128k16_rs(d, a, b);
}

}  // namespace hopper

// The work items of a launch: (query block, head, batch), each head's blocks from the longest
// rows to the shortest, heads of one batch next to each other so that the items running at
// once share their k and v in L2.
template <int kBlockM>
struct WorkItems {
  int m_blocks, heads, count;

  __host__ __device__ WorkItems(const ForwardParams& p)
      : m_blocks((p.length + kBlockM - 1) / kBlockM), heads(p.n_heads), count(m_blocks * p.n_heads * p.batch) {}

  struct Item {
    int m_block, head, batch;
  };
  __host__ __device__ Item operator[](int w) const {
    return {m_blocks - 1 - w % m_blocks, (w / m_blocks) % heads, w / (m_blocks * heads)};
  }
};

// kAlternate: the two consumers take turns issuing their products (named barriers 1 and 2),
// so that one exponentiates while the other's products run, rather than both at once.
template <int kHeadDim, bool kAlternate>
__global__ void __launch_bounds__(HopperTile<kHeadDim>::kThreads, 1)
    forward_hopper_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                          const __grid_constant__ CUtensorMap v_map, const ForwardParams params,
                          const VisibleKeys mask) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace hopper;
  using Tile = HopperTile<kHeadDim>;
  constexpr int kConsumers = Tile::kConsumers;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kStages = Tile::kStages;
  constexpr int kAtoms = Tile::kAtoms, kQAtomBytes = Tile::kQAtomBytes, kKvAtomBytes = Tile::kKvAtomBytes;
  constexpr int kKvTileBytes = Tile::kKvTileBytes;

  extern __shared__ unsigned char shared_bytes[];
  const std::uint32_t q_tile = (shared_address(shared_bytes) + 1023u) & ~1023u;
  const auto k_tile = [&](int stage) { return q_tile + Tile::kQTileBytes + kKvTileBytes * stage; };
  const auto v_tile = [&](int stage) { return q_tile + Tile::kQTileBytes + kKvTileBytes * (kStages + stage); };
  const std::uint32_t barriers = q_tile + Tile::kQTileBytes + kKvTileBytes * 2 * kStages;
  const std::uint32_t q_full = barriers, q_empty = barriers + 8;
  const auto k_full = [&](int stage) { return barriers + 8 * (2 + stage); };
  const auto k_empty = [&](int stage) { return barriers + 8 * (2 + kStages + stage); };
  const auto v_full = [&](int stage) { return barriers + 8 * (2 + 2 * kStages + stage); };
  const auto v_empty = [&](int stage) { return barriers + 8 * (2 + 3 * kStages + stage); };
  // Position `it` of the k and v streams (counted over all of this CTA's work items) uses
  // buffer it mod kStages in its (it / kStages)-th round.
  const auto stage_of = [](int it) { return it % kStages; };
  const auto round_parity = [](int it) { return std::uint32_t(it / kStages) & 1u; };

  const WorkItems<kBlockM> work(params);
  const int length = params.length, group = params.n_heads / params.n_kv_heads;

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    mbarrier_init(q_empty, 4 * kConsumers);  // one arrival per consumer warp
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(k_full(stage), 1);
      mbarrier_init(v_full(stage), 1);
      mbarrier_init(k_empty(stage), 4 * kConsumers);
      mbarrier_init(v_empty(stage), 4 * kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    release_registers<Tile::kProducerRegisters>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(&q_map);
      prefetch_tensor_map(&k_map);
      prefetch_tensor_map(&v_map);
      // A buffer is refilled once the consumers released its previous round (the first round
      // waits on the phase before the first, complete from the start).
      const auto load = [&](const CUtensorMap* map, std::uint32_t tile, std::uint32_t full, std::uint32_t empty,
                            int it, int key0, int kv_head, int batch) {
        mbarrier_wait(empty, round_parity(it) ^ 1u);
        mbarrier_expect_bytes(full, kKvTileBytes);
        for (int a = 0; a < kAtoms; ++a) tma_load(map, tile + a * kKvAtomBytes, full, 64 * a, key0, kv_head, batch);
      };
      int it = 0, round = 0;
      for (int w = blockIdx.x; w < work.count; w += gridDim.x, ++round) {
        const auto [m_block, head, batch] = work[w];
        const int q0 = m_block * kBlockM, kv_head = head / group;
        const KeyTiles<kBlockN> tiles(mask, q0, min(q0 + kBlockM, length));
        mbarrier_wait(q_empty, (round & 1) ^ 1);
        mbarrier_expect_bytes(q_full, Tile::kQTileBytes);
        for (int a = 0; a < kAtoms; ++a) tma_load(&q_map, q_tile + a * kQAtomBytes, q_full, 64 * a, q0, head, batch);
        // k runs one tile ahead of v, as the consumers use them.
        for (int j = 0; j < tiles.count(); ++j, ++it) {
          load(&k_map, k_tile(stage_of(it)), k_full(stage_of(it)), k_empty(stage_of(it)), it, tiles[j] * kBlockN,
               kv_head, batch);
          if (j > 0)
            load(&v_map, v_tile(stage_of(it - 1)), v_full(stage_of(it - 1)), v_empty(stage_of(it - 1)), it - 1,
                 tiles[j - 1] * kBlockN, kv_head, batch);
        }
        load(&v_map, v_tile(stage_of(it - 1)), v_full(stage_of(it - 1)), v_empty(stage_of(it - 1)), it - 1,
             tiles[tiles.count() - 1] * kBlockN, kv_head, batch);
      }
    }
    return;
  }
  claim_registers<Tile::kConsumerRegisters>();

  const int consumer = warpgroup - 1;
  const int thread = threadIdx.x % 128, warp = thread / 32, lane = thread % 32;
  const float scale_log2 = params.scale * log2_e;
  // This thread's rows within its warpgroup's 64: `row_in_block` and row_in_block + 8.
  const int row_in_block = 64 * consumer + 16 * warp + lane / 4;

  // q and k are K-major: rows of 128 bytes, 8-row groups 1024 bytes apart. v is read as the
  // MN-major B operand: keys are its K dimension, d its N dimension in 64-wide column blocks.
  const std::uint64_t q_descriptor = matrix_descriptor(q_tile + 64 * consumer * 128, 16, 1024);
  float s[64];
  std::uint32_t p[32];
  float o[kHeadDim / 2];
  float alpha[2];

  const auto issue_scores = [&](int it) {
    const std::uint64_t k_descriptor = matrix_descriptor(k_tile(stage_of(it)), 16, 1024);
    pin(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      // 16 columns of d: atom kk / 4, 32 bytes per step inside the 128-byte swizzled row.
      const std::uint32_t step = (kk % 4) * 32;
      wgmma_m64n128k16_ss(s, q_descriptor + (((kk / 4) * kQAtomBytes + step) >> 4),
                          k_descriptor + (((kk / 4) * kKvAtomBytes + step) >> 4), kk > 0);
    }
    wgmma_commit();
  };
  const auto issue_values = [&](int it) {
    const std::uint64_t v_descriptor = matrix_descriptor(v_tile(stage_of(it)), kKvAtomBytes, 1024);
    pin(o);
    pin(p);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)  // 16 keys: two 8-row groups of 128 bytes
      wgmma_rs<kHeadDim>(o, *reinterpret_cast<const std::uint32_t(*)[4]>(&p[4 * kk]),
                         v_descriptor + ((kk * 16 * 128) >> 4));
    wgmma_commit();
  };
  // P as the A operand of m64nNk16: per 16 keys, (row, keys 2t..), (row + 8, same), (row, keys
  // 2t + 8..), (row + 8, same) — the accumulator's fragments 2kk and 2kk + 1.
  const auto scores_to_operand = [&] {
#pragma unroll
    for (int i = 0; i < 32; ++i) p[i] = pack_bf16x2(s[2 * i], s[2 * i + 1]);
  };
  const auto release = [&](std::uint32_t barrier) {
    if (lane == 0) mbarrier_arrive(barrier);
  };
  // Turn-taking: consumer c issues its products after bar.sync on barrier 1 + c and then lets
  // the other go (bar.arrive on its barrier); consumer 1 gives consumer 0 the first turn.
  const auto wait_turn = [&] {
    if constexpr (kAlternate) named_barrier_sync(1 + consumer, 256);
  };
  const auto pass_turn = [&] {
    if constexpr (kAlternate) named_barrier_arrive(2 - consumer, 256);
  };
  if constexpr (kAlternate)
    if (consumer == 1) named_barrier_arrive(1, 256);

  int it = 0, round = 0;
  for (int w = blockIdx.x; w < work.count; w += gridDim.x, ++round) {
    const auto [m_block, head, batch] = work[w];
    const int q0 = m_block * kBlockM;
    const KeyTiles<kBlockN> tiles(mask, q0, min(q0 + kBlockM, length));
    const int n_tiles = tiles.count();
    const int first_row = q0 + 64 * consumer;  // this warpgroup's queries: [first_row, first_row + 64)
    const int row = q0 + row_in_block;         // this thread's first query; the second is row + 8
    OnlineSoftmax softmax;
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
    const auto softmax_tile = [&](int j) {
      const int k0 = tiles[j] * kBlockN;
      if (!mask.all_visible(first_row, first_row + 64, k0, k0 + kBlockN))
        hide_masked<kBlockN / 8>(s, mask, row, k0 + 2 * (lane % 4));
      softmax.update<kBlockN / 8>(s, scale_log2, alpha);
    };

    mbarrier_wait(q_full, round & 1);
    mbarrier_wait(k_full(stage_of(it)), round_parity(it));
    wait_turn();
    issue_scores(it);
    pass_turn();
    wgmma_wait<0>();
    pin(s);
    release(k_empty(stage_of(it)));
    if (n_tiles == 1) release(q_empty);
    softmax_tile(0);
    scores_to_operand();
    for (int j = 1; j < n_tiles; ++j) {
      const int next = it + 1;
      mbarrier_wait(k_full(stage_of(next)), round_parity(next));
      wait_turn();
      issue_scores(next);
      mbarrier_wait(v_full(stage_of(it)), round_parity(it));
      issue_values(it);
      pass_turn();
      wgmma_wait<1>();  // S_j is ready; P_{j−1} V_{j−1} may still run
      pin(s);
      release(k_empty(stage_of(next)));
      if (j == n_tiles - 1) release(q_empty);  // the item's last read of q is done
      softmax_tile(j);
      wgmma_wait<0>();
      pin(o);
      pin(p);
      release(v_empty(stage_of(it)));
      rescale_rows<kHeadDim / 8>(o, alpha);
      scores_to_operand();
      it = next;
    }
    mbarrier_wait(v_full(stage_of(it)), round_parity(it));
    issue_values(it);
    wgmma_wait<0>();
    pin(o);
    pin(p);
    release(v_empty(stage_of(it)));
    ++it;

    float inverse_sum[2], lse[2];
    softmax.finish(params.scale, inverse_sum, lse);
    bfloat16* const out = params.o + batch * params.o_strides.batch + head * kHeadDim + 2 * (lane % 4);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = row + 8 * r;
      if (query >= length) continue;
      if (lane % 4 == 0) params.lse[(std::int64_t(batch) * params.n_heads + head) * length + query] = lse[r];
      bfloat16* const out_row = out + query * params.o_strides.token;
#pragma unroll
      for (int f = 0; f < kHeadDim / 8; ++f)
        *reinterpret_cast<std::uint32_t*>(out_row + 8 * f) =
            pack_bf16x2(o[4 * f + 2 * r] * inverse_sum[r], o[4 * f + 2 * r + 1] * inverse_sum[r]);
    }
  }
#else
  __trap();  // built without sm_90a: the launcher never takes this path on such a build's devices
#endif
}

using TensorMapEncoder = PFN_cuTensorMapEncodeTiled_v12000;

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no -lcuda needed).
inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encode = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found),
          "attention::forward: cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    require(found == cudaDriverEntryPointSuccess && entry != nullptr,
            "attention::forward: the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<TensorMapEncoder>(entry);
  }();
  return encode;
}

// A [B, T, heads, d_head] view as a TMA map over (d, token, head, batch) whose boxes are 64 d ×
// `tokens` tokens in the 128-byte swizzle; tokens past T read as zeros.
inline CUtensorMap head_tile_map(const bfloat16* base, const Strides& strides, int batch, int length, int heads,
                                 int d_head, int tokens, const char* what) {
  // With one sequence the batch stride is never applied; any valid value does.
  const std::int64_t batch_stride = batch > 1 ? strides.batch : strides.token * length;
  const cuuint64_t dims[4] = {cuuint64_t(d_head), cuuint64_t(length), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t byte_strides[3] = {cuuint64_t(strides.token) * 2, cuuint64_t(d_head) * 2,
                                      cuuint64_t(batch_stride) * 2};
  const cuuint32_t box[4] = {64, cuuint32_t(tokens), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult status =
      tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<bfloat16*>(base), dims, byte_strides,
                           box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require(status == CUDA_SUCCESS, "attention::forward: cuTensorMapEncodeTiled failed for ", what, " (CUresult ",
          int(status), ")");
  return map;
}

// Whether the consumers take turns issuing their products, per head width: at d_head 64 the
// softmax costs about as much as both products, and turns keep one warpgroup exponentiating
// while the other's products run; at 128 the products dominate and turns gained nothing.
template <int kHeadDim>
inline constexpr bool alternate_consumers = kHeadDim == 64;

// Launches the Hopper kernel on at most `max_ctas` CTAs (each takes every gridDim-th work item).
template <int kHeadDim, bool kAlternate>
void launch_forward_hopper(const ForwardParams& params, const VisibleKeys& mask, int max_ctas, cudaStream_t stream) {
  using Tile = HopperTile<kHeadDim>;
  const CUtensorMap q_map = head_tile_map(params.q, params.q_strides, params.batch, params.length, params.n_heads,
                                          kHeadDim, Tile::kBlockM, "q");
  const CUtensorMap k_map = head_tile_map(params.k, params.k_strides, params.batch, params.length,
                                          params.n_kv_heads, kHeadDim, Tile::kBlockN, "k");
  const CUtensorMap v_map = head_tile_map(params.v, params.v_strides, params.batch, params.length,
                                          params.n_kv_heads, kHeadDim, Tile::kBlockN, "v");
  const auto kernel = forward_hopper_kernel<kHeadDim, kAlternate>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSharedBytes),
        "attention::forward: cudaFuncSetAttribute (Hopper kernel shared memory)");
  const WorkItems<Tile::kBlockM> work(params);
  const int ctas = work.count < max_ctas ? work.count : max_ctas;
  kernel<<<ctas, Tile::kThreads, Tile::kSharedBytes, stream>>>(q_map, k_map, v_map, params, mask);
  check(cudaGetLastError(), "attention::forward: Hopper kernel launch");
}

}  // namespace dash::cuda::attention::detail
