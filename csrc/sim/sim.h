// The CUDA execution simulator: what csrc/launch.h includes under g++ -DEFFK_SIM, so that the CUDA
// kernels of csrc/ (the same source nvcc compiles) run on the CPU for the tests (docs/cuda-simulator.md).
//
// Contract (what a kernel sees):
//   - threadIdx/blockIdx/blockDim/gridDim per emulated thread; a launch runs every block in order
//     (z, y, x), and every thread of a block as a fiber of its own (ucontext), so a thread can stop
//     at a warp-synchronous intrinsic and wait for the other lanes of its warp.
//   - __shfl_xor_sync(mask, v, laneMask[, width]): the lanes named in `mask` meet; each gets v of
//     lane ^ laneMask (its own v when that lane lies in a later `width` segment, as the hardware
//     does). A lane that calls it while not in its own mask, a named lane that has exited or waits
//     at another mask, or a source lane outside the mask is an error (undefined on the device).
//     No kernel of csrc/ uses shared memory or __syncthreads, so neither is provided.
//   - Launch limits checked as the driver does (cudaErrorInvalidConfiguration): grid.x <= 2^31-1,
//     grid.y, grid.z <= 65535, block.x, block.y <= 1024, block.z <= 64, threads per block <= 1024,
//     no zero dimension.
//   - Every vload/vstore (csrc/common.h, which every vector and V=1 row access goes through) calls
//     access(): a misaligned access is an error; with the guarded allocator on (set_guard), an
//     access outside the tensor allocation it points into, or into no tensor at all, is an error;
//     two threads of one launch storing the same element is an error, and so is a thread loading an
//     element another thread stored in the same launch (no kernel here has a barrier to order it).
//   - The guarded allocator: torch's CPU allocator replaced by one that puts guard bytes before and
//     after every allocation and fills fresh memory with 0xFF bytes (NaN in every float dtype); the
//     guards of every live allocation are checked after each launch, so a scalar store out of
//     bounds (not going through access()) is reported with the kernel that made it.
//   - half and bfloat16 are c10::Half / c10::BFloat16: float conversion rounds to nearest even,
//     as __float2half_rn / __float2bfloat16_rn do on the device. sqrtf, expf, ... are the host's
//     libm (correctly rounded or within 1 ulp), not the device's approximations.
//   - EK_KERNEL_ASSERT failing, and every error above, stops the launch and raises a c10::Error
//     naming the kernel, the block and the thread. Errors are never raised inside a fiber.
//   - broken(n): the simulator's self-test switches one deliberate fault on (set_fault), so the
//     tests can show the checks fail: 1 warp_sum's last shuffle offset 1 made 0, 2 the LayerNorm
//     forward's row bound off by one, 3 vec_ok() claiming alignment it does not have, 4 the routing
//     kernel writing rows d and d^1 to one row.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>

// CUDA's names, for code compiled by g++.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace ek {
namespace sim {

struct stream_t {};

// ---- process-wide switches and counters (defined in sim/runtime.cpp) -----------------------------

bool broken(int fault);             // is deliberate fault `fault` switched on
void set_fault(int fault);          // 0: none
void set_guard(bool on);            // the guarded CPU allocator on/off
bool guard_on();
void set_race_checks(bool on);      // the two-writer / cross-thread read checks (default on)

// One record per launch since the last reset, for the tests: which kernel, what geometry, and the
// widest access it made (16 = the vector path ran, sizeof(T) = the scalar path).
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  int max_access_bytes = 0;
  int64_t threads = 0, shuffles = 0;
};
std::vector<LaunchRecord>& launch_log();
std::string take_late_errors();     // guard corruption found when a tensor was freed (cleared)

// ---- the running launch -----------------------------------------------------------------------

const uint3& cur_tid();
const uint3& cur_bid();
const dim3& cur_block_dim();
const dim3& cur_grid_dim();

void access(const void* p, size_t bytes, bool write);
void kernel_assert(bool ok, const char* what);
uint64_t shuffle_xor(uint64_t bits, unsigned mask, int lane_mask, int width);

// Runs `body` once per thread of the grid; raises c10::Error on the first fault.
void run_grid(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& body);

template <typename... P, typename... A>
void launch_impl(void (*f)(P...), const char* name, dim3 grid, dim3 block, A&&... a) {
  // Kernel parameters are copied once, like the device's parameter space; each thread gets its own
  // by-value copies when the body calls the kernel.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(a)...);
  run_grid(name, grid, block, [&]() { std::apply(f, params); });
}

template <auto F> struct Launch {
  const char* name;
  dim3 grid, block;
  Launch(const char* n, dim3 g, dim3 b) : name(n), grid(g), block(b) {}
  template <typename... A> void operator()(A&&... a) const { launch_impl(F, name, grid, block, std::forward<A>(a)...); }
};

}  // namespace sim
}  // namespace ek

#define threadIdx (::ek::sim::cur_tid())
#define blockIdx (::ek::sim::cur_bid())
#define blockDim (::ek::sim::cur_block_dim())
#define gridDim (::ek::sim::cur_grid_dim())

template <typename T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "__shfl_xor_sync: up to 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ::ek::sim::shuffle_xor(bits, mask, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
