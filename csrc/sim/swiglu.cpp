// The CUDA simulator build compiles swiglu.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../swiglu.cu"
