// The CUDA simulator build compiles align.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../align.cu"
