// Entering OpenMP regions for the CPU kernels whose work is a loop over rows.
#pragma once

namespace engine::cpu {

// Runs `body`, whose row loop is an `omp for`, on num_threads threads. One thread runs it
// directly: the `omp for` then binds to no region and loops over every row, and the call skips
// entering an OpenMP region, ~0.5-1 us even for a team of one (measured with GCC's libgomp on
// this machine), which is a good share of a small call's time.
template <typename Body>
inline void parallel_rows(int num_threads, Body&& body) {
  if (num_threads <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(num_threads)
  body();
}

}  // namespace engine::cpu
