// The CPU-only build compiles align.cu as plain C++ (g++, no WITH_CUDA): its CUDA parts are guarded out.
#include "../align.cu"
