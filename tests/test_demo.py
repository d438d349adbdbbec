import tifffile

from gpustack.cli import main
from gpustack.synthetic import SyntheticStack


def test_demo_makes_a_stack_and_crops_it_to_the_ground_truth_region(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", str(folder), "--slices", "12", "--size", "96", "--device", "cpu"]) == 0
    stack = SyntheticStack.load(folder)
    out = sorted((folder / "process" / "cropping_final" / "ESB").glob("*.tif"))
    # resampled onto a uniform z grid over the whole stack (slices were deleted), the last plane kept
    z_last = float(stack.z[-1])
    assert [p.name for p in out] == [f"slice_{j:04d}_z={0.01 * j:.4f}um.tif" for j in range(round(z_last / 0.01) + 1)]
    inner = stack.truth(float(stack.z[0]), "ESB").shape
    assert tifffile.imread(out[0]).shape == (inner[0] - 12, inner[1] - 12)  # 6 px registration margin each side
    err = capsys.readouterr().err
    assert "RMSE against the ground truth" in err and "dB PSNR" in err
    assert "could not be fitted" not in err  # the 3D background's z sampling follows the demo's length
    assert main(["demo", str(folder)]) == 2  # never over an existing stack
