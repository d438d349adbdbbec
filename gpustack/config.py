"""params.toml -> a validated Workflow. PyStack3D files run unchanged; gpustack keys live beside theirs.

Everything here is checked before any slice is read, and every problem is one ConfigError that names the file,
the table and the key. No torch import.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from gpustack import schema
from gpustack.errors import ConfigError
from gpustack.steps import PYSTACK3D_STEPS, REGISTRY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYSTACK3D_KEYS = ("project_dir", "dirname", "input_dirname", "channels", "ind_min", "ind_max", "nproc",
                  "process_steps", "history")
GPUSTACK_KEYS = ("device", "batch_size", "memory_budget", "save_intermediate", "output_dtype", "output_dir")
TOP_LEVEL_KEYS = PYSTACK3D_KEYS + GPUSTACK_KEYS
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_UNITS = {"": 1 << 30, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


@dataclass(frozen=True)
class StepSpec:
    name: str
    config: Any  # the step's frozen Config dataclass


@dataclass(frozen=True)
class Workflow:
    params_file: Path | None
    project_dir: Path
    output_dir: Path  # process/ goes here (the project folder unless `output_dir` is set)
    channels: tuple[str, ...] = (".",)
    ind_min: int = 0
    ind_max: int = 99999
    nproc: int | None = None
    steps: tuple[StepSpec, ...] = ()
    history: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int | None = None
    memory_budget: int | None = None  # bytes
    save_intermediate: bool = True
    output_dtype: str = "input"
    warnings: tuple[str, ...] = field(default=())

    @property
    def process_dir(self) -> Path:
        return self.output_dir / "process"

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)


def parse_memory(value: Any) -> int:
    """'4GiB', '512 MB', 2 (GiB) -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"expected a size such as '4GiB' or '512MiB', got {value!r}")
    if unit not in _UNITS or number <= 0:
        raise ValueError(f"expected a positive size such as '4GiB' or '512MiB', got {value!r}")
    return int(number * _UNITS[unit])


