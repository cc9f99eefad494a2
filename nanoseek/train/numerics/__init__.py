"""How a training step's arithmetic runs on the device: the precision chosen for `auto`,
bf16 weights with fp32 masters, torch.compile, the CPU thread count and MFU."""
