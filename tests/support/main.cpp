// Test entry point: announces the seed every random input is drawn from, so a failure can be
// repeated with DASH_TEST_SEED=<seed>.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "support/random.hpp"
#include "support/skip.hpp"

int main(int argc, char** argv) {
  std::printf("dash tests: seed %llu (DASH_TEST_SEED=%llu repeats this run)\n",
              static_cast<unsigned long long>(dash::test::run_seed()),
              static_cast<unsigned long long>(dash::test::run_seed()));
  doctest::Context context(argc, argv);
  const int status = context.run();
  return status == 0 && dash::test::skipped() ? dash::test::skip_exit_code : status;
}
