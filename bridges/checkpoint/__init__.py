"""The checkpoint file layer: safetensors format, reading and MXFP4, regions and pieces of HF tensors, the
HF config file. Knows nothing of Megatron or of model families."""
