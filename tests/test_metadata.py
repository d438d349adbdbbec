"""Zeiss Atlas 3D / Fibics metadata: both setup layouts, the slice tag, the params.toml written from them, and
hostile or broken files. The fixtures are written here, minimal, with the element nesting of PEERS.md §2.7 and of
the setup file PyStack3D ships (old layout); nothing is downloaded."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import tifffile

from gpustack.area import Area
from gpustack.atlas_init import init_from_atlas, render_params_from_atlas
from gpustack.cli import main
from gpustack.config import load_workflow
from gpustack.errors import ConfigError, InputError
from gpustack.io.metadata import (SETUP_PATHS, fov_pixels, params_from_atlas, parse_fibics, read_atlas_setup,
                                  read_fibics_tag, slice_metadata)
from gpustack.template import render_template

DECLARATION = '<?xml version="1.0" encoding="iso-8859-1"?>\n'


# --- fixture writers ------------------------------------------------------------------------------------------

def setup_xml(layout: str = "new", *, detector: str = "SE2", detector_b: str | None = "ESB", fov="0.64",
              pixel="0.01", interval="0.01") -> str:
    """An Atlas3D.a3d-setup. Old layout: root without attributes, Imaging/FOV, Imaging/Interval and
    Imaging/FibicsRasterInfo/PixelSizeX. New: root with attributes, Imaging/DefaultAcquisition/{FOV, PixelSize,
    Interval/Distance/Interval}. Decoys with other values sit where a loose search would find them."""
    detectors = f"<Detector>{detector}</Detector><Brightness>46.1</Brightness>"
    if detector_b is not None:
        detectors += f"\n      <DetectorB>{detector_b}</DetectorB><ContrastB>31.0</ContrastB>"
    if layout == "old":
        root, imaging = "<ATLAS3D-Setup>", f"""<InitialFocusUM>0</InitialFocusUM>
      <FOV>{fov}</FOV>
      <Interval>{interval}</Interval>
      {detectors}
      <FibicsRasterInfo><Name>Custom</Name><PixelSizeX>{pixel}</PixelSizeX><PixelSizeY>{pixel}</PixelSizeY>
      </FibicsRasterInfo>"""
    else:
        root, imaging = '<ATLAS3D-Setup version="2.0">', f"""{detectors}
      <DefaultAcquisition>
        <FOV>{fov}</FOV>
        <PixelSize>{pixel}</PixelSize>
        <Interval>
          <Time><Type>Time</Type><Interval>600000</Interval></Time>
          <Distance><Type>Distance</Type><Interval>{interval}</Interval></Distance>
        </Interval>
      </DefaultAcquisition>"""
    return f"""{DECLARATION}{root}
  <JobName>run01</JobName>
  <JobDescription>Pt cap, 5 \u00b5m deep</JobDescription>
  <Settings>
    <Imaging>
      {imaging}
    </Imaging>
    <KeyFrame>
      <Interval>0.3</Interval>
      <FibicsRasterInfo><PixelSizeX>0.0206</PixelSizeX></FibicsRasterInfo>
    </KeyFrame>
    <Analytics><EDS><PixelSize>0.05</PixelSize><FOV>25.6</FOV></EDS></Analytics>
  </Settings>
