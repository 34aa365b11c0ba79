"""Backend kernels (conv, top-k), each in implementations chosen by `config.kernels`."""
