"""The workflow's configuration: validated once, against the schema and moaflow's registries.

``moaflow/data/config.schema.yaml`` holds every setting's name, type, range,
default and description (package data: the workflow, a deployed module and
a wheel read the same file). Where a setting names a registered part (an
architecture, a preset, an image or feature normalisation) the schema says
``x-registry: <registry>`` and `schema` puts the registry's names there as an
``enum``: the names are written once, in the registry. `validate` fills in the
defaults (snakemake.utils.validate) and then checks what a schema cannot say
(a dataset named in ``datasets`` must be configured, input sizes must have a
crop store, ...), each error naming the key and what was expected.
"""

from __future__ import annotations

import copy
import os
import tempfile
from importlib import resources
from pathlib import Path

import yaml

#: Settings that changed their name or moved: old key -> what to do instead.
RENAMED = {
    ("profiling", "normalisation"): "renamed to profiling.feature_normalisation (it normalises network features; "
                                    "preprocess.<dataset>.normalisation normalises image intensities)",
    ("weights", "files"): "the ImageNet weights files are facts of moaflow's architecture registry "
                          "(moaflow.learn.architectures); remove the key",
}


def registries() -> dict[str, list[str]]:
    """Registry name (as ``x-registry`` names it in the schema) -> the registered names."""
    from moaflow.analysis.profiling import FEATURE_NORMALISATIONS
    from moaflow.learn.adapters import ADAPTERS
    from moaflow.learn.architectures import REGISTRY, TRANSFERS
    from moaflow.learn.inputs import CHANNEL_ORDERS, INPUT_SCALINGS, PRETRAINED
    from moaflow.learn.presets import PRESETS
    from moaflow.learn.selection import RULES
    from moaflow.preprocess.intensity import NORMALISATIONS

    return {"architectures": list(REGISTRY), "presets": list(PRESETS),
            "intensity_normalisations": list(NORMALISATIONS), "feature_normalisations": list(FEATURE_NORMALISATIONS),
            "channel_orders": list(CHANNEL_ORDERS), "input_scalings": [*INPUT_SCALINGS, PRETRAINED],
            "model_selections": list(RULES), "transfers": list(TRANSFERS), "channel_adapters": list(ADAPTERS)}


def schema_path() -> str:
    """The config schema, shipped with the package."""
    return str(resources.files("moaflow").joinpath("data/config.schema.yaml"))


def schema(path: str | os.PathLike | None = None) -> dict:
    """A schema (the config's unless ``path`` names another) with every ``x-registry`` marker replaced by the
    registry's names."""
    path = path or schema_path()
    names = registries()

    def expand(node):
        if isinstance(node, dict):
            node = {k: expand(v) for k, v in node.items()}
            registry = node.pop("x-registry", None)
            if registry is not None:
                if registry not in names:
                    raise ValueError(f"{path}: x-registry {registry!r} is not one of {sorted(names)}")
                node["enum"] = names[registry]
            return node
        if isinstance(node, list):
            return [expand(v) for v in node]
        return node

    return expand(yaml.safe_load(Path(path).read_text()))


def _check_renamed(config: dict) -> None:
    for (section, key), advice in RENAMED.items():
        if isinstance(config.get(section), dict) and key in config[section]:
            raise ValueError(f"config: {section}.{key}: {advice}")


def validate(config: dict) -> dict:
    """Check ``config`` against the schema (filling in defaults, in place) and the rules a schema cannot state.

    Returns
    -------
    config : dict
        The same object, with defaults.

    Raises
    ------
    snakemake.exceptions.WorkflowError
        A wrong type, a value out of range or an unknown key, naming it.
    ValueError
        A renamed key, or settings that contradict each other, naming them.
    """
    from snakemake.utils import validate as validate_against

    from moaflow.learn import presets

    _check_renamed(config)
    with tempfile.TemporaryDirectory() as folder:
        expanded = Path(folder) / "config.schema.yaml"
        expanded.write_text(yaml.safe_dump(schema(), sort_keys=False))
        validate_against(config, str(expanded))
        hyper = Path(folder) / "hyperparameters.schema.yaml"
        hyper.write_text(yaml.safe_dump(schema(presets.schema_path()), sort_keys=False))
        for overrides in _hyperparameter_overrides(config):
            # against their one source, moaflow's own schema (no defaults filled: the preset decides)
            validate_against(overrides, str(hyper), set_default=False)
    check(config)
    return config


