"""Which datasheet peak a GPU's name gets: the model as a whole word, never part of another model's name."""
import pytest

from gptx.model.flops import gpu_peak

A100_BF16, HOPPER_BF16, V100_FP16 = 312e12, 989e12, 125e12  # dense tensor-core peaks, vendor datasheets
H100_PCIE_BF16, NVL_BF16 = 756e12, 835e12  # the datasheets' 1,513 and 1,671 TFLOP/s "with sparsity", halved


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", A100_BF16),
    ("NVIDIA A100-PCIE-40GB", A100_BF16),
    ("NVIDIA A100 80GB PCIe", A100_BF16),
    ("NVIDIA H100 80GB HBM3", HOPPER_BF16),
    ("NVIDIA H100", HOPPER_BF16),
    ("NVIDIA H100 PCIe", H100_PCIE_BF16),  # before: every H100 got the SXM part's 989 TFLOP/s
    ("NVIDIA H100-PCIE-80GB", H100_PCIE_BF16),
    ("NVIDIA H100 NVL", NVL_BF16),
    ("NVIDIA H200", HOPPER_BF16),
    ("NVIDIA H200 NVL", NVL_BF16),
    ("NVIDIA GH200 480GB", HOPPER_BF16),
    ("Tesla V100-SXM2-16GB", V100_FP16),
])
def test_real_names_get_their_models_peak(name, peak):
    assert gpu_peak(name, "bf16", tf32=False) == peak


@pytest.mark.parametrize("name", [
    "NVIDIA RTX A1000 Laptop GPU",  # before: it holds "A100", so it got the A100's 312 TFLOP/s
    "NVIDIA RTX A1000 6GB Laptop GPU",
    "NVIDIA A1000",
    "NVIDIA RTX A100000",
    "NVIDIA XH100",
])
def test_names_that_only_contain_a_known_model_get_no_peak(name):
    assert gpu_peak(name, "bf16", tf32=False) is None
    assert gpu_peak(name, "fp32", tf32=True) is None
