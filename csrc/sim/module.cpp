// effkernels._C_sim: the Python module of the CUDA execution simulator build (docs/cuda-simulator.md).
//
// Importing it loads the library, whose static initialisers register torch.ops.effkernels_sim.*:
// the same schemas as effkernels_C (csrc/bindings.cpp) on CPU tensors, whose CUDA launches run on
// the simulator (sim.h), plus sim_probe, a tiny kernel for testing the simulator itself. The module
// exposes the simulator's switches:
//   set_guard(bool)         the guarded CPU allocator (bounds and guard checks) on or off
//   set_fault(int)          switch deliberate fault n on (0: off), see sim.h
//   set_race_checks(bool)   the one-writer / cross-thread read checks
//   launches()              [(kernel, grid, block, max_access_bytes, threads, shuffles)] since the
//                           last call (which clears the log)
//   late_errors()           guard damage found when tensors were freed, since the last call
#include <Python.h>

#include <torch/library.h>

#include "../common.h"

namespace ek {
namespace {

// One int64 per thread of the grid: its global index, or (mask != 0) the value __shfl_xor_sync
// returns for it. Lanes below `exit_lanes` of every warp return first. The threads past the end of
// `out` store too when `past_end` > 0 (that many): through vstore, or (`raw`) with a plain store
// that only the guard bytes can catch.
struct ProbeArgs {
  int64_t* out;
  int64_t n;
  unsigned mask;
  int64_t lane_mask, width, exit_lanes, past_end;
  bool raw;
};

__global__ void probe_kernel(ProbeArgs a) {
  const int64_t t = threadIdx.x + static_cast<int64_t>(blockDim.x) * (threadIdx.y + static_cast<int64_t>(blockDim.y) * threadIdx.z);
  const int64_t b = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  const int64_t g = b * blockDim.x * blockDim.y * blockDim.z + t;
  if (t % kWarp < a.exit_lanes) return;
  int64_t v = g;
  if (a.mask) v = __shfl_xor_sync(a.mask, v, static_cast<int>(a.lane_mask), static_cast<int>(a.width));
  if (g >= a.n + a.past_end) return;
  if (a.raw) a.out[g] = v;
  else vstore<int64_t, 1>(a.out + g, Vec<int64_t, 1>{{v}});
}

void sim_probe(at::IntArrayRef grid, at::IntArrayRef block, const at::Tensor& out, int64_t mask, int64_t lane_mask,
               int64_t width, int64_t exit_lanes, int64_t past_end, bool raw) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block must have 3 entries");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous() && out.dim() == 1, "out must be contiguous int64 1-D");
  ProbeArgs a{out.data_ptr<int64_t>(), out.numel(), static_cast<unsigned>(mask), lane_mask, width, exit_lanes,
              past_end, raw};
  dim3 g(static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2]));
  dim3 bl(static_cast<unsigned>(block[0]), static_cast<unsigned>(block[1]), static_cast<unsigned>(block[2]));
  EK_LAUNCH(g, bl, EK_STREAM(), probe_kernel)(a);
}

}  // namespace
}  // namespace ek

TORCH_LIBRARY_FRAGMENT(effkernels_sim, m) {
  m.def("sim_probe(int[] grid, int[] block, Tensor(a!) out, int mask, int lane_mask, int width, int exit_lanes,"
        " int past_end, bool raw) -> ()");
}
TORCH_LIBRARY_IMPL(effkernels_sim, CPU, m) { m.impl("sim_probe", &ek::sim_probe); }

namespace {

PyObject* py_set_guard(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  ek::sim::set_guard(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_set_race_checks(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  ek::sim::set_race_checks(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_set_fault(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  ek::sim::set_fault(static_cast<int>(n));
  Py_RETURN_NONE;
}

PyObject* py_launches(PyObject*, PyObject*) {
  auto& log = ek::sim::launch_log();
  PyObject* list = PyList_New(0);
  if (!list) return nullptr;
  for (const auto& r : log) {
    PyObject* item = Py_BuildValue("(s(III)(III)iLL)", r.kernel.c_str(), r.grid.x, r.grid.y, r.grid.z, r.block.x,
                                   r.block.y, r.block.z, r.max_access_bytes, static_cast<long long>(r.threads),
                                   static_cast<long long>(r.shuffles));
    if (!item || PyList_Append(list, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(item);
  }
  log.clear();
  return list;
}

PyObject* py_late_errors(PyObject*, PyObject*) {
  const std::string s = ek::sim::take_late_errors();
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

PyMethodDef methods[] = {
    {"set_guard", py_set_guard, METH_O, "The guarded CPU allocator (bounds and guard-byte checks) on or off."},
    {"set_race_checks", py_set_race_checks, METH_O, "The one-writer and cross-thread read checks on or off."},
    {"set_fault", py_set_fault, METH_O, "Switch deliberate fault n on (0: none); see csrc/sim/sim.h."},
    {"launches", py_launches, METH_NOARGS, "The launches since the last call, and clear the log."},
    {"late_errors", py_late_errors, METH_NOARGS, "Guard damage found when tensors were freed, since the last call."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sim",
                      "effkernels' CUDA kernels on the CPU execution simulator; see torch.ops.effkernels_sim.", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C_sim(void) { return PyModule_Create(&module); }
