// The CUDA simulator build compiles routing.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../routing.cu"
