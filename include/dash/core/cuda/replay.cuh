// Replay of a repeated sequence of launches as one CUDA graph.
//
// A search step enqueues a few thousand kernels and GEMMs. Launched one by one, the host needs
// milliseconds to enqueue them, and after each step's synchronisation the GPU waits for the
// next step's first launches; replayed as a graph they are one launch. Replay::run(key, stream,
// enqueue) runs `enqueue(stream)` eagerly the first time it sees `key`, captures it into a
// graph the second time in a row (the first run may do what a capture cannot hold, such as
// timing GEMM algorithms with synchronisations), and from then on launches the graph while
// the key stays the same. The key must name everything the launches depend on that the graph
// would freeze: pointers, sizes, and host-side switches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "dash/core/cuda.hpp"

namespace dash::cuda {

class Replay {
 public:
  Replay() = default;
  Replay(const Replay&) = delete;
  Replay& operator=(const Replay&) = delete;
  ~Replay() { reset(); }

  template <class Enqueue>
  void run(const std::vector<std::uint64_t>& key, cudaStream_t stream, Enqueue&& enqueue) {
    if (graph_ && key == captured_ && stream == captured_stream_) {
      check(cudaGraphLaunch(graph_, stream), "Replay: graph launch");
      return;
    }
    drop_graph();
    if (key != seen_) {
      seen_ = key;
      std::forward<Enqueue>(enqueue)(stream);
      return;
    }
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "Replay: begin capture");
    cudaGraph_t graph = nullptr;
    try {
      std::forward<Enqueue>(enqueue)(stream);
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    check(cudaStreamEndCapture(stream, &graph), "Replay: end capture");
    const cudaError_t made = cudaGraphInstantiate(&graph_, graph, 0);
    cudaGraphDestroy(graph);
    check(made, "Replay: graph instantiation");
    captured_ = key, captured_stream_ = stream;
    check(cudaGraphLaunch(graph_, stream), "Replay: graph launch");
  }

  // Forgets the graph and the last key: the next run() is eager.
  void reset() {
    drop_graph();
    seen_.clear();
  }

 private:
  void drop_graph() {
    if (graph_) cudaGraphExecDestroy(graph_);
    graph_ = nullptr;
    captured_.clear();
  }

  cudaGraphExec_t graph_ = nullptr;
  std::vector<std::uint64_t> seen_, captured_;
  cudaStream_t captured_stream_ = nullptr;
};

}  // namespace dash::cuda
