"""Zeiss Atlas 3D / Fibics metadata: both setup layouts, the slice tag, the params.toml written from them, and
hostile or broken files. Fixtures are written here from the layouts PEERS.md §2.7 describes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from gpustack.area import Area
from gpustack.cli import main
from gpustack.config import load_workflow
from gpustack.errors import ConfigError, InputError
from gpustack.io.metadata import init_from_atlas, params_from_atlas, read_atlas_setup, read_fibics_tag, slice_metadata

NEW_SETUP = """<?xml version="1.0" encoding="iso-8859-1"?>
<ATLAS3DSetup Version="2.1">
  <Settings>
    <Imaging>
      <Detector>{a}</Detector>
      <DetectorB>{b}</DetectorB>
      <DefaultAcquisition>
        <FOV>{fov}</FOV>
        <PixelSize>{pixel}</PixelSize>
        <Interval><Distance><Interval>{dz}</Interval></Distance></Interval>
      </DefaultAcquisition>
    </Imaging>
  </Settings>
</ATLAS3DSetup>
"""
OLD_SETUP = """<?xml version="1.0" encoding="iso-8859-1"?>
<ATLAS3DSetup>
  <Settings>
    <Imaging>
      <Detector>{a}</Detector>
      <DetectorB>{b}</DetectorB>
      <FOV>{fov}</FOV>
      <FibicsRasterInfo><PixelSizeX>{pixel}</PixelSizeX></FibicsRasterInfo>
      <Interval>{dz}</Interval>
    </Imaging>
  </Settings>
