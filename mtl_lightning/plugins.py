"""Your own weightings, datasets, tasks, architectures and backbones, without editing the library.

A plugin is a Python module (`plugins=[my_lab.methods]`) or a `.py` file (`plugins=[./my_method.py]`) that registers
what it defines, exactly as the built-ins do: `@WEIGHTINGS.register("name")`, `@DATASETS.register("name")`,
`@ARCHITECTURES.register("name")`, timm's `@register_model` for a backbone. `compose` imports the plugins named by
the experiment file and the command line *before* it types the config, so `weighting=my_method
weighting.alpha=0.3` is checked like a built-in. Installed packages can declare the entry point group
`mtl_lightning.plugins` instead, loaded without being named.

A file is imported once per process, as the module named by its stem (so the Ray workers of a search or study,
which get the file through Ray's runtime environment, import the same module by that name where the file is not
on their disk). The composed config records every plugin by its absolute path (`config.yaml`, checkpoints), so
`resume=last` and `checkpoint.load_model` import them again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path

from .errors import MTLError

GROUP = "mtl_lightning.plugins"
_loaded: dict[str, str] = {}  # a plugin spec (module name or resolved file path) -> the module it loaded as
_origin: dict[str, str] = {}  # module name -> where it came from, as --list and the duplicate error name it
_entry_points_loaded = False


def is_file(spec: str) -> bool:
    return spec.endswith(".py")


def resolve(spec: str) -> str:
    """A file spec as an absolute path (what the config records), a module name as it is."""
    return str(Path(spec).expanduser().resolve()) if is_file(spec) else spec


def load_plugins(specs) -> list[str]:
    """Import each plugin once (and, once per process, the installed entry points); returns the specs resolved."""
    load_entry_points()
    out = []
    for spec in [specs] if isinstance(specs, str) else specs or ():  # one plugin without brackets
        spec = resolve(str(spec))
        if spec not in _loaded:
            _loaded[spec] = _import(spec)
        out.append(spec)
    return out


def _import(spec: str) -> str:
    if not is_file(spec):
        _run(lambda: importlib.import_module(spec), spec)
        _origin.setdefault(spec, f"plugin {spec}")
        return spec
    path, name = Path(spec), Path(spec).stem
    known = sys.modules.get(name)
    if known is not None and _origin.get(name) != f"plugin {path}":
        where = getattr(known, "__file__", None) or "a module already imported"
        raise MTLError(
            f"The plugin file {path} is named like the module {name!r} ({where}), which is imported already: a "
            f"plugin file is imported as the module named by its stem. Rename the file."
        )
    if path.is_file():
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        _origin[name] = f"plugin {path}"
        try:
            _run(lambda: module_spec.loader.exec_module(module), str(path))
        except MTLError:
            del sys.modules[name]
            raise
        return name
    if importlib.util.find_spec(name) is None:  # not on this disk, and not shipped to this worker either
        raise MTLError(
            f"The plugin {path} does not exist (on this machine), and no module {name!r} was shipped with it: give "
            "the path of the file, or the name of an installed module."
        )
    _origin[name] = f"plugin {path}"  # a Ray worker on another node: the file came through the runtime environment
    _run(lambda: importlib.import_module(name), str(path))
    return name


def _run(load, what: str) -> None:
    """Import a plugin, turning its failure into one paragraph: its name and the error's last line, no traceback."""
    try:
        load()
    except MTLError:
        raise
    except Exception as e:
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        if isinstance(e, SyntaxError):  # the line Python could not read
            at = f" ({e.filename}, line {e.lineno}{f': {e.text.strip()}' if e.text else ''})"
        else:  # the innermost line of the plugin's own code that raised
            ours = str(Path(__file__).resolve().parent)
            frames = traceback.extract_tb(e.__traceback__)
            mine = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith(ours)]
            at = f" ({mine[-1].filename}, line {mine[-1].lineno})" if mine else ""
        raise MTLError(f"The plugin {what} failed to import: {last}{at}") from None


def load_entry_points() -> None:
    """The plugins installed packages declare in the entry point group `mtl_lightning.plugins`, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=GROUP):
        module = ep.value.split(":")[0]
        _origin.setdefault(module, f"entry point {ep.name} ({ep.dist.name if ep.dist else 'installed'})")
        _run(ep.load, f"entry point {ep.name} ({ep.value})")


def origin(module: str) -> str | None:
    """Where the module that registered something came from: a plugin's path, an entry point; None if built in."""
    if module.split(".")[0] == "mtl_lightning":
        return None
    return _origin.get(module) or _origin.get(module.split(".")[0]) or f"module {module}"