</ATLAS3D-Setup>
"""


def slice_xml(*, width=64, height=64, box=(10, 50, 8, 40), z_pos=0.0, z_index=0, current="1.5 nA",
              ux="0.01", fov_units="\u00b5m") -> bytes:
    """A slice's Fibics XML as Atlas stores it in tag 51023: iso-8859-1, the declaration then one line (PyStack3D
    reads line 2). A field given as None is left out."""
    image = "".join(f"<{tag}>{value}</{tag}>" for tag, value in (
        ("Width", width), ("Height", height), ("BoundingBox.Left", box and box[0]),
        ("BoundingBox.Right", box and box[1]), ("BoundingBox.Top", box and box[2]),
        ("BoundingBox.Bottom", box and box[3])) if value is not None)
    scan = f"<Ux>{ux}</Ux><Uy>0</Uy><Vx>0</Vx><Vy>{ux}</Vy>" if ux is not None else ""
    beam = f'<item name="Ext I">{current}</item>' if current is not None else ""
    zpos = f"<ZPos>{z_pos}</ZPos>" if z_pos is not None else ""
    body = (f'<Fibics version="1.0"><Application><Version>Atlas 3D</Version></Application><Image>{image}</Image>'
            f'<Scan><FOV_X units="{fov_units}">0.64</FOV_X>{scan}<Dwell units="ns">700</Dwell></Scan>'
            f'<BeamInfo><item name="EHT">1.50 kV</item>{beam}</BeamInfo>'
            f'<DetectorInfo><item name="Ext I">9 V</item></DetectorInfo>'
            f"<ATLAS3D><Slice><ZIndex>{z_index}</ZIndex>{zpos}</Slice></ATLAS3D></Fibics>")
    return (DECLARATION + body).encode("latin-1")


def write_slice(path, xml: bytes | None, shape=(64, 64)) -> None:
    tags = [(51023, "s", 0, xml, True)] if xml is not None else []
    tifffile.imwrite(path, np.zeros(shape, np.uint8), extratags=tags)


def make_run(root, *, layout="new", fov="0.64", pixel="0.01", interval="0.01", size=64, n=2,
             box=(10, 50, 8, 40), channels=("SE2", "ESB"), fov_units="\u00b5m"):
    """An Atlas 3D run folder: setup file and n slices per detector folder, each with its Fibics XML."""
    (root / "Atlas3D.a3d-setup").write_text(setup_xml(layout, detector=channels[0], detector_b=channels[1],
                                                      fov=fov, pixel=pixel, interval=interval), encoding="latin-1")
    for c in channels:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            xml = slice_xml(width=size, height=size, box=box, z_pos=f"{k * float(interval):.4f}", z_index=k,
                            current=f"{1.5 + 0.01 * k:.2f} nA", fov_units=fov_units)
            write_slice(root / c / f"slice_{k:04d}.tif", xml, (size, size))
    return root


# --- setup file -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_setup_layouts(tmp_path, layout):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text(setup_xml(layout, fov="42.24", pixel="0.01", interval="0.02"), encoding="latin-1")
    meta = read_atlas_setup(path)
    assert meta["channels"] == ["SE2", "ESB"] and meta["format"] == layout and meta["fallbacks"] == []
    assert (meta["pixel_size_um"], meta["fov_um"], meta["slice_interval_um"]) == (0.01, 42.24, 0.02)
    assert meta["fov_px"] == 4224 and meta["source"] == str(path)
    assert read_atlas_setup(tmp_path) == meta  # the run folder is accepted too


def test_fov_in_pixels_is_rounded():
    assert fov_pixels(42.24, 0.01) == 4224
    # Atlas stores float32 values: the ratio is 4223.99987, which PyStack3D's int() makes 4223
    assert int(42.2399940490723 / 0.00999999888918612) == 4223
    assert fov_pixels(42.2399940490723, 0.00999999888918612) == 4224
    assert fov_pixels(0.6399999, 0.01) == 64


def test_a_value_found_only_in_the_other_layouts_place(tmp_path):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text(setup_xml("old").replace("<ATLAS3D-Setup>", '<ATLAS3D-Setup version="9">'), encoding="latin-1")
    meta = read_atlas_setup(path)
    assert meta["format"] == "new" and meta["fallbacks"] == ["pixel_size_um", "fov_um", "slice_interval_um"]
    assert (meta["pixel_size_um"], meta["slice_interval_um"]) == (0.01, 0.01)  # not the KeyFrame decoys


@pytest.mark.parametrize("detector_b", [None, "", "  "])
def test_one_detector(tmp_path, detector_b):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text(setup_xml("old", detector="InLens", detector_b=detector_b), encoding="latin-1")
    assert read_atlas_setup(path)["channels"] == ["InLens"]


@pytest.mark.parametrize("change, message", [
    ({"pixel": "x"}, "no positive number at Settings/Imaging/DefaultAcquisition/PixelSize"),
    ({"interval": "0"}, "slice_interval_um"),
    ({"fov": "NAN"}, "fov_um"),
    ({"detector": ""}, "no detector name"),
    ({"pixel": "1e-300"}, "not a plausible image width"),
])
def test_setup_without_a_needed_value(tmp_path, change, message):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text(setup_xml("new", **{"detector_b": None, **change}), encoding="latin-1")
    with pytest.raises(InputError, match=message):
        read_atlas_setup(path)


# --- slice tag ------------------------------------------------------------------------------------------------

def test_slice_tag(tmp_path):
    write_slice(tmp_path / "s.tif", slice_xml(box=(10, 50, 8, 40), z_pos="1.25", z_index=7, current="1.5 nA"))
    meta = read_fibics_tag(tmp_path / "s.tif")
    assert (meta["width"], meta["height"]) == (64, 64) and isinstance(meta["width"], int)
    assert [meta[f"bbox_{k}"] for k in ("left", "right", "top", "bottom")] == [10, 50, 8, 40]
    assert (meta["z_pos"], meta["z_index"], meta["pixel_size_um"]) == (1.25, 7, 0.01)
    assert (meta["beam_current"], meta["beam_current_unit"]) == (1.5, "nA")  # BeamInfo's, not DetectorInfo's


def test_missing_slice_fields_are_none(tmp_path):
    write_slice(tmp_path / "s.tif", slice_xml(box=None, z_pos=None, current=None, ux=None, height=None))
    meta = read_fibics_tag(tmp_path / "s.tif")
    assert meta["width"] == 64 and meta["height"] is None and meta["bbox_left"] is None and meta["z_pos"] is None
    assert meta["beam_current"] is None and meta["beam_current_unit"] is None
    assert meta["pixel_size_um"] == pytest.approx(0.64 / 64)  # no scan vector: FOV_X / Width
    meta = parse_fibics(DECLARATION + '<Fibics><BeamInfo><item name="Ext I">2.5</item></BeamInfo></Fibics>', "x")
    assert (meta["beam_current"], meta["beam_current_unit"], meta["width"], meta["pixel_size_um"]) == (2.5, None,
                                                                                                      None, None)


def test_slice_without_the_tag_or_not_a_tiff(tmp_path):
    write_slice(tmp_path / "plain.tif", None)
    with pytest.raises(InputError, match=r"plain\.tif: no Fibics metadata \(TIFF tag 51023\)"):
        read_fibics_tag(tmp_path / "plain.tif")
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(InputError, match=r"text\.tif: not a TIFF"):
        read_fibics_tag(tmp_path / "text.tif")


def test_slice_metadata_arrays(tmp_path):
    paths = []
    for k, (z, current) in enumerate([("0.00", "1.5 nA"), ("0.01", "1510 pA"), (None, None), ("0.03", "1.53 nA")]):
        paths.append(tmp_path / f"s{k}.tif")
        write_slice(paths[-1], slice_xml(z_pos=z, current=current))
    paths.append(tmp_path / "s4.tif")
    write_slice(paths[-1], None)  # no tag at all
    paths.append(tmp_path / "s5.tif")
    write_slice(paths[-1], b"<Fibics><Image>")  # broken metadata: optional, so NaN
    meta = slice_metadata(paths)
    np.testing.assert_allclose(meta["z_pos"], [0, 0.01, np.nan, 0.03, np.nan, np.nan])
    np.testing.assert_allclose(meta["beam_current"], [1.5, 1.51, np.nan, 1.53, np.nan, np.nan])
    assert meta["beam_current_unit"] == "nA"
    assert slice_metadata([])["z_pos"].shape == (0,)


def test_beam_currents_for_the_statistics_are_put_on_one_scale(tmp_path):
    """The runner's per-slice currents (stats.csv) follow slice_metadata: the most common unit, others converted;
    a unit that cannot be converted is NaN there, not an error that stops a run."""
    from gpustack.io.metadata import beam_currents
    from gpustack.io.tiff import open_channel

    for k, current in enumerate(["1.5 nA", "1510 pA", "1.52 nA", "3 V", None]):
        write_slice(tmp_path / f"s{k}.tif", slice_xml(current=current))
    source, _ = open_channel(tmp_path, ".")
    np.testing.assert_allclose(beam_currents(list(source.slices)), [1.5, 1.51, 1.52, np.nan, np.nan])


def test_slice_metadata_units_that_cannot_be_matched(tmp_path):
    write_slice(tmp_path / "a.tif", slice_xml(current="1.5 nA"))
    write_slice(tmp_path / "b.tif", slice_xml(current="3 V"))
    write_slice(tmp_path / "c.tif", slice_xml(current="1.6 nA"))
    with pytest.raises(InputError, match=r"b\.tif: beam current in V"):
        slice_metadata([tmp_path / n for n in ("a.tif", "b.tif", "c.tif")])


# --- params from both -----------------------------------------------------------------------------------------

def test_area_is_the_bounding_box_plus_a_margin_with_y_flipped(tmp_path):
    make_run(tmp_path, box=(10, 50, 8, 40))
    meta = params_from_atlas(tmp_path, margin=5)
    assert meta["area"] == [5, 55, 64 - 40 - 5, 64 - 8 + 5]
    assert meta["channels"] == ["SE2", "ESB"] and meta["dz"] == 0.01 and meta["image_px"] == 64
    assert meta["bounding_box"] == {"left": 10, "right": 50, "top": 8, "bottom": 40}
    assert meta["first_slice"].endswith("slice_0000.tif") and meta["notes"] == []
    assert params_from_atlas(tmp_path, margin=0)["area"] == [10, 50, 24, 56]
    assert params_from_atlas(tmp_path)["area"] == [0, 64, 4, 64]  # margin 20: clamped to the image


@pytest.mark.parametrize("box, why", [(None, "no complete Image/BoundingBox"), ((10, 70, 8, 40), "not inside"),
                                      ((50, 10, 8, 40), "not inside")])
def test_no_usable_bounding_box_leaves_the_area_unset(tmp_path, box, why):
    make_run(tmp_path, box=box, n=1)
    meta = params_from_atlas(tmp_path)
    assert meta["area"] is None and why in meta["notes"][0]
    assert "area = [" not in render_params_from_atlas(meta).split("[cropping]")[1].split("[bkg_removal]")[0]


def test_first_slice_in_pystack3d_order_and_second_detector_without_folder(tmp_path):
    make_run(tmp_path, n=0, channels=("SE2", "ESB"))
    (tmp_path / "ESB").rmdir()
    write_slice(tmp_path / "SE2" / "slice_10.tif", slice_xml(z_pos="9"))
    write_slice(tmp_path / "SE2" / "slice_9.tif", slice_xml(z_pos="8"))
    meta = params_from_atlas(tmp_path)
    assert meta["first_slice"].endswith("slice_10.tif")  # plain alphabetical order, as PyStack3D sorts
    assert meta["channels"] == ["SE2"] and "'ESB' has no folder" in meta["notes"][0]


def test_first_detector_folder_missing(tmp_path):
    make_run(tmp_path, n=0, channels=("SE2", "ESB"))
    (tmp_path / "SE2").rmdir()
    with pytest.raises(InputError, match=r"SE2: missing; the setup's first detector is 'SE2', folders here: ESB"):
        params_from_atlas(tmp_path)


def test_image_size_checks(tmp_path):
    make_run(tmp_path, size=60, n=1)
    with pytest.raises(InputError, match=r"60 px wide but the setup's field of view is 64 px \(0.64 um / 0.01 um\)"):
        params_from_atlas(tmp_path)
    make_run(tmp_path, size=65, n=1)  # FOV + 1 px, which PyStack3D accepts too
    assert params_from_atlas(tmp_path)["image_px"] == 65
    write_slice(tmp_path / "SE2" / "slice_0000.tif", slice_xml(width=64, height=32), (32, 64))
    with pytest.raises(InputError, match=r"slice_0000\.tif: the slice is 64x32 px.*square"):
        params_from_atlas(tmp_path)
    write_slice(tmp_path / "SE2" / "slice_0000.tif", slice_xml(width=None))
    with pytest.raises(InputError, match="no Image/Width"):
        params_from_atlas(tmp_path)


def test_bad_margin_and_bad_detector_name(tmp_path):
    make_run(tmp_path, n=1)
    with pytest.raises(ConfigError, match="margin"):
        params_from_atlas(tmp_path, margin=-1)
    (tmp_path / "Atlas3D.a3d-setup").write_text(setup_xml(detector='S"E2'), encoding="latin-1")
    with pytest.raises(InputError, match="cannot be a channel folder name"):
        params_from_atlas(tmp_path)


# --- hostile and broken files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
    '<!doctype x SYSTEM "file:///etc/passwd"><x/>',
    '<?xml version="1.0"?>\n<!ENTITY a "b"><x/>',
])
def test_dtd_and_entities_are_refused(tmp_path, text):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text(text)
    with pytest.raises(InputError, match="refusing XML with a DTD/entities"):
        read_atlas_setup(path)


def test_dtd_in_another_encoding_is_refused_too(tmp_path):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_bytes('<?xml version="1.0" encoding="utf-16"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'
                     .encode("utf-16"))  # no ASCII "<!DOCTYPE" in the bytes
    with pytest.raises(InputError, match="refusing XML"):
        read_atlas_setup(path)
    write_slice(tmp_path / "s.tif", DECLARATION.encode() + b'<!DOCTYPE Fibics [<!ENTITY e "1">]><Fibics/>')
    with pytest.raises(InputError, match="refusing XML"):
        read_fibics_tag(tmp_path / "s.tif")


@pytest.mark.parametrize("encoding", ["undefined", "rot13", "idna", "no-such-codec"])
def test_an_encoding_that_cannot_be_read(tmp_path, encoding):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_bytes(f'<?xml version="1.0" encoding="{encoding}"?><x/>'.encode())
    with pytest.raises(InputError, match="encoding that cannot be read"):
        read_atlas_setup(path)


def test_malformed_and_oversized_files(tmp_path):
    path = tmp_path / "Atlas3D.a3d-setup"
    path.write_text("<ATLAS3D-Setup><Settings>")
    with pytest.raises(InputError, match=r"Atlas3D\.a3d-setup: malformed XML \(no element found: line 1"):
        read_atlas_setup(path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match="malformed XML"):
        read_atlas_setup(path)
    with open(path, "wb") as fh:  # sparse: no 17 MiB written
        fh.truncate(17 * 2**20)
    with pytest.raises(InputError, match="more than 16 MiB.*refusing it"):
        read_atlas_setup(path)
    with pytest.raises(InputError, match=r"missing: not found \(an Atlas 3D setup file"):
        read_atlas_setup(tmp_path / "missing")
    write_slice(tmp_path / "broken.tif", DECLARATION.encode() + b"<Fibics><Image></Fibics>")
    with pytest.raises(InputError, match=r"broken\.tif: malformed XML \(mismatched tag"):
        read_fibics_tag(tmp_path / "broken.tif")
    write_slice(tmp_path / "big.tif", b"<Fibics>" + b" " * (4 * 2**20) + b"</Fibics>")
    with pytest.raises(InputError, match=r"big\.tif: tag 51023 holds \d+ bytes.*refusing it"):
        read_fibics_tag(tmp_path / "big.tif")


# --- params.toml ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["new", "old"])
def test_rendered_params_toml_parses_and_loads(tmp_path, layout):
    make_run(tmp_path, layout=layout, interval="0.02", box=(25, 40, 22, 38), n=1)
    meta = params_from_atlas(tmp_path)
    text = render_params_from_atlas(meta)
    data = tomllib.loads(text)
    assert data["channels"] == ["SE2", "ESB"] and data["cropping"]["area"] == [5, 60, 6, 62]
    assert data["resampling"]["dz"] == 0.02 and "area" not in data["cropping_final"]
    path = tmp_path / "params.toml"
    path.write_text(text)
    wf = load_workflow(path)
    steps = {s.name: s.config for s in wf.steps}
    assert wf.channels == ("SE2", "ESB") and steps["cropping"].area == Area(5, 60, 6, 62)
    assert steps["resampling"].dz == 0.02
    # the template's text, with the values and a header saying where they came from
    assert len(text.splitlines()) > len(render_template(channels=["SE2", "ESB"]).splitlines())
    header = text.split("\nchannels =")[0]
    for words in ("Atlas3D.a3d-setup", f"{layout} layout", "pixel size 0.01 um", "field of view 0.64 um",
                  "= 64 px", "SE2/slice_0000.tif", "first_slice_metadata.xml", "left 25, right 40, top 22, bottom 38",
                  "+ 20 px", SETUP_PATHS["slice_interval_um"][0 if layout == "new" else 1]):
        assert words in header, words


def test_init_from_atlas_writes_both_files_and_never_overwrites(tmp_path):
    make_run(tmp_path, interval="0.02", n=2)
    target = init_from_atlas(tmp_path)
    assert target == tmp_path / "params.toml"
    wf = load_workflow(target)
    assert wf.channels == ("SE2", "ESB")
    assert {s.name: s.config for s in wf.steps}["resampling"].dz == 0.02
    xml = (tmp_path / "first_slice_metadata.xml").read_bytes()
    assert xml == slice_xml(box=(10, 50, 8, 40), z_pos="0.0000", z_index=0, current="1.50 nA")  # bytes as stored
    assert b"\xb5" in xml  # iso-8859-1, as its declaration says
    before = target.read_bytes()
    with pytest.raises(ConfigError, match=r"params\.toml exists; pass --force"):
        init_from_atlas(tmp_path)
    assert target.read_bytes() == before
    (tmp_path / "Atlas3D.a3d-setup").write_text(setup_xml(interval="0.03"), encoding="latin-1")
    init_from_atlas(tmp_path, force=True)
    assert "dz = 0.03" in target.read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_init_writes_nothing_when_the_metadata_is_bad(tmp_path):
    make_run(tmp_path, size=60, n=1)
    with pytest.raises(InputError):
        init_from_atlas(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Atlas3D.a3d-setup", "ESB", "SE2"]


def test_cli_init_from_atlas(tmp_path, capsys):
    assert main(["init", str(tmp_path), "--from-atlas"]) == 2  # no setup file: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Atlas3D.a3d-setup" in err[0]
    make_run(tmp_path, n=1)
    assert main(["init", str(tmp_path), "--from-atlas"]) == 0
    assert main(["init", str(tmp_path), "--from-atlas"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--from-atlas", "--force"]) == 0


def test_beam_current_is_saved_with_the_statistics(tmp_path):
    import csv

    from gpustack.device import resolve_device
    from gpustack.pipeline.runner import prepare, run

    make_run(tmp_path, n=4, fov_units="um")  # ASCII tags: see the next test
    (tmp_path / "params.toml").write_text('channels = ["SE2"]\nprocess_steps = ["cropping", "resampling"]\n'
                                          '[cropping]\n[resampling]\ndz = 0.015\n')
    run(prepare(load_workflow(tmp_path / "params.toml")), device_choice=resolve_device("cpu"), show_progress=False,
        log=lambda m: None)
    with open(tmp_path / "process" / "cropping" / "SE2" / "outputs" / "stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["beam_current"]) for r in rows] == [1.5, 1.51, 1.52, 1.53]
    with open(tmp_path / "process" / "resampling" / "SE2" / "outputs" / "stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    # planes at z = 0, 0.015, 0.03: the current of the slice each plane's tags come from (the one above)
    assert [float(r["beam_current"]) for r in rows] == [1.5, 1.52, 1.53]


def test_a_slice_tag_with_a_latin1_byte_is_copied_to_the_outputs(tmp_path):
    # tifffile refuses to write back the decoded text of a tag that is not 7-bit ASCII (iso-8859-1 'µ'):
    # gpustack copies the tag's bytes
    from gpustack.device import resolve_device
    from gpustack.pipeline.runner import prepare, run

    make_run(tmp_path, n=2)
    (tmp_path / "params.toml").write_text('channels = ["SE2"]\nprocess_steps = ["cropping"]\n[cropping]\n')
    run(prepare(load_workflow(tmp_path / "params.toml")), device_choice=resolve_device("cpu"), show_progress=False,
        log=lambda m: None)
    out = tmp_path / "process" / "cropping" / "SE2" / "slice_0000.tif"
    assert read_fibics_tag(out)["z_pos"] == 0.0
    raw = tifffile.TiffFile(out).pages[0].tags[51023].astuple()[3]
    assert raw == tifffile.TiffFile(tmp_path / "SE2" / "slice_0000.tif").pages[0].tags[51023].astuple()[3]


# --- against PyStack3D ----------------------------------------------------------------------------------------

def _pystack3d_params(monkeypatch, stack_dir):
    """PyStack3D's params_from_metadata, with its path table reset first: its old-layout detection rewrites a
    module-level dict, so one old-layout call changes every later call in the process."""
    fibics = pytest.importorskip("pystack3d.utils_metadata_fibics", reason="pystack3d is not installed")
    for key, name in (("pixel_size_um", "PixelSize"), ("fov_um", "Fov"), ("slice_interval_um", "SliceThickness")):
        monkeypatch.setitem(fibics.PARAMS, name, SETUP_PATHS[key][0])
    try:
        return fibics.params_from_metadata(stack_dir, verbosity=False)
    except Exception as exc:  # its own failure (a missing lxml/tomlkit, a changed API), not a disagreement
        pytest.skip(f"pystack3d's params_from_metadata fails on this fixture: {exc!r}")


@pytest.mark.reference
@pytest.mark.parametrize("layout", ["new", "old"])
def test_same_values_as_pystack3d(tmp_path, monkeypatch, layout):
    make_run(tmp_path, layout=layout, interval="0.02", box=(25, 40, 22, 38), n=1)
    theirs = _pystack3d_params(monkeypatch, tmp_path)
    ours = params_from_atlas(tmp_path)
    assert list(theirs["channels"]) == ours["channels"]
    assert list(theirs["cropping"]["area"]) == ours["area"] == [5, 60, 6, 62]  # inside the image: no clamping
    assert theirs["resampling"]["dz"] == ours["dz"]


@pytest.mark.reference
def test_pystack3d_is_one_pixel_off_in_y_when_it_truncates_the_fov(tmp_path, monkeypatch):
    make_run(tmp_path, layout="old", fov="0.6399999", pixel="0.01", box=(25, 40, 22, 38), n=1)
    theirs = list(_pystack3d_params(monkeypatch, tmp_path)["cropping"]["area"])
    ours = params_from_atlas(tmp_path)
    assert ours["fov_px"] == 64 and any("truncates" in n for n in ours["notes"])
    assert theirs[:2] == ours["area"][:2] and theirs[2:] == [v - 1 for v in ours["area"][2:]]
    assert math.isclose(ours["fov_um"], 0.6399999)


def test_export_takes_the_pixel_size_from_the_atlas_setup(tmp_path, capsys):
    from gpustack.cli import main

    make_run(tmp_path, n=3, pixel="0.004", fov_units="um")
    (tmp_path / "params.toml").write_text('channels = ["SE2", "ESB"]\nprocess_steps = ["cropping"]\n[cropping]\n')
    assert main(["run", str(tmp_path / "params.toml"), "-q", "--device", "cpu"]) == 0
    assert main(["export", str(tmp_path / "params.toml")]) == 0
    assert "pixel 0.004 um" in capsys.readouterr().err
    with tifffile.TiffFile(tmp_path / "process" / "export" / "cropping_SE2.tif") as tif:
        assert len(tif.pages) == 3 and tif.imagej_metadata["unit"] == "micron"
        x_resolution = tif.pages[0].tags["XResolution"].value
        assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / 0.004)  # pixels per um
