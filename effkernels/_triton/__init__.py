"""Triton kernels, one file per op family. Every kernel that does arithmetic upcasts to float32 on load and casts back on
store (also what makes bf16 correct under Triton's CPU interpreter). Imported lazily by effkernels.ops."""
