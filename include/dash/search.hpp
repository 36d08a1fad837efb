// dash: differentiable architecture search for hybrid attention. The umbrella header.
#pragma once

#include "dash/core/dtype.hpp"
#include "dash/core/error.hpp"
#include "dash/core/rng.hpp"
#include "dash/core/tensor.hpp"
#include "dash/ops/attention.hpp"
#include "dash/ops/operator.hpp"
#include "dash/ops/rope.hpp"
#include "dash/mixed_attention.hpp"
