import os

# Triton kernels run on the CPU through the interpreter in CI; it must be set before
# triton decorates any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
