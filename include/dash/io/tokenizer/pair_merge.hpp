// The merge loop both BPE flavours share: over a sequence of token ids, repeatedly replace the
// adjacent pair that ranks best (lowest priority; the leftmost among equals) by its merged
// token, until no adjacent pair merges. Byte-level BPE ranks a pair by its merge's position in
// the merges list; llama2.c by minus the merged token's score. O(n log n): the symbols form a
// doubly linked list and candidate merges sit in a heap, discarded when found stale.
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

namespace dash::io::detail {

struct PairMergeBuffers {
  // A symbol: a token id in the linked list (-1 ends it; a symbol merged into its left
  // neighbour gets id -1).
  struct Symbol {
    int id, prev, next;
  };
  // A merge that may apply: `left` and its successor held left_id and right_id when it was
  // found; it is stale when they no longer do.
  struct Candidate {
    double priority;
    int left, left_id, right_id, merged;
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

struct PairMerge {
  double priority;  // lower merges first
  int merged;       // the token the pair becomes
};

// `merge_of(left_id, right_id)` gives the pair's PairMerge, or nullopt when it does not merge.
// `buffers` are reused across calls to save allocations.
template <class MergeOf>
void merge_pairs(std::vector<int>& ids, MergeOf&& merge_of, PairMergeBuffers& buffers) {
  using Candidate = PairMergeBuffers::Candidate;
  auto& s = buffers.symbols;
  auto& heap = buffers.heap;
  const int n = int(ids.size());
  if (n == 0) return;
  s.resize(std::size_t(n));
  for (int i = 0; i < n; ++i) s[std::size_t(i)] = {ids[std::size_t(i)], i - 1, i + 1 < n ? i + 1 : -1};
  heap.clear();
  // A min-heap on (priority, position).
  const auto later = [](const Candidate& x, const Candidate& y) {
    return x.priority != y.priority ? x.priority > y.priority : x.left > y.left;
  };
  const auto consider = [&](int left) {
    if (left < 0 || s[std::size_t(left)].next < 0) return;
    const int left_id = s[std::size_t(left)].id, right_id = s[std::size_t(s[std::size_t(left)].next)].id;
    const std::optional<PairMerge> m = merge_of(left_id, right_id);
    if (!m) return;
    heap.push_back({m->priority, left, left_id, right_id, m->merged});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate c = heap.back();
    heap.pop_back();
    auto& left = s[std::size_t(c.left)];
    if (left.id != c.left_id || left.next < 0 || s[std::size_t(left.next)].id != c.right_id) continue;  // stale
    auto& right = s[std::size_t(left.next)];
    left.id = c.merged;
    left.next = right.next;
    if (right.next >= 0) s[std::size_t(right.next)].prev = c.left;
    right.id = -1;
    consider(left.prev);
    consider(c.left);
  }
  ids.clear();
  for (int i = 0; i >= 0; i = s[std::size_t(i)].next) ids.push_back(s[std::size_t(i)].id);
}

}  // namespace dash::io::detail
