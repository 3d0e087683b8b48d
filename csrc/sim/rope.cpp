// The CUDA simulator build compiles rope.cu with g++ -DEFFK_SIM: its CUDA kernels run on csrc/sim/.
#include "../rope.cu"
