// The operator schemas, registered again under torch.ops.effkernels_sim for the simulator build.
#include "../bindings.cpp"