def defaults(**sections) -> dict:
    """The defaults of every setting (plus the given top-level ``sections``): the study as the paper ran it,
    and what tests and tools start from. Without mirrors of its own the data would come from nowhere:
    ``base_urls`` are placeholders."""
    config = {"bbbc021": {"base_urls": ["http://127.0.0.1/"]}, "bbbc014": {"base_urls": ["http://127.0.0.1/"]},
              **copy.deepcopy(sections)}
    return validate(config)


def _hyperparameter_overrides(config: dict):
    for name, section in config.get("training", {}).items():
        if isinstance(section, dict) and "preset" in section:
            yield section.get("hyperparameters", {})
            for special in section.get("per_architecture", {}).values():
                yield special.get("hyperparameters", {})


def crops_datasets(config: dict) -> dict:
    """The pre-cropped image sets (``crops:``) that this run trains on; a downloaded one's ``images`` and
    ``metadata`` are where its download puts them (`downloaded_files`)."""
    return {name: {**spec, **downloaded_files(name, spec)} for name, spec in config["crops"].items()
            if name in config["datasets"]}


def downloaded_files(name: str, spec: dict) -> dict:
    """Where a crops dataset's ``download`` puts its metadata table and extracted images (`moaflow.layout`):
    ``images`` (each archive's folder below it) and ``metadata``; nothing for a set read from local files."""
    from moaflow import layout

    if not spec.get("download"):
        return {}
    return {"images": layout.images_dir(name), "metadata": layout.raw(name, spec["download"]["metadata"])}


def pending_downloads(config: dict) -> list[str]:
    """The downloaded crops datasets whose folds come from metadata not fetched yet (no folds file; its receipt
    absent): Snakemake plans every job before it runs one, so a run then fetches those sets only."""
    from moaflow import layout

    return [name for name, spec in crops_datasets(config).items()
            if spec.get("download") and not (config["training"].get(name) or {}).get("folds_file")
            and not os.path.isfile(layout.receipt(spec["metadata"]))]


def archive_folders(spec: dict) -> list[str]:
    """The folders a downloaded crops dataset's archives extract to (each archive's name without ``.zip``)."""
    return [archive[: -len(".zip")] for archive in spec["download"]["archives"]] if spec.get("download") else []


def initialisation_hyperparameters(config: dict, init: str) -> dict:
    """What an initialisation sets over the architecture's hyper-parameters: its ``channel_adapter``, if any."""
    entry = next(i for i in config["training"]["initialisations"] if i["name"] == init)
    return {"channel_adapter": entry["channel_adapter"]} if "channel_adapter" in entry else {}


def moa_datasets(config: dict) -> list[str]:
    """Datasets classified by mechanism of action (evaluated alike); BBBC014 is a translocation yes/no."""
    return [d for d in config["datasets"] if d != "bbbc014"]


def trained_architectures(config: dict, dataset: str) -> list[str]:
    """training.<dataset>.architectures when given, else training.architectures."""
    return config["training"][dataset].get("architectures") or config["training"]["architectures"]


