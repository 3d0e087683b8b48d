// The CPU-only build compiles swiglu.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../swiglu.cu"
