// The CPU-only build compiles rope.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../rope.cu"
