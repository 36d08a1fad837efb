// Which key tiles a block of queries visits in the attention forward, and which need a mask.
//
// Query i sees key j iff j ≤ i and (i − j < W or j < S) (window W ≥ 1, S sinks). For the
// queries [q0, q1) and key tiles of N keys, the tiles that hold a visible pair are
//   the band  [⌊max(0, q0 − W + 1) / N⌋, ⌊(q1 − 1) / N⌋]   (every key in it is visible to
//             some query of the block: key j ≤ q0 to q0, key j > q0 to query j),
//   the sinks [0, min(band start, ⌈S / N⌉)),
// and no others, so the work of a query block is O(W + S) keys rather than O(T). The band is
// visited from the diagonal leftwards, so each query's first tile holds its own key (for
// equal query and key tile widths) and its running maximum is finite from the start.
// Only tiles where some pair of the block is hidden (the diagonal, the window's far edge,
// the sinks' tile) apply the mask; the others run unmasked.
#pragma once

namespace dash::cuda::attention::detail {

// The mask with window and sinks clamped to the sequence length, so that int arithmetic on
// query and key positions cannot overflow.
struct VisibleKeys {
  int window;  // ≥ 1
  int sinks;   // ≥ 0

  // Bitwise rather than short-circuit operators: evaluated per element of a tile, the latter
  // compile to a divergent branch per element.
  __host__ __device__ bool operator()(int query, int key) const {
    return (key <= query) & ((query - key < window) | (key < sinks));
  }

  // Whether every pair of queries [q0, q1) × keys [k0, k1) is visible (both ranges non-empty).
  __host__ __device__ bool all_visible(int q0, int q1, int k0, int k1) const {
    return k1 - 1 <= q0 && (q1 - 1 - k0 < window || k1 <= sinks);
  }
};

// The key tiles of width kBlockN that the queries [q0, q1) visit, in visiting order.
template <int kBlockN>
struct KeyTiles {
  int diagonal;    // the band's last tile: it holds key q1 − 1
  int band;        // tiles in the band
  int sink_tiles;  // tiles left of the band that hold sinks

  __host__ __device__ KeyTiles(const VisibleKeys& mask, int q0, int q1) {
    diagonal = (q1 - 1) / kBlockN;
    const int first = (q0 - mask.window + 1 > 0 ? q0 - mask.window + 1 : 0) / kBlockN;
    band = diagonal - first + 1;
    const int sink_end = (mask.sinks + kBlockN - 1) / kBlockN;
    sink_tiles = sink_end < first ? sink_end : first;
  }

  __host__ __device__ int count() const { return band + sink_tiles; }

  // The it-th tile visited: the band from the diagonal leftwards, then the sinks' tiles.
  __host__ __device__ int operator[](int it) const {
    return it < band ? diagonal - it : sink_tiles - 1 - (it - band);
  }
};

}  // namespace dash::cuda::attention::detail
