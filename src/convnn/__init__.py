"""convnn: Convolutional Nearest Neighbors — one k-NN operator for convolution and attention."""

__version__ = "0.1.0"
