// The CUDA simulator build compiles rmsnorm.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../rmsnorm.cu"
