// The launch layer every CUDA kernel in csrc/ goes through, read by two compilers:
//
//   nvcc (WITH_CUDA, __CUDACC__)   the real thing: <<<>>> launches on the current stream, the
//                                  c10 device guard and launch check, CUDA_KERNEL_ASSERT.
//   g++ -DEFFK_SIM (effkernels._C_sim)  the CUDA execution simulator in csrc/sim/: the same kernel
//                                  bodies run on the CPU, every thread emulated (see sim/sim.h and
//                                  docs/cuda-simulator.md); torch CPU tensors stand in for device memory.
//
// A kernel source uses only these names for its launches, so both builds compile one copy of it:
//
//   EK_LAUNCH(grid, block, stream, kernel<targs...>)(args...);   dynamic shared memory is 0
//   EK_STREAM()                   the current CUDA stream (sim: a placeholder)
//   EK_DEVICE_GUARD(t)            a device guard for tensor t's device, as a local
//   EK_LAUNCH_CHECK()             after each launch (sim: errors were raised by the launch itself)
//   EK_ON_DEVICE(t)               does tensor t take the CUDA path (sim: every tensor does)
//   EK_KERNEL_ASSERT(cond)        device-side assert (sim: an error naming kernel, block and thread)
//   EK_SIM_ACCESS(p, bytes, w)    in vload/vstore and gload/gstore (common.h): the simulator checks
//                                 alignment, bounds and writers; nothing in every other build
//   EK_SIM_BREAK(n)               0 in every real build; in the simulator build, 1 while the
//                                 simulator's self-test switched fault n on (sim/sim.h lists them)
//   EK_LIB                        the torch.library namespace of the ops (effkernels_C, or
//                                 effkernels_sim for the simulator); register with
//                                 EK_TORCH_LIBRARY(m) / EK_TORCH_LIBRARY_IMPL(key, m)
//
// The kernel is the last macro argument because template arguments contain commas.
#pragma once

#if defined(EFFK_SIM)
#define EK_LIB effkernels_sim
#else
#define EK_LIB effkernels_C
#endif
// The extra level expands EK_LIB before torch's macros paste it into identifiers.
#define EK_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define EK_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define EK_TORCH_LIBRARY(m) EK_TORCH_LIBRARY_(EK_LIB, m)
#define EK_TORCH_LIBRARY_IMPL(key, m) EK_TORCH_LIBRARY_IMPL_(EK_LIB, key, m)

// EK_CUDA: the CUDA kernels and launchers are compiled (nvcc, or the simulator); EK_NVCC: by nvcc.
#if defined(EFFK_SIM)
#define EK_CUDA 1
#include "sim/sim.h"
#define EK_LAUNCH(grid, block, stream, ...) ::ek::sim::Launch<&__VA_ARGS__>(#__VA_ARGS__, (grid), (block))
#define EK_STREAM() (::ek::sim::stream_t{})
#define EK_DEVICE_GUARD(t) ((void)(t))
#define EK_LAUNCH_CHECK() ((void)0)
#define EK_ON_DEVICE(t) ((void)(t), true)
#define EK_KERNEL_ASSERT(cond) ::ek::sim::kernel_assert((cond), #cond)
#define EK_SIM_BREAK(n) (::ek::sim::broken(n) ? 1 : 0)
#define EK_SIM_ACCESS(p, bytes, write) ::ek::sim::access((p), (bytes), (write))
#elif defined(WITH_CUDA) && defined(__CUDACC__)
#define EK_CUDA 1
#define EK_NVCC 1
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define EK_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define EK_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#define EK_DEVICE_GUARD(t) c10::cuda::CUDAGuard ek_device_guard_((t).device())
#define EK_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define EK_ON_DEVICE(t) ((t).is_cuda())
#define EK_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#define EK_SIM_BREAK(n) 0
#define EK_SIM_ACCESS(p, bytes, write) ((void)0)
#else  // g++ without the simulator: C++ CPU paths only, no CUDA launch code
#define EK_ON_DEVICE(t) ((void)(t), false)
#define EK_SIM_BREAK(n) 0
#define EK_SIM_ACCESS(p, bytes, write) ((void)0)
#endif
