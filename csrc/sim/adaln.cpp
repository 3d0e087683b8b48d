// The CUDA simulator build compiles adaln.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../adaln.cu"