def networks(config: dict, dataset: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The (architecture, initialisation) pairs trained on a dataset, and those left out.

    Each architecture trains from every initialisation, or from those its ``per_architecture`` entry names;
    an ``imagenet`` initialisation only where the architecture has ImageNet weights (the others are returned
    as left out, ``architecture/init``, for the log).
    """
    from moaflow.learn.architectures import pretrained

    weights = {i["name"]: i["weights"] for i in config["training"]["initialisations"]}
    special = config["training"][dataset]["per_architecture"]
    pairs, left_out = [], []
    for architecture in trained_architectures(config, dataset):
        for init in special.get(architecture, {}).get("initialisations") or weights:
            if weights[init] == "imagenet" and architecture not in pretrained():
                left_out.append(f"{architecture}/{init}")
            else:
                pairs.append((architecture, init))
    return pairs, left_out


def input_size(config: dict, dataset: str, architecture: str) -> int:
    """The architecture's input side for a dataset: ``training.<dataset>.input_sizes.<architecture>``, else
    ``training.<dataset>.input_size``, else the architecture registry's."""
    from moaflow.learn.architectures import get

    section = config["training"][dataset]
    return section.get("input_sizes", {}).get(architecture) or section["input_size"] or get(architecture).input_size


def normalises_to_controls(config: dict) -> bool:
    """Profiles normalised to each plate's DMSO crops (a feature normalisation that needs them)."""
    from moaflow.analysis.profiling import FEATURE_NORMALISATIONS
    from moaflow.learn.adapters import ADAPTERS

    profiling = config["profiling"]
    return profiling["enabled"] and FEATURE_NORMALISATIONS[profiling["feature_normalisation"]].needs_controls


def unchecked_metadata(config: dict) -> list[str]:
    """The BBBC021 metadata files this run fetches without a published size and checksum to hold them to
    (``bbbc021.published_files``): a file cut short or altered would then pass as long as it parses, so the
    run says so at its start and in its report."""
    if "bbbc021" not in config["datasets"]:
        return []
    section = config["bbbc021"]
    return [section[key] for key in ("image_csv", "moa_csv") if not section["published_files"].get(section[key])]


def check(config: dict) -> None:
    """The rules a schema cannot state; each error names the keys at fault.

    Raises
    ------
    ValueError
    """
    for section in ("bbbc021", "bbbc014"):
        # The shipped config/config.yaml is the base that --configfile files are layered on.
        if section not in config:
            raise ValueError(
                f"config: no {section!r} section. The Snakefile reads config/config.yaml from the working "
                f"directory ({os.getcwd()}) and layers --configfile files on top; copy moaflow's "
                "config/config.yaml there (README: 'From scratch space')")
    crops = crops_datasets(config)
    for name in config["datasets"]:
        if name not in ("bbbc021", "bbbc014") and name not in config["crops"]:
            raise ValueError(f"datasets: {name!r} is neither bbbc021, bbbc014 nor a key of the config's crops section")
        for section in ("training", "preprocess"):
            if name in crops and name not in config[section]:
                raise ValueError(f"{section}.{name}: missing; a crops dataset needs its own {section} section")
    for name, spec in config["crops"].items():
        local = [key for key in ("images", "metadata") if key in spec]
        if bool(spec.get("download")) == bool(local) or (local and len(local) < 2):
            raise ValueError(f"crops.{name}: give images and metadata (local files), or download (fetched); has "
                             f"{local + (['download'] if spec.get('download') else []) or 'neither'}")
        low, high = spec.get("percentiles") or (0, 100)   # absent before the schema's defaults are filled
        if low >= high:
            raise ValueError(f"crops.{name}.percentiles: [{low}, {high}]; expected the low percentile first, "
                             "below the high one")
    for name, spec in crops.items():
        # A mapping's order is not data (YAML writers sort keys): the files follow `channels`' order.
        if isinstance(spec["filename"], dict) and sorted(spec["filename"]) != sorted(spec["channels"]):
            raise ValueError(f"crops.{name}.filename names the channels {sorted(spec['filename'])}; crops.{name}."
                             f"channels is {list(spec['channels'])}: expected a file name pattern for each channel")
    if normalises_to_controls(config):
        for name in moa_datasets(config):
            if name in crops and crops[name].get("control_compound") is None:
                raise ValueError(
                    f"profiling.feature_normalisation: {config['profiling']['feature_normalisation']!r} normalises "
                    f"profiles to each plate's DMSO crops, and the crops dataset {name!r} has none; name its "
                    f"control (crops.{name}.control_compound) or set a normalisation without controls (none or "
                    "standardize) for this run")
    initialisations = {i["name"] for i in config["training"]["initialisations"]}
    for name in config["datasets"]:
        for architecture, special in config["training"][name]["per_architecture"].items():
            unknown = sorted(set(special.get("initialisations", [])) - initialisations)
            if unknown:
                raise ValueError(f"training.{name}.per_architecture.{architecture}.initialisations: {unknown} are not "
                                 f"among training.initialisations {sorted(initialisations)}")
        available = config["preprocess"][name]["input_sizes"]
        for architecture in trained_architectures(config, name):
            size = input_size(config, name, architecture)
            if size not in available:
                raise ValueError(f"training.{name}: {architecture} trains at {size} px (training.{name}.input_sizes, "
                                 f"input_size, else the architecture registry's), which is not among "
                                 f"preprocess.{name}.input_sizes {available}")


def show(configfile: list[str]) -> dict:
    """Print the whole resolved configuration: the config files merged in order (as Snakemake layers
    ``--configfile`` files), every default filled in, checked.

    Parameters
    ----------
    configfile : list of path
        Config files, later ones merged over earlier ones (e.g. config/config.yaml config/demo.yaml).
    """
    from snakemake.utils import update_config

    config: dict = {}
    for path in configfile:
        update_config(config, yaml.safe_load(Path(path).read_text()) or {})
    validate(config)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return config