def check_channel(name: Any) -> str:
    """A channel is a sub-folder (or multi-page TIFF) directly inside the project folder, or '.' for the folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a channel must be a non-empty folder name, got {name!r}")
    if name == ".":
        return name
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or "/" in name or "\\" in name
            or name in ("..", ".") or name.startswith("~")):
        raise ValueError(f"channel {name!r} must be a folder name inside the project folder (no '..', no path "
                         "separators, not absolute)")
    return name


def _channels(value: Any) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        return (".",)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of folder names, got {value!r}")
    names = tuple(check_channel(v) for v in value)
    if len(set(names)) != len(names):
        raise ValueError(f"channels {list(names)} has duplicates")
    return names


def _step_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of step names, got {value!r}")
    for name in value:
        if name not in PYSTACK3D_STEPS:
            close = difflib.get_close_matches(name, PYSTACK3D_STEPS, n=1)
            raise ValueError(f"unknown step {name!r}" + (f"; did you mean {close[0]!r}?" if close else
                             f"; steps are {', '.join(PYSTACK3D_STEPS)}"))
    if len(set(value)) != len(value):
        raise ValueError(f"{value} lists a step twice")
    return tuple(value)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value.strip().lower()):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value.strip().lower()


_TOP_COERCE = {
    "channels": _channels,
    "ind_min": schema.integer(0),
    "ind_max": schema.integer(0),
    "nproc": schema.integer(1),
    "process_steps": _step_list,
    "history": _step_list,
    "device": _device,
    "batch_size": schema.integer(1),
    "memory_budget": parse_memory,
    "save_intermediate": schema.boolean,
    "output_dtype": schema.choice("input", "float32"),
}


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, got {value!r}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError("no such file", file=str(path))
    if path.is_dir():
        raise ConfigError("is a folder, expected a params.toml file", file=str(path))
    try:
        text = path.read_bytes()
        # A byte-order mark (Windows Notepad's UTF-8) is not TOML, but it is no reason to refuse the file
        return tomllib.loads(text.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read: {exc}", file=str(path)) from None


def build_step(name: str, table: dict[str, Any], *, file: str | None) -> StepSpec:
    cls = REGISTRY[name]  # names were checked against PyStack3D's steps, which gpustack all provides
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table [{name}], got {table!r}", file=file, key=name)
    return StepSpec(name, schema.build(cls.Config, table, file=file, name=name))


def workflow_from_dict(data: dict[str, Any], *, file: Path | None = None, base_dir: Path | None = None,
                       steps: list[str] | None = None, device: str | None = None,
                       overrides: dict[str, Any] | None = None) -> Workflow:
    """Validate a parsed params.toml. `steps`/`device`/`overrides` are command-line values that win over the file."""
    where = str(file) if file else None
    data = {**data, **(overrides or {})}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key in data:
        if key in tables:
            if key not in PYSTACK3D_STEPS:
                close = difflib.get_close_matches(key, PYSTACK3D_STEPS + TOP_LEVEL_KEYS, n=1)
                raise ConfigError("unknown step table" + (f"; did you mean {close[0]!r}?" if close else ""),
                                  file=where, table=key)
        elif key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            raise ConfigError("unknown key" + (f"; did you mean {close[0]!r}?" if close else
                              f"; top-level keys are {', '.join(TOP_LEVEL_KEYS)}"), file=where, key=key)

    values: dict[str, Any] = {}
    for key, coerce in _TOP_COERCE.items():
        if key in data:
            try:
                values[key] = coerce(data[key])
            except ValueError as exc:
                raise ConfigError(str(exc), file=where, key=key) from None
    notes = []

    base = base_dir or (file.parent if file else Path.cwd())
    project = None
    for key in ("project_dir", "dirname", "input_dirname"):
        if key in data:
            try:
                project = Path(_path(data[key])).expanduser()
            except ValueError as exc:
                raise ConfigError(str(exc), file=where, key=key) from None
            if key != "project_dir":
                notes.append(f"'{key}' is deprecated (PyStack3D 2026.1 renamed it 'project_dir'); read it anyway")
            break
    project_dir = (base / project if project and not project.is_absolute() else project) or base
    output_dir = project_dir if project_dir.is_dir() or not project_dir.suffix else project_dir.parent
    if "output_dir" in data:
        try:
            out = Path(_path(data["output_dir"])).expanduser()
        except ValueError as exc:
            raise ConfigError(str(exc), file=where, key="output_dir") from None
        output_dir = out if out.is_absolute() else base / out

    if values.get("ind_min", 0) > values.get("ind_max", 99999):
        raise ConfigError(f"ind_min ({values['ind_min']}) is larger than ind_max ({values['ind_max']})",
                          file=where, key="ind_min")

    if device is not None:
        try:
            values["device"] = _device(device)
        except ValueError as exc:
            raise ConfigError(str(exc), key="--device") from None

    # Which steps run: the command line's, else process_steps, else the tables present in PyStack3D's order.
    order = values.pop("process_steps", None)
    if order is not None and not order:
        raise ConfigError("is empty: list the steps to run, e.g. [\"cropping\"]", file=where, key="process_steps")
    if order is None:
        order = tuple(name for name in PYSTACK3D_STEPS if name in tables)
        if not order:
            raise ConfigError("no steps to run: set process_steps = [\"cropping\", ...] or add step tables",
                              file=where, key="process_steps")
    history = values.pop("history", ())
    if steps is not None:
        try:
            chosen = _step_list(list(steps))
        except ValueError as exc:
            raise ConfigError(str(exc), key="--steps") from None
        missing = [s for s in chosen if s not in order]
        if missing:
            raise ConfigError(f"{missing[0]!r} is not in process_steps {list(order)}", key="--steps")
        positions = [order.index(s) for s in chosen]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            raise ConfigError(f"{list(chosen)} must be consecutive steps of process_steps {list(order)}",
                              key="--steps")
        before, chosen_order = tuple(order[:positions[0]]), tuple(order[positions[0]:positions[-1] + 1])
        # The steps before the chosen ones are done, and none after them: the first chosen step reads the last
        # one's folder, as after PyStack3D's history (not the raw input, which would break the chain of process/)
        history = tuple(s for s in history if s not in order) + before
        order = chosen_order
    # PyStack3D's `history`: steps already done (by PyStack3D or by hand); the run starts after them.
    run = [name for name in order if name not in history]

    # Every table is validated, run or not: a typo should not wait until the day the step is switched on.
    step_specs = {}
    for name, table in tables.items():
        step_specs[name] = build_step(name, table, file=where)
    specs = tuple(step_specs.get(name) or build_step(name, {}, file=where) for name in run)
    return Workflow(params_file=file, project_dir=project_dir, output_dir=output_dir, steps=specs,
                    history=tuple(history), warnings=tuple(notes), **values)


def load_workflow(path: str | Path, **kwargs: Any) -> Workflow:
    path = Path(path)
    return workflow_from_dict(read_toml(path), file=path, **kwargs)
