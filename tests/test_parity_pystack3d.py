"""gpustack against PyStack3D itself on the same input: same file names, pixels, private tags, compression."""

import shutil

import numpy as np
import pytest
import tifffile

from gpustack.cli import main
from tests.conftest import write_params, write_stack

pystack3d = pytest.importorskip("pystack3d", reason="PyStack3D (the reference) is not installed")

PARAMS = """\
channels = ["SE2", "ESB"]
nproc = 1
ind_min = 0
ind_max = 99999
process_steps = ["cropping"]
history = []
[cropping]
area = [3, 31, 4, 22]
"""


@pytest.mark.reference
def test_cropping_matches_pystack3d(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_stack(ours / "SE2", n=5, shape=(26, 35), compression="zlib", seed=1)
    write_stack(ours / "ESB", n=5, shape=(26, 35), compression="zlib", seed=2)
    write_params(ours, PARAMS)
    shutil.copytree(ours, theirs)
    assert main(["run", str(ours / "params.toml"), "--device", "cpu", "-q"]) == 0
    from pystack3d import Stack3d

    Stack3d(str(theirs)).eval(process_steps=["cropping"], nproc=1, show_pbar=False)
    for channel in ("SE2", "ESB"):
        a_dir, b_dir = ours / "process" / "cropping" / channel, theirs / "process" / "cropping" / channel
        names = sorted(p.name for p in a_dir.glob("*.tif"))
        assert names == sorted(p.name for p in b_dir.glob("*.tif")) and len(names) == 5
        for name in names:
            with tifffile.TiffFile(a_dir / name) as a, tifffile.TiffFile(b_dir / name) as b:
                np.testing.assert_array_equal(a.asarray(), b.asarray())
                assert a.pages[0].compression == b.pages[0].compression
                assert a.pages[0].tags[51023].value == b.pages[0].tags[51023].value
        # PyStack3D's stats.npy layout; what was written has the same min/max/mean. gpustack reads only the
        # rows a leading crop keeps, so it has no statistics of the whole raw slice (NaN, documented).
        ours_stats, theirs_stats = np.load(a_dir / "outputs" / "stats.npy"), np.load(b_dir / "outputs" / "stats.npy")
        assert ours_stats.shape == theirs_stats.shape == (5, 3, 3)
        np.testing.assert_allclose(ours_stats[:, 2], theirs_stats[:, 2], rtol=1e-5)
        assert np.isnan(ours_stats[:, 0]).all()
