// The CPU-only build compiles routing.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../routing.cu"