</ATLAS3DSetup>
"""
SLICE_XML = """<?xml version="1.0" encoding="iso-8859-1"?>
<Fibics version="1.0"><Image><Width>{w}</Width><Height>{h}</Height><BoundingBox.Left>{l}</BoundingBox.Left>\
<BoundingBox.Right>{r}</BoundingBox.Right><BoundingBox.Top>{t}</BoundingBox.Top>\
<BoundingBox.Bottom>{b}</BoundingBox.Bottom></Image><ATLAS3D><Slice><ZIndex>{k}</ZIndex><ZPos>{z}</ZPos>\
</Slice></ATLAS3D><BeamInfo><item name="Ext I">{current} nA</item><item name="EHT">1.5 kV</item></BeamInfo></Fibics>"""


def make_run(root, *, layout="new", fov=0.64, pixel=0.01, dz=0.01, size=64, n=3, box=(10, 50, 8, 40),
             channels=("SE2", "ESB")):
    """An Atlas 3D run folder: setup file, and n slices per channel carrying Fibics XML."""
    text = (NEW_SETUP if layout == "new" else OLD_SETUP).format(a=channels[0], b=channels[1], fov=fov, pixel=pixel,
                                                                dz=dz)
    (root / "Atlas3D.a3d-setup").write_text(text, encoding="iso-8859-1")
    for c in channels:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            xml = SLICE_XML.format(w=size, h=size, l=box[0], r=box[1], t=box[2], b=box[3], k=k, z=f"{k * dz:.4f}",
                                   current=f"{1.5 + 0.01 * k:.2f}")
            tifffile.imwrite(root / c / f"slice_{k:04d}.tif", np.zeros((size, size), np.uint16),
                             extratags=[(51023, "s", 0, xml, True)])
    return root


@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_setup_layouts(tmp_path, layout):
    make_run(tmp_path, layout=layout, fov=42.24, pixel=0.01, dz=0.02, size=4224, n=1)
    meta = read_atlas_setup(tmp_path / "Atlas3D.a3d-setup")
    assert meta["channels"] == ["SE2", "ESB"] and meta["format"] == layout
    assert meta["fov_px"] == 4224  # 42.24 / 0.01 is 4223.999... in floating point
    assert meta["pixel_size_um"] == 0.01 and meta["slice_interval_um"] == 0.02


def test_slice_tag_and_per_slice_values(tmp_path):
    make_run(tmp_path, n=3)
    first = read_fibics_tag(tmp_path / "SE2" / "slice_0000.tif")
    assert (first["width"], first["bbox_left"], first["bbox_bottom"], first["z_pos"]) == (64, 10, 40, 0.0)
    assert first["beam_current"] == 1.5 and first["beam_current_unit"] == "nA"
    tifffile.imwrite(tmp_path / "SE2" / "slice_0003.tif", np.zeros((64, 64), np.uint16))  # no tag at all
    meta = slice_metadata(sorted((tmp_path / "SE2").glob("*.tif")))
    np.testing.assert_allclose(meta["beam_current"][:3], [1.5, 1.51, 1.52])
    assert math.isnan(meta["beam_current"][3]) and math.isnan(meta["z_pos"][3])


def test_area_is_the_bounding_box_plus_a_margin_with_y_flipped_and_clamped(tmp_path):
    make_run(tmp_path, box=(10, 50, 8, 40))
    meta = params_from_atlas(tmp_path, margin=5)
    assert meta["area"] == [5, 55, 64 - 40 - 5, 64 - 8 + 5]
    assert params_from_atlas(tmp_path, margin=20)["area"] == [0, 64, 4, 64]  # clamped to the image


@pytest.mark.reference
def test_same_values_as_pystack3d(tmp_path):
    fibics = pytest.importorskip("pystack3d.utils_metadata_fibics")
    make_run(tmp_path, fov=0.64, pixel=0.01, dz=0.01, size=64, box=(25, 40, 22, 38))
    theirs = fibics.params_from_metadata(tmp_path, verbosity=False)
    ours = params_from_atlas(tmp_path)
    assert list(theirs["channels"]) == ours["channels"]
    assert list(theirs["cropping"]["area"]) == ours["area"]  # inside the image: no clamping
    assert theirs["resampling"]["dz"] == ours["slice_interval_um"]


def test_init_from_atlas_writes_a_params_toml_that_validates(tmp_path, capsys):
    make_run(tmp_path, dz=0.02)
    assert main(["init", str(tmp_path), "--from-atlas"]) == 0
    wf = load_workflow(tmp_path / "params.toml")
    assert wf.channels == ("SE2", "ESB")
    steps = {s.name: s.config for s in wf.steps}
    assert steps["cropping"].area == Area(0, 64, 4, 64)
    assert steps["resampling"].dz == 0.02
    assert (tmp_path / "first_slice_metadata.xml").read_text().count("BoundingBox.Left") == 2
    assert main(["init", str(tmp_path), "--from-atlas"]) == 2  # never overwritten without --force
    assert "exists" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--from-atlas", "--force"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("change, message", [
    ({"size": 60}, "field of view is 64 px"),
    ({"layout": "new", "pixel": "x"}, "no pixel size"),
])
def test_inconsistent_metadata_is_an_input_error(tmp_path, change, message):
    make_run(tmp_path, **change)
    with pytest.raises(InputError, match=message):
        params_from_atlas(tmp_path)


def test_non_square_slice(tmp_path):
    make_run(tmp_path)
    xml = SLICE_XML.format(w=64, h=32, l=0, r=1, t=0, b=1, k=0, z=0, current=1)
    tifffile.imwrite(tmp_path / "SE2" / "slice_0000.tif", np.zeros((32, 64), np.uint16),
                     extratags=[(51023, "s", 0, xml, True)])
    with pytest.raises(InputError, match="square"):
        params_from_atlas(tmp_path)


def test_hostile_and_broken_files(tmp_path):
    make_run(tmp_path)
    setup = tmp_path / "Atlas3D.a3d-setup"
    setup.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>')
    with pytest.raises(InputError, match="refusing XML"):
        read_atlas_setup(setup)
    setup.write_text("<ATLAS3DSetup><Settings>")
    with pytest.raises(InputError, match="not readable XML"):
        read_atlas_setup(setup)
    with open(setup, "wb") as fh:
        fh.truncate(17 * 2**20)
    with pytest.raises(InputError, match="refusing it"):
        read_atlas_setup(setup)
    with pytest.raises(InputError, match="no Atlas 3D setup file"):
        read_atlas_setup(tmp_path / "missing")
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="no Fibics metadata"):
        read_fibics_tag(tmp_path / "plain.tif")


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["init", str(tmp_path), "--from-atlas"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "setup file" in err[0]


def test_config_error_on_existing_params(tmp_path):
    make_run(tmp_path)
    (tmp_path / "params.toml").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="--force"):
        init_from_atlas(tmp_path)


def test_beam_current_is_saved_with_the_statistics(tmp_path):
    import csv

    from gpustack.pipeline.runner import prepare, run
    from test_runner import CPU

    make_run(tmp_path, n=4)
    (tmp_path / "params.toml").write_text('channels = ["SE2"]\nprocess_steps = ["cropping", "resampling"]\n'
                                          '[cropping]\n[resampling]\ndz = 0.015\n')
    run(prepare(load_workflow(tmp_path / "params.toml")), device_choice=CPU, show_progress=False, log=lambda m: None)
    with open(tmp_path / "process" / "cropping" / "SE2" / "outputs" / "stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["beam_current"]) for r in rows] == [1.5, 1.51, 1.52, 1.53]
    with open(tmp_path / "process" / "resampling" / "SE2" / "outputs" / "stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    # planes at z = 0, 0.015, 0.03: the current of the slice each plane's tags come from (the one above)
    assert [float(r["beam_current"]) for r in rows] == [1.5, 1.52, 1.53]
