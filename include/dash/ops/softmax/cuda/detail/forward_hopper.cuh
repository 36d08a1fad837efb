// The Hopper attention forward (sm_90a): TMA, mbarriers and wgmma, for d_head 64 and 128.
//
// A work item is 128 queries of one (batch, head); a CTA takes one item of every block of
// gridDim.x items (blockIdx.x-th forwards, then backwards, in turn) and runs three warpgroups:
//   producer   one thread issues TMA loads: per item the q tile (into one of kQStages buffers),
//              then per key tile (in the order of forward_tiles.cuh) the k and v tiles into
//              rings of kKStages and kVStages buffers, guarded by mbarriers (full: bytes landed;
//              empty: every consumer warp is done with k or v, both warpgroups' o are out of the
//              q buffer). The rings run on across items, and an item's q is loaded as soon as
//              its buffer is free, so loads overlap the previous item's tail;
//   consumers  two warpgroups of 64 queries each. Per key tile n, with P_{n−1} kept in
//              registers as bf16 (the A operand of the second product):
//                S_n = Q K_nᵀ          (wgmma, A and B from shared memory, issued first)
//                O  += P_{n−1} V_{n−1} (wgmma, A from registers, V as the transposed B operand)
//                wait for S_n only; online softmax of S_n (forward_softmax.cuh) overlaps the
//                second product; wait for it; O ← α_n·O; P_n = bf16(exp(S_n − m_n))
//              and after the last tile O += P V, O /= l, lse = λ·m + ln l; lse stored from
//              registers, O staged in the warpgroup's half of the item's q buffer and stored by
//              TMA (cp.async.bulk.tensor), whole lines at a time.
//              The tiles of consecutive items form one stream: the next item's first S is
//              issued with the current item's last P V (see the kernel).
//              Optionally (kAlternate) the two take turns issuing their products.
// Every tile in shared memory is stored as 128-byte rows (64 bf16 of d) in the 128-byte swizzle
// that TMA writes and wgmma reads: 16-byte chunk c of row r sits at chunk c ⊕ (r mod 8); a
// 128-wide head is two such column blocks ("atoms"). Queries and keys past T are zeros from
// TMA's out-of-bounds fill and never visible to a query i < T; rows past T are not stored.
//
// The pair forward (kPair) runs the causal walk and also writes the SlidingWindow output of
// window W over the same q, k, v. Walking from the diagonal leftwards, a row i has seen all of
// its window's keys [max(0, i − W + 1), i] once the walk reaches its edge tile
// e_i = ⌊max(0, i − W + 1) / 128⌋. A warpgroup's edge tiles are at most two adjacent ones (its
// 64 rows' edges span 64 keys); on each of them the tile is taken in two parts:
//   in  (keys j ≥ i − W + 1): m, l, α and P from the in-window scores only, O += P_in V;
//       the rows with e_i here then store O / l and λ·m + ln l as the window's output;
//   out (keys j ≤ i − W):      m' = max(m, max s_out), α = 2^((m − m')·λ·log2 e), O ← α·O,
//       P_out as the tile's P for the causal walk's P V, which goes on leftwards (computed
//       while P_in V runs; O is rescaled once the window's output is out).
// So the window's statistics never see an out-of-window score (its l cannot underflow under a
// larger causal maximum), and the causal output is the same online softmax over the same
// pairs, one tile taken in two steps. A warpgroup whose rows all have i < W (the window covers
// every causal key) writes its causal output to both.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums; the encoder itself comes from the driver at run time
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dash/core/cuda.hpp"
#include "dash/core/cuda/numeric.cuh"
#include "dash/core/cuda/shared.cuh"
#include "dash/core/cuda/tma.cuh"
#include "dash/core/cuda/wgmma.cuh"
#include "dash/core/error.hpp"
#include "dash/ops/softmax/cuda/detail/forward_softmax.cuh"
#include "dash/ops/softmax/cuda/detail/forward_tiles.cuh"
#include "dash/ops/softmax/cuda/params.cuh"

