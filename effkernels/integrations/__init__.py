"""Drop-in integrations of the kernel layer into third-party model code, each in its own module:

  effkernels.integrations.diffusers   apply_effkernels(model) / revert(model): diffusers' DiT, PixArt,
                                      SD3 and Flux transformers with the fused adaLN ops, in place
  effkernels.integrations.tread       RoutedBlocks / apply_tread(model, start, end): TREAD token routing
                                      over a model's block list (diffusers' DiT / PixArt style)

Nothing here imports a third-party model library at import time: each module imports it when a
function needs it, so `import effkernels` works without diffusers installed. These modules import
only the kernel layer (effkernels.ops, effkernels.backends), never effkernels.models.
"""
