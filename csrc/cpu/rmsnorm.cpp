// The CPU-only build compiles rmsnorm.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../rmsnorm.cu"
