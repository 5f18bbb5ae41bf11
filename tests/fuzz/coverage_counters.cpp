// The executable's inline 8-bit coverage counters (-fsanitize=fuzzer), for
// open_fuzz to copy them back from its forked children. Built without
// coverage instrumentation (CMakeLists.txt): an instrumented translation unit
// that names these linker-made symbols itself clashes with the references
// SanitizerCoverage adds, and libFuzzer then sees no counters at all.
#include <cstddef>
#include <cstdint>

extern "C" {
extern uint8_t __start___sancov_cntrs[] __attribute__((weak));
extern uint8_t __stop___sancov_cntrs[] __attribute__((weak));
}

uint8_t* coverage_counters(size_t* size) {
  *size = (__start___sancov_cntrs && __stop___sancov_cntrs)
              ? static_cast<size_t>(__stop___sancov_cntrs - __start___sancov_cntrs)
              : 0;
  return __start___sancov_cntrs;
}
