"""C++ CPU kernels (OpenMP, built at first use): the default backend on CPU when a compiler is there."""
