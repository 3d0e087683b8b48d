// The CPU-only build compiles adaln.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../adaln.cu"