namespace dash::cuda::attention::detail {

// The box in shared memory at `src` stored to a 4-d map at (c0, c1, c2, c3), asynchronously;
// coordinates past the tensor are not written. Tracked by this thread's bulk groups.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, std::uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<std::uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// kQStages q buffers: 1 when every CTA runs one work item, 2 when CTAs run several (the next
// item's q then loads while the current one runs; at d_head 128 a v stage makes room for it:
// v is needed a product later than k, and loaded a tile later).
template <int kHeadDim, int kQStages>
struct HopperTile {
  static_assert(kHeadDim == 64 || kHeadDim == 128);
  static_assert(kQStages == 1 || kQStages == 2);
  static constexpr int kConsumers = 2;             // warpgroups of 64 queries
  static constexpr int kBlockM = 64 * kConsumers;  // queries per work item
  static constexpr int kBlockN = 128;              // keys per tile
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kKStages = kHeadDim == 64 ? 4 : 3;              // k buffers
  static constexpr int kVStages = kHeadDim == 64 ? 4 : 4 - kQStages;  // v buffers
  static constexpr int kAtoms = kHeadDim / 64;                        // 128-byte column blocks along d
  static constexpr int kQAtomBytes = kBlockM * 128;
  static constexpr int kKvAtomBytes = kBlockN * 128;
  static constexpr int kQTileBytes = kAtoms * kQAtomBytes;
  static constexpr int kKvTileBytes = kAtoms * kKvAtomBytes;
  static constexpr int kBarrierBytes = 8 * 2 * (kQStages + kKStages + kVStages);
  // 1024 bytes of slack to align the tiles to the swizzle's 1024-byte period.
  static constexpr int kSharedBytes =
      1024 + kQStages * kQTileBytes + (kKStages + kVStages) * kKvTileBytes + kBarrierBytes;
  static_assert(kSharedBytes <= 227 * 1024);
  // The producer needs few registers; a consumer holds S (64), P (32) and O (kHeadDim / 2).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= 65536);
};

// Use number `it` (counted from 0) of a ring of kDepth buffers: buffer it mod kDepth, in its
// (it / kDepth)-th round, whose parity the buffer's mbarriers track.
template <int kDepth>
struct BufferRing {
  static __device__ int slot(int it) { return it % kDepth; }
  static __device__ std::uint32_t parity(int it) { return std::uint32_t(it / kDepth) & 1u; }
};

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

// The pair forward's window output: o [B, T, H, D] (16-byte aligned, strides multiples of 8
// elements) and lse [B, H, T], for the window W clamped to T.
struct WindowOutput {
  bfloat16* o = nullptr;
  Strides o_strides;
  float* lse = nullptr;
  int window = 0;
};

// kAlternate: the two consumers take turns issuing their products (named barriers 1 and 2),
// so that one exponentiates while the other's products run, rather than both at once.
//
// The consumers walk one stream of key tiles over all of the CTA's work items, the first tile
// of the next item right after the last tile of the current one: the next item's S = Q K₀ᵀ
// (its q already loaded, with two q buffers) is issued together with the current item's last
// O += P V and exponentiated while that runs; then the current item's O is finished and
// stored, and the next item's O starts from zero. A CTA running several items so pays the
// pipeline's fill and drain once, not once per item.
// kPair: the causal walk (params.mask causal) also writes `window`'s output (see the top).
template <int kHeadDim, int kQStages, bool kAlternate, bool kPair = false>
__global__ void __launch_bounds__(HopperTile<kHeadDim, kQStages>::kThreads, 1)
    forward_hopper_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                          const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap o_map,
                          const ForwardParams params,
                          const VisibleKeys mask, const WindowOutput window) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace ptx;
  using Tile = HopperTile<kHeadDim, kQStages>;
  constexpr int kConsumers = Tile::kConsumers;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  constexpr int kKStages = Tile::kKStages, kVStages = Tile::kVStages;
  constexpr int kAtoms = Tile::kAtoms, kQAtomBytes = Tile::kQAtomBytes, kKvAtomBytes = Tile::kKvAtomBytes;
  constexpr int kQTileBytes = Tile::kQTileBytes, kKvTileBytes = Tile::kKvTileBytes;

  extern __shared__ unsigned char shared_bytes[];
  const std::uint32_t tiles_base = (shared_address(shared_bytes) + 1023u) & ~1023u;
  const std::uint32_t kv_base = tiles_base + kQStages * kQTileBytes;
  const auto q_tile = [&](int slot) { return tiles_base + kQTileBytes * slot; };
  const auto k_tile = [&](int stage) { return kv_base + kKvTileBytes * stage; };
  const auto v_tile = [&](int stage) { return kv_base + kKvTileBytes * (kKStages + stage); };
  const std::uint32_t barriers = kv_base + kKvTileBytes * (kKStages + kVStages);
  const auto q_full = [&](int slot) { return barriers + 8 * slot; };
  const auto q_empty = [&](int slot) { return barriers + 8 * (kQStages + slot); };
  const std::uint32_t kv_barriers = barriers + 8 * 2 * kQStages;
  const auto k_full = [&](int stage) { return kv_barriers + 8 * stage; };
  const auto k_empty = [&](int stage) { return kv_barriers + 8 * (kKStages + stage); };
  const auto v_full = [&](int stage) { return kv_barriers + 8 * (2 * kKStages + stage); };
  const auto v_empty = [&](int stage) { return kv_barriers + 8 * (2 * kKStages + kVStages + stage); };
  // Position `it` of the k and v streams (counted over all of this CTA's work items) and the
  // CTA's round-th item's q, each in its ring of buffers.
  using QRing = BufferRing<kQStages>;
  using KRing = BufferRing<kKStages>;
  using VRing = BufferRing<kVStages>;

  const WorkItems<kBlockM> work(params);
  const int length = params.length, group = params.n_heads / params.n_kv_heads;
  // The CTA's round-th work item: the rounds take the items in blocks of gridDim.x, alternately
  // forwards and backwards, so that with items sorted longest first the CTAs' total work evens out.
  const auto work_item = [&](int round) {
    return round * int(gridDim.x) + (round % 2 == 0 ? int(blockIdx.x) : int(gridDim.x) - 1 - int(blockIdx.x));
  };

  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kQStages; ++slot) {
      mbarrier_init(q_full(slot), 1);
      mbarrier_init(q_empty(slot), kConsumers);  // one arrival per consumer warpgroup, once its o is out
    }
    for (int stage = 0; stage < kKStages; ++stage) {
      mbarrier_init(k_full(stage), 1);
      mbarrier_init(k_empty(stage), 4 * kConsumers);
    }
    for (int stage = 0; stage < kVStages; ++stage) {
      mbarrier_init(v_full(stage), 1);
      mbarrier_init(v_empty(stage), 4 * kConsumers);
    }
    mbarrier_init_fence();
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
                            std::uint32_t parity, int key0, int kv_head, int batch) {
        mbarrier_wait(empty, parity ^ 1u);
        mbarrier_arrive_expect_tx(full, kKvTileBytes);
        for (int a = 0; a < kAtoms; ++a) tma_load_4d(map, tile + a * kKvAtomBytes, full, 64 * a, key0, kv_head, batch);
      };
      int it = 0;
      for (int round = 0, w = work_item(0); w < work.count; w = work_item(++round)) {
        const auto [m_block, head, batch] = work[w];
        const int q0 = m_block * kBlockM, kv_head = head / group;
        const KeyTiles<kBlockN> tiles(mask, q0, min(q0 + kBlockM, length));
        const int slot = QRing::slot(round);
        mbarrier_wait(q_empty(slot), QRing::parity(round) ^ 1u);
        mbarrier_arrive_expect_tx(q_full(slot), kQTileBytes);
        for (int a = 0; a < kAtoms; ++a)
          tma_load_4d(&q_map, q_tile(slot) + a * kQAtomBytes, q_full(slot), 64 * a, q0, head, batch);
        // k runs one tile ahead of v, as the consumers use them.
        const auto load_v = [&](int it, int tile) {
          const int stage = VRing::slot(it);
          load(&v_map, v_tile(stage), v_full(stage), v_empty(stage), VRing::parity(it), tile * kBlockN, kv_head, batch);
        };
        for (int j = 0; j < tiles.count(); ++j, ++it) {
          const int stage = KRing::slot(it);
          load(&k_map, k_tile(stage), k_full(stage), k_empty(stage), KRing::parity(it), tiles[j] * kBlockN, kv_head,
               batch);
          if (j > 0) load_v(it - 1, tiles[j - 1]);
        }
        load_v(it - 1, tiles[tiles.count() - 1]);
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

  float s[64];
  std::uint32_t p[32];
  float o[kHeadDim / 2];
  float alpha[2];

  // q and k are K-major: rows of 128 bytes, 8-row groups 1024 bytes apart. v is read as the
  // MN-major B operand: keys are its K dimension, d its N dimension in 64-wide column blocks.
  const auto issue_scores = [&](int it, int round) {
    const std::uint64_t q_descriptor = wgmma_descriptor(q_tile(QRing::slot(round)) + 64 * consumer * 128, 16, 1024);
    const std::uint64_t k_descriptor = wgmma_descriptor(k_tile(KRing::slot(it)), 16, 1024);
    fence_registers(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      // 16 columns of d: atom kk / 4, 32 bytes per step inside the 128-byte swizzled row.
      const std::uint32_t step = (kk % 4) * 32;
      wgmma_ss<0, 0>(s, q_descriptor + (((kk / 4) * kQAtomBytes + step) >> 4),
                     k_descriptor + (((kk / 4) * kKvAtomBytes + step) >> 4), kk > 0);
    }
    wgmma_commit();
  };
  const auto issue_values = [&](int it) {
    const std::uint64_t v_descriptor = wgmma_descriptor(v_tile(VRing::slot(it)), kKvAtomBytes, 1024);
    fence_registers(o);
    fence_registers(p);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)  // 16 keys: two 8-row groups of 128 bytes
      wgmma_rs<1>(o, *reinterpret_cast<const std::uint32_t(*)[4]>(&p[4 * kk]), v_descriptor + ((kk * 16 * 128) >> 4),
                  1);
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

  // A work item as the consumers see it.
  struct Item {
    int head, batch;
    int round;  // the CTA's round-th item
    int q0;     // its first query
    KeyTiles<kBlockN> tiles;
  };
  const auto item_at = [&](int w, int round) {
    const auto [m_block, head, batch] = work[w];
    const int q0 = m_block * kBlockM;
    return Item{head, batch, round, q0, KeyTiles<kBlockN>(mask, q0, min(q0 + kBlockM, length))};
  };
  // Scores of tile j of `item` → P in place, α for the accumulator, the mask where needed.
  OnlineSoftmax softmax;
  const auto softmax_tile = [&](const Item& item, int j) {
    const int k0 = item.tiles[j] * kBlockN;
    const int first_row = item.q0 + 64 * consumer;  // this warpgroup's queries: [first_row, first_row + 64)
    if (!mask.all_visible(first_row, first_row + 64, k0, k0 + kBlockN))
      hide_masked<kBlockN / 8>(s, mask, item.q0 + row_in_block, k0 + 2 * (lane % 4));
    softmax.update<kBlockN / 8>(s, scale_log2, alpha);
  };
  // o / l and lse of a finished item (rows past T are not stored). lse from registers; o through
  // this warpgroup's half of the item's q buffer (its last S is done, and the other warpgroup
  // reads only its own half), in the 128-byte swizzle of the tiles, then out by one TMA store
  // per 64 columns: whole lines rather than 16 bytes of 8 rows per store instruction. The q
  // buffer goes back to the producer once the store has read it (release_stored_q): after the
  // next step has issued its products, or before a step that waits for a q.
  int stored_slot = -1;  // the q buffer holding a stored o not yet released
  const auto release_stored_q = [&] {
    if (stored_slot < 0) return;
    if (thread == 0) {
      bulk_wait_read<0>();
      mbarrier_arrive(q_empty(stored_slot));
    }
    stored_slot = -1;
  };
  // The pair forward's window output of this thread's rows r with store[r] (rows past T never),
  // straight from registers: a quad holds 2 of every 8 columns of its row; a 4 × 4 transpose
  // over the quad per 32 columns gives each thread 8 adjacent columns, one 16-byte store.
  const auto store_window_rows = [&](const Item& item, const float (&inverse_sum)[2], const float (&lse)[2],
                                     const bool (&store)[2]) {
    const int row = item.q0 + row_in_block, quad_lane = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool stored = store[r] && row + 8 * r < length;
      if (stored && quad_lane == 0)
        window.lse[(std::int64_t(item.batch) * params.n_heads + item.head) * length + row + 8 * r] = lse[r];
      bfloat16* const out = window.o + std::int64_t(item.batch) * window.o_strides.batch +
                            std::int64_t(row + 8 * r) * window.o_strides.token + item.head * kHeadDim;
#pragma unroll
      for (int g = 0; g < kHeadDim / 32; ++g) {
        std::uint32_t a[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          a[u] = pack_bf16x2(o[4 * (4 * g + u) + 2 * r] * inverse_sum[r], o[4 * (4 * g + u) + 2 * r + 1] * inverse_sum[r]);
        // Swap the 2 × 2 blocks across lanes t, t ^ 2, then the pairs within them across t, t ^ 1:
        // afterwards a[u] holds columns 2u, 2u + 1 of fragment 4g + quad_lane.
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const bool high = quad_lane & 2;
          const std::uint32_t other = __shfl_xor_sync(0xffffffffu, high ? a[u] : a[2 + u], 2);
          if (high) a[u] = other; else a[2 + u] = other;
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const bool odd = quad_lane & 1;
          const std::uint32_t other = __shfl_xor_sync(0xffffffffu, odd ? a[2 * u] : a[2 * u + 1], 1);
          if (odd) a[2 * u] = other; else a[2 * u + 1] = other;
        }
        if (stored) *reinterpret_cast<uint4*>(out + 8 * (4 * g + quad_lane)) = make_uint4(a[0], a[1], a[2], a[3]);
      }
    }
  };
  // The pair forward: the first row of this warpgroup and its last row below T; none of its rows
  // is below T when last < first.
  const auto window_rows = [&](const Item& item, int& first, int& last) {
    first = item.q0 + 64 * consumer;
    last = min(first + 63, length - 1);
  };
  // Whether this warpgroup's rows all see their whole causal range in the window.
  const auto window_covers = [&](const Item& item) {
    int first, last;
    window_rows(item, first, last);
    return last < window.window;
  };
  // The pair forward: whether tile j of `item` is an edge tile of this warpgroup's rows.
  const auto edge_tile = [&](const Item& item, int j) {
    int first, last;
    window_rows(item, first, last);
    if (last < first || last < window.window) return false;  // no row below T, or covered
    const int n = item.tiles[j];
    return max(0, first - window.window + 1) / kBlockN <= n && n <= (last - window.window + 1) / kBlockN;
  };
  const auto store_item = [&](const Item& item, const float (&inverse_sum)[2], const float (&lse)[2]) {
    const int row = item.q0 + row_in_block;  // this thread's first query; the second is row + 8
    if constexpr (kPair)
      if (window_covers(item)) {
        const bool all[2] = {true, true};
        store_window_rows(item, inverse_sum, lse, all);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (lane % 4 == 0 && row + 8 * r < length)
        params.lse[(std::int64_t(item.batch) * params.n_heads + item.head) * length + row + 8 * r] = lse[r];
    const int slot = QRing::slot(item.round);
    const std::uint32_t staging = q_tile(slot) + 64 * consumer * 128;
#pragma unroll
    for (int f = 0; f < kHeadDim / 8; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int staged_row = 16 * warp + lane / 4 + 8 * r;  // row within the warpgroup's 64
        st_shared_u32(staging + (f / 8) * kQAtomBytes + staged_row * 128 + (((f % 8) ^ (staged_row % 8)) * 16) +
                          4 * (lane % 4),
                      pack_bf16x2(o[4 * f + 2 * r] * inverse_sum[r], o[4 * f + 2 * r + 1] * inverse_sum[r]));
      }
    fence_proxy_async_shared();
    named_barrier_sync(3 + consumer, 128);  // the warpgroup's rows are all in
    if (thread == 0 && item.q0 + 64 * consumer < length) {  // else every row is past T
      for (int a = 0; a < kAtoms; ++a)
        tma_store_4d(&o_map, staging + a * kQAtomBytes, 64 * a, item.q0 + 64 * consumer, item.head, item.batch);
      bulk_commit();
    }
    stored_slot = slot;
  };

  // The pair forward's edge tile j of `item` (scores in s, O ready and no product in flight,
  // visit `visit` of the key stream): the in-window part, the window's output of the rows whose
  // edge tile it is, then the out-of-window part as the tile's P for the causal walk. The
  // in-window P V is issued outside the consumers' turns: the other consumer may have no edge
  // tile at this step.
  const auto split_edge_tile = [&](const Item& item, int j, int visit) {
    const int n = item.tiles[j];
    const int row = item.q0 + row_in_block, key = n * kBlockN + 2 * (lane % 4);
    int first[2], last[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      last[r] = row + 8 * r - key;
      first[r] = last[r] - window.window + 1;
    }
    softmax.update_range<kBlockN / 8>(s, first, last, scale_log2, alpha, p);
    rescale_rows<kHeadDim / 8>(o, alpha);
    mbarrier_wait(v_full(VRing::slot(visit)), VRing::parity(visit));
    issue_values(visit);
    float inverse_sum[2], lse[2];
    softmax.finish(params.scale, inverse_sum, lse);
    // The out-of-window part (columns up to first − 1) in place in s, while that P V runs.
#pragma unroll
    for (int f = 0; f < kBlockN / 8; ++f)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = s[4 * f + 2 * r + c];
          x = 8 * f + c < first[r] ? x : minus_infinity;
        }
    softmax.update<kBlockN / 8>(s, scale_log2, alpha);
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(p);
    bool edge_here[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) edge_here[r] = max(0, row + 8 * r - window.window + 1) / kBlockN == n;
    store_window_rows(item, inverse_sum, lse, edge_here);
    rescale_rows<kHeadDim / 8>(o, alpha);
    scores_to_operand();
  };

  if constexpr (kAlternate)
    if (consumer == 1) named_barrier_arrive(1, 256);

  // The first tile of the first item; then per step, the visit `it` of the key stream (tile j of
  // `item`, its scores already turned into P) and the visit it + 1: tile j + 1 of `item` (the
  // inner loop), or the first tile of the next item (kNextItem, which also finishes `item`);
  // finally the last visit's P V.
  Item item = item_at(work_item(0), 0);
  int it = 0;
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
  mbarrier_wait(q_full(QRing::slot(0)), QRing::parity(0));
  mbarrier_wait(k_full(KRing::slot(0)), KRing::parity(0));
  wait_turn();
  issue_scores(0, 0);
  pass_turn();
  wgmma_wait<0>();
  fence_registers(s);
  release(k_empty(KRing::slot(0)));
  if (kPair && edge_tile(item, 0)) {
    split_edge_tile(item, 0, 0);
  } else {
    softmax_tile(item, 0);
    scores_to_operand();
  }
  const auto step = [&](auto next_item, const Item& next, int next_j) {
    constexpr bool kNextItem = decltype(next_item)::value;
    if constexpr (kNextItem) {
      release_stored_q();
      mbarrier_wait(q_full(QRing::slot(next.round)), QRing::parity(next.round));
    }
    mbarrier_wait(k_full(KRing::slot(it + 1)), KRing::parity(it + 1));
    wait_turn();
    issue_scores(it + 1, next.round);
    mbarrier_wait(v_full(VRing::slot(it)), VRing::parity(it));
    issue_values(it);
    pass_turn();
    release_stored_q();
    // The item's softmax statistics are final once its last tile's scores are in.
    float inverse_sum[2], lse[2];
    if constexpr (kNextItem) {
      softmax.finish(params.scale, inverse_sum, lse);
      softmax = OnlineSoftmax{};
    }
    wgmma_wait<1>();  // the scores of visit it + 1 are ready; P V of visit it may still run
    fence_registers(s);
    release(k_empty(KRing::slot(it + 1)));
    // An edge tile of the pair forward waits for O (its in-window part adds to it).
    const bool edge = kPair && edge_tile(next, next_j);
    if (!edge) softmax_tile(next, next_j);
    wgmma_wait<0>();
    fence_registers(o);
    fence_registers(p);
    release(v_empty(VRing::slot(it)));
    ++it;
    if constexpr (kNextItem) {
      store_item(item, inverse_sum, lse);
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
    } else if (!edge) {
      rescale_rows<kHeadDim / 8>(o, alpha);
    }
    if (edge)
      split_edge_tile(next, next_j, it);
    else
      scores_to_operand();
  };
  while (true) {
    for (int j = 1; j < item.tiles.count(); ++j) step(std::false_type{}, item, j);
    const int next_w = work_item(item.round + 1);
    if (next_w >= work.count) break;
    const Item next = item_at(next_w, item.round + 1);
    step(std::true_type{}, next, 0);
    item = next;
  }
  mbarrier_wait(v_full(VRing::slot(it)), VRing::parity(it));
  issue_values(it);
  float inverse_sum[2], lse[2];
  softmax.finish(params.scale, inverse_sum, lse);
  wgmma_wait<0>();
  fence_registers(o);
  fence_registers(p);
  release(v_empty(VRing::slot(it)));
  store_item(item, inverse_sum, lse);
  release_stored_q();  // its reads of shared memory are over before the CTA exits
