from pathlib import Path

import pytest

from gpustack.area import Area
from gpustack.config import load_workflow, parse_memory, workflow_from_dict
from gpustack.errors import ConfigError
from gpustack.template import render_template

PYSTACK3D_TEMPLATE = """\
#project_dir = ""
ind_min = 0
ind_max = 99999
channels = ["."]
nproc = 1
process_steps = [
    "cropping", "bkg_removal", "intensity_rescaling", "intensity_rescaling_area",
    "registration_calculation", "registration_transformation", "destriping", "resampling", "cropping_final"
]
history = []

[cropping]
area = [0, 99999, 0, 99999]

[bkg_removal]
dim = 3
orders = [1, 2, 1]
cross_terms = true
skip_factors = [10, 10, 10]
threshold_min = 2
preserve_avg = true

[destriping]
cvg_threshold = 1e-2
filters = [{ name = "Gabor", noise_level = 20, sigma = [0.5, 200], theta = 0 }]

[resampling]
policy = "slice_{slice_nb}_z={z_coord}um.tif"
dz = 0.01

[cropping_final]
area = [0, 99999, 0, 99999]
"""


PYSTACK3D_TEMPLATE_STEPS = ["cropping", "bkg_removal", "intensity_rescaling", "intensity_rescaling_area",
                            "registration_calculation", "registration_transformation", "destriping", "resampling",
                            "cropping_final"]


def test_pystack3d_template_is_read_unchanged(tmp_path):
    path = tmp_path / "params.toml"
    path.write_text(PYSTACK3D_TEMPLATE)
    wf = load_workflow(path, steps=["cropping"])
    assert wf.project_dir == tmp_path and wf.channels == (".",) and wf.nproc == 1
    assert wf.step_names == ("cropping",)
    assert wf.steps[0].config.area == Area(0, 99999, 0, 99999)
    # every step of the template runs, with the template's own values
    wf = load_workflow(path)
    assert wf.step_names == tuple(PYSTACK3D_TEMPLATE_STEPS)
    destriping, resampling = wf.steps[6].config, wf.steps[7].config
    assert destriping.filters[0].sigma == (0.5, 200.0) and destriping.cvg_threshold == 1e-2
    assert resampling.dz == 0.01 and resampling.policy == "slice_{slice_nb}_z={z_coord}um.tif"
    # the template's own values for the steps gpustack has are accepted as they are
    wf = load_workflow(path, steps=["cropping", "bkg_removal", "intensity_rescaling", "intensity_rescaling_area"])
    bkg = wf.steps[1].config
    assert bkg.orders == (1, 2, 1) and bkg.cross_terms and bkg.skip_factors == (10, 10, 10)
    assert bkg.threshold_min == 2 and bkg.preserve_avg and bkg.dim == 3
    assert wf.steps[3].config.factors_range == (0.8, 1.2)


def test_deprecated_dirname_and_relative_project_dir(tmp_path):
    wf = workflow_from_dict({"dirname": "data", "process_steps": ["cropping"]}, file=tmp_path / "p.toml")
    assert wf.project_dir == tmp_path / "data"
    assert any("deprecated" in n for n in wf.warnings)
    wf = workflow_from_dict({"project_dir": "/abs/x", "process_steps": ["cropping"]}, file=tmp_path / "p.toml")
    assert wf.project_dir == Path("/abs/x") and wf.process_dir == Path("/abs/x/process")


def test_empty_channels_mean_the_project_folder():
    assert workflow_from_dict({"channels": "", "cropping": {}}).channels == (".",)


@pytest.mark.parametrize("data, table, key, text", [
    ({"cropping": {"aera": [0, 1, 0, 1]}}, "cropping", "aera", "did you mean 'area'"),
    ({"process_steps": ["croping"]}, None, "process_steps", "did you mean 'cropping'"),
    ({"cropping": {"area": [0, 10, 0]}}, "cropping", "area", "expected 4 integers"),
    ({"cropping": {"area": [0, 10.5, 0, 3]}}, "cropping", "area", "expected an integer"),
    ({"ind_min": "a", "cropping": {}}, None, "ind_min", "expected an integer"),
    ({"ind_min": 5, "ind_max": 2, "cropping": {}}, None, "ind_min", "larger than ind_max"),
    ({"channels": ["../.."], "cropping": {}}, None, "channels", "inside the project folder"),
    ({"channels": ["/data"], "cropping": {}}, None, "channels", "inside the project folder"),
    ({"channels": ["a/b"], "cropping": {}}, None, "channels", "inside the project folder"),
    ({"channels": ["a", "a"], "cropping": {}}, None, "channels", "duplicates"),
    ({"device": "gpu", "cropping": {}}, None, "device", "'cuda'"),
    ({"memory_budget": "lots", "cropping": {}}, None, "memory_budget", "4GiB"),
    ({"nprocs": 2, "cropping": {}}, None, "nprocs", "did you mean 'nproc'"),
    ({"croping": {}}, "croping", None, "did you mean 'cropping'"),
    ({"process_steps": ["cropping", "cropping"]}, None, "process_steps", "twice"),
    ({}, None, "process_steps", "no steps to run"),
])
def test_mistakes_name_file_table_and_key(tmp_path, data, table, key, text):
    with pytest.raises(ConfigError, match=text) as info:
        workflow_from_dict(data, file=tmp_path / "params.toml")
    err = info.value
    assert err.file == str(tmp_path / "params.toml") and err.table == table and err.key == key
    assert str(tmp_path / "params.toml") in str(err)


def test_steps_option_selects_consecutive_steps():
    data = {"process_steps": ["cropping", "cropping_final"], "cropping": {}, "cropping_final": {}}
    assert workflow_from_dict(data, steps=["cropping_final"]).step_names == ("cropping_final",)
    # the steps before the chosen ones are done (their folder is read), those after them are not
    wf = workflow_from_dict({**data, "history": ["cropping", "cropping_final"]}, steps=["cropping_final"])
    assert wf.step_names == ("cropping_final",) and wf.history == ("cropping",)
    wf = workflow_from_dict({**data, "history": ["cropping", "cropping_final"]}, steps=["cropping"])
    assert wf.step_names == ("cropping",) and wf.history == ()
    with pytest.raises(ConfigError, match="not in process_steps"):
        workflow_from_dict({"process_steps": ["cropping"], "cropping": {}}, steps=["cropping_final"])


def test_gpustack_keys_and_overrides():
    wf = workflow_from_dict({"cropping": {}, "device": "CUDA:1", "memory_budget": "512MiB", "batch_size": 4,
                             "save_intermediate": False, "output_dtype": "float32"}, device=None)
    assert (wf.device, wf.memory_budget, wf.batch_size, wf.save_intermediate, wf.output_dtype) == \
        ("cuda:1", 512 << 20, 4, False, "float32")
    assert workflow_from_dict({"cropping": {}, "device": "cuda"}, device="cpu").device == "cpu"


@pytest.mark.parametrize("text, size", [("4GiB", 4 << 30), ("512 MB", 512 * 10**6), (2, 2 << 30), ("1.5g", 3 << 29)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


def test_template_round_trips(tmp_path):
    path = tmp_path / "params.toml"
    path.write_text(render_template(channels=["SE2", "ESB"]))
    wf = load_workflow(path)
    assert wf.channels == ("SE2", "ESB") and "cropping" in wf.step_names
