# Runs one fuzzer for a bounded time from a fresh corpus seeded with the parser's fixtures.
file(REMOVE_RECURSE ${CORPUS})
file(MAKE_DIRECTORY ${CORPUS})
if(EXISTS ${SEEDS})
  file(GLOB_RECURSE seeds ${SEEDS}/*)
  file(COPY ${seeds} DESTINATION ${CORPUS})
endif()
execute_process(COMMAND ${BINARY} ${CORPUS} -max_total_time=30 -rss_limit_mb=2048 -max_len=65536
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "fuzzer ${BINARY} failed with ${rc}")
endif()