#else
  __trap();  // built without sm_90a: the launcher never takes this path on such a build's devices
#endif
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

// Launches forward_hopper_kernel<kHeadDim, kQStages, kAlternate, kPair> on `ctas` CTAs.
template <int kHeadDim, int kQStages, bool kAlternate, bool kPair>
void launch_forward_hopper_ctas(const ForwardParams& params, const VisibleKeys& mask, const WindowOutput& window,
                                int ctas, cudaStream_t stream) {
  using Tile = HopperTile<kHeadDim, kQStages>;
  const CUtensorMap q_map = head_tile_map(params.q, params.q_strides, params.batch, params.length, params.n_heads,
                                          kHeadDim, Tile::kBlockM, "q");
  const CUtensorMap k_map = head_tile_map(params.k, params.k_strides, params.batch, params.length,
                                          params.n_kv_heads, kHeadDim, Tile::kBlockN, "k");
  const CUtensorMap v_map = head_tile_map(params.v, params.v_strides, params.batch, params.length,
                                          params.n_kv_heads, kHeadDim, Tile::kBlockN, "v");
  // o is stored by each consumer warpgroup, 64 rows at a time.
  const CUtensorMap o_map = head_tile_map(params.o, params.o_strides, params.batch, params.length, params.n_heads,
                                          kHeadDim, 64, "o");
  const auto kernel = forward_hopper_kernel<kHeadDim, kQStages, kAlternate, kPair>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSharedBytes),
        "attention::forward: cudaFuncSetAttribute (Hopper kernel shared memory)");
  kernel<<<ctas, Tile::kThreads, Tile::kSharedBytes, stream>>>(q_map, k_map, v_map, o_map, params, mask, window);
  check(cudaGetLastError(), "attention::forward: Hopper kernel launch");
}

// Launches the Hopper kernel on at most `max_ctas` CTAs, each taking one item per gridDim.x:
// with two q buffers where a CTA takes several, with one (and, at d_head 128, a deeper v ring)
// otherwise. With kPair, params.mask is causal and `window` receives the window's output.
template <int kHeadDim, bool kAlternate, bool kPair = false>
void launch_forward_hopper(const ForwardParams& params, const VisibleKeys& mask, int max_ctas, cudaStream_t stream,
                           const WindowOutput& window = {}) {
  const WorkItems<HopperTile<kHeadDim, 1>::kBlockM> work(params);
  if (work.count > max_ctas)
    launch_forward_hopper_ctas<kHeadDim, 2, kAlternate, kPair>(params, mask, window, max_ctas, stream);
  else
    launch_forward_hopper_ctas<kHeadDim, 1, kAlternate, kPair>(params, mask, window, work.count, stream);
}

}  // namespace dash::cuda::attention::detail
