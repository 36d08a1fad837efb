// dash: differentiable architecture search for hybrid attention. The umbrella header.
#pragma once

#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/mixed_attention.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/gated_delta_net.hpp"
#include "dash/ops/gated_linear.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/projections.hpp"
#include "dash/ops/rope.hpp"
#include "dash/ops/sliding_window.hpp"
#include "dash/ops/softmax.hpp"
