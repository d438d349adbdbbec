import pytest
import torch

from gpustack.device import CPU_MAX_BATCH, batch_size_for, resolve_device
from gpustack.errors import DeviceError


def test_cpu_and_auto():
    assert resolve_device("cpu").device == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.is_cuda
    else:
        assert auto.device.type == "cpu" and auto.reason.startswith("auto: no usable GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_gpu_names_the_reason(spec):
    with pytest.raises(DeviceError, match=f"--device {spec}: .*(no CUDA support|no CUDA device).*--device cpu"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_index_out_of_range():
    with pytest.raises(DeviceError, match="only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_batch_size_from_budget():
    cpu = torch.device("cpu")
    assert batch_size_for(cpu, 100, budget=1000) == 10
    assert batch_size_for(cpu, 100, budget=50) == 1  # never zero
    assert batch_size_for(cpu, 1, budget=10**9) == CPU_MAX_BATCH
    assert batch_size_for(cpu, 100, budget=1000, requested=3) == 3


def test_cpu_batches_stay_under_the_mmap_threshold_but_cover_the_halo():
    from gpustack.device import CPU_STREAM_BYTES, CPU_TEMPORARY_BYTES
    from gpustack.malloc_tuning import MMAP

    cpu, plane = torch.device("cpu"), 4 * 1024 * 1024  # one float32 slice of 1024²
    batch = batch_size_for(cpu, 8 * plane, budget=10**12, plane_bytes=plane, halo=1)
    assert batch == 7 and batch * plane <= CPU_TEMPORARY_BYTES < MMAP
    # no halo (nothing read twice): batches whose temporaries stay in the cache
    batch = batch_size_for(cpu, 8 * plane, budget=10**12, plane_bytes=plane)
    assert batch == 3 and batch * plane <= CPU_STREAM_BYTES < CPU_TEMPORARY_BYTES
    assert batch_size_for(cpu, 8 * plane, budget=10**12, plane_bytes=plane, halo=8) == CPU_MAX_BATCH
    assert batch_size_for(cpu, 8 * 4 * 4000 ** 2, budget=10**12, plane_bytes=4 * 4000 ** 2) == 1
    assert batch_size_for(cpu, 8 * plane, budget=10**12, plane_bytes=plane, requested=16) == 16
