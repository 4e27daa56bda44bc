"""Kernel tests run under the Triton interpreter on the CPU (make test-kernels): teach it bf16 dots first."""
from kernel_utils import interpret_bf16_dots_as_float32


def pytest_configure(config):
    interpret_bf16_dots_as_float32()
