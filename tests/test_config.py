"""The config: validated once (moaflow.config) against the packaged schema and the registries."""

import copy
from importlib import resources

import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError

from moaflow import config as moaflow_config
from moaflow.study import resolve_plates

from tests.conftest import REFERENCE, REPO, run_snakemake


def _config(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


def _layered(name):
    """A shipped config file over config/config.yaml, as Snakemake layers --configfile files."""
    from snakemake.utils import update_config

    base = _config("config.yaml")
    update_config(base, _config(name))
    return base


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml", "lab_subset.yaml", "rehearsal.yaml",
                                  "cellpainting_demo.yaml"])
def test_shipped_configs_are_valid(name):
    moaflow_config.validate(_layered(name))


def test_real_config_has_all_55_plates_and_real_urls():
    config = moaflow_config.validate(_config("config.yaml"))
    plates = resolve_plates(config["bbbc021"]["plates"])
    published = pd.read_csv(REFERENCE / "bbbc021" / "BBBC021_v1_image.csv", usecols=["Image_Metadata_Plate_DAPI"])
    assert len(plates) == 55 and set(plates) == set(published["Image_Metadata_Plate_DAPI"])
    assert config["bbbc021"]["base_urls"][0] == "https://data.broadinstitute.org/bbbc/BBBC021/"
    assert config["bbbc014"]["base_urls"][0] == "https://data.broadinstitute.org/bbbc/BBBC014/"


def test_the_defaults_are_the_papers_settings():
    """The defaults reproduce the study (shared/reference/kensert2019.md): the deviations table takes them as
    the paper's column, so each is checked against the reference here."""
    defaults = moaflow_config.defaults()
    pre = defaults["preprocess"]["bbbc021"]
    assert pre["illumination"]["apply"] is False and pre["normalisation"] == "study"
    assert pre["crop_grid"] == [2, 2] and pre["empty_fraction"] == 0.002 and pre["empty_threshold"] == 255 / 5.1
    assert defaults["training"]["architectures"] == ["resnet50", "inception_v3", "inception_resnet_v2"]
    assert [i["weights"] for i in defaults["training"]["initialisations"]] == ["imagenet", "none"]
    assert defaults["training"]["bbbc021"]["preset"] == "final" and defaults["bbbc021"]["taxol_rule"] is True
    assert [moaflow_config.input_size(defaults, "bbbc021", a) for a in defaults["training"]["architectures"]] == [
        224, 299, 299]
    assert defaults["training"]["bbbc014"]["preset"] == "bbbc014"
    assert moaflow_config.input_size(defaults, "bbbc014", "resnet50") == 256   # BBBC014: 256 px crops, no resize


def test_defaults_are_filled_in():
    config = moaflow_config.validate(_layered("demo.yaml"))
    assert config["bbbc021"]["archive_pattern"] == "BBBC021_v1_images_{plate}.zip"
    assert config["bbbc014"]["expected_images"] == 192


def test_wrong_type_names_the_key():
    config = _layered("demo.yaml")
    config["download"]["retries"] = "five"
    with pytest.raises(WorkflowError, match=r"(?s)'five' is not of type 'integer'.*retries"):
        moaflow_config.validate(config)


def test_unknown_key_names_the_key():
    config = _layered("demo.yaml")
    config["bbbc021"]["plate_list"] = ["Week1_22123"]
    with pytest.raises(WorkflowError, match="plate_list"):
        moaflow_config.validate(config)


def test_names_come_from_the_registries():
    """An architecture, preset or normalisation the registries do not hold is refused with the key named; a
    registered one passes without any edit of the schema."""
    for path, value in ((("training", "architectures"), ["resnet51"]), (("training", "bbbc021", "preset"), "fnal"),
                        (("preprocess", "bbbc021", "normalisation"), "zscore"),
                        (("profiling", "feature_normalisation"), "dmso_whiten")):
        config = _config("config.yaml")
        section = config
        for key in path[:-1]:
            section = section.setdefault(key, {})
        section[path[-1]] = value
        with pytest.raises(WorkflowError, match=path[-1]):
            moaflow_config.validate(config)
    schema = moaflow_config.schema()
    assert "lab_cnn" in schema["properties"]["training"]["properties"]["architectures"]["items"]["enum"]


def test_a_renamed_key_says_its_new_name():
    config = _config("config.yaml")
    config["profiling"]["normalisation"] = "dmso_sphere"
    with pytest.raises(ValueError, match="profiling.feature_normalisation"):
        moaflow_config.validate(config)


def test_an_input_size_without_a_crop_store_is_named():
    config = _config("config.yaml")
    config["preprocess"] = {"bbbc021": {"input_sizes": [224, 256]}}
    with pytest.raises(ValueError, match=r"inception_v3 trains at 299 px.*preprocess.bbbc021.input_sizes"):
        moaflow_config.validate(config)


def test_snakemake_refuses_a_bad_config(tmp_path):
    config = copy.deepcopy(_config("demo.yaml"))
    config["download"]["timeout_secs"] = 3
    result = run_snakemake(tmp_path, config, "-n", check=False)
    assert result.returncode != 0
    assert "timeout_secs" in result.stdout + result.stderr


def test_show_config_prints_the_resolved_configuration(capsys):
    from moaflow.cli import main as moaflow

    assert moaflow(["show-config", "--configfile", str(REPO / "config" / "config.yaml"),
                    str(REPO / "config" / "demo.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["profiling"]["feature_normalisation"] == "dmso_sphere"           # from config.yaml
    assert shown["bbbc021"]["base_urls"] == ["http://127.0.0.1:8021/BBBC021/"]     # demo.yaml over it
    assert shown["preprocess"]["bbbc021"]["empty_fraction"] == 0.002              # a default


def test_a_partial_dataset_section_keeps_the_datasets_own_defaults():
    """demo.yaml names only BBBC014's architectures: its preset stays bbbc014 (sigmoid head), its crops 256 px."""
    config = moaflow_config.validate(_layered("demo.yaml"))
    assert config["training"]["bbbc014"]["preset"] == "bbbc014" and config["training"]["bbbc014"]["input_size"] == 256
    assert config["training"]["bbbc021"]["preset"] == "final"


def _unbounded_settings(node, path="") -> list[str]:
    """Every numeric setting without a minimum and a maximum, and every list without minItems and maxItems,
    that does not say why (``x-unbounded``), in a schema."""
    found = []
    if isinstance(node, dict):
        types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        if "x-unbounded" not in node and "enum" not in node:
            if {"number", "integer"} & set(types) and not (
                    {"minimum", "exclusiveMinimum"} & set(node) and {"maximum", "exclusiveMaximum"} & set(node)):
                found.append(f"{path}: a number without a range")
            if "array" in types and not {"minItems", "maxItems"} <= set(node):
                found.append(f"{path}: a list without minItems and maxItems")
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties"):
                found += [f for name, sub in value.items() for f in _unbounded_settings(sub, f"{path}.{name}")]
            elif key in ("items", "additionalProperties", "if", "then", "else", "not"):
                found += _unbounded_settings(value, f"{path}[{key}]")
            elif key in ("allOf", "anyOf", "oneOf"):
                found += [f for i, sub in enumerate(value) for f in _unbounded_settings(sub, f"{path}<{key} {i}>")]
    return found


@pytest.mark.parametrize("schema", ["config.schema.yaml", "hyperparameters.schema.yaml"])
def test_every_numeric_and_list_setting_has_a_range_or_says_why_not(schema):
    text = (resources.files("moaflow") / "data" / schema).read_text()
    assert _unbounded_settings(yaml.safe_load(text)) == []


def test_the_schema_walk_finds_an_unbounded_setting():
    assert _unbounded_settings({"properties": {"a": {"type": "number", "minimum": 0},
                                               "b": {"type": "array", "minItems": 1}}}) == [
        ".a: a number without a range", ".b: a list without minItems and maxItems"]


@pytest.mark.parametrize(("key", "value"), [
    (("preprocess", "bbbc021", "empty_threshold"), -5),
    (("datasets",), []),
    (("training", "architectures"), []),
    (("preprocess", "bbbc021", "input_sizes"), list(range(8, 40))),
])
def test_an_out_of_range_setting_is_refused_naming_its_key(key, value):
    config = _layered("config.yaml")
    node = config
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    with pytest.raises(WorkflowError, match=key[-1]):
        moaflow_config.validate(config)


def test_metadata_without_a_published_checksum_is_listed_as_unchecked():
    config = _layered("config.yaml")
    moaflow_config.validate(config)
    assert moaflow_config.unchecked_metadata(config) == []
    config["bbbc021"]["published_files"]["BBBC021_v1_image.csv"] = None
    assert moaflow_config.unchecked_metadata(config) == ["BBBC021_v1_image.csv"]
    config["datasets"] = ["bbbc014"]
    assert moaflow_config.unchecked_metadata(config) == []


def _with_crops(spec, **training):
    config = moaflow_config.defaults()
    config["crops"] = {"paint": {"filename": "{f}.tif", "columns": {}, **spec}}
    config["datasets"] = ["paint"]
    config["training"]["paint"] = {"per_architecture": {}, **training}
    config["preprocess"]["paint"] = {"input_sizes": [64]}
    config["training"]["architectures"] = ["lab_cnn"]
    return config


def test_a_crops_set_is_local_files_or_a_download_never_both_or_half():
    download = {"base_urls": ["http://127.0.0.1:1/"], "metadata": "m.csv", "archives": ["P1.zip"]}
    for spec, named in (({"images": "i", "metadata": "m.csv", "download": download}, "images.*download"),
                        ({"images": "i"}, r"has \['images'\]"), ({}, "neither")):
        with pytest.raises(ValueError, match=rf"crops.paint: give images and metadata.*{named}"):
            moaflow_config.check(_with_crops(spec))
    fetched = moaflow_config.crops_datasets(_with_crops({"download": download}))["paint"]
    assert fetched["metadata"] == "results/paint/raw/m.csv" and fetched["images"] == "results/paint/images"
    assert moaflow_config.archive_folders(fetched) == ["P1"]


def test_a_downloaded_sets_metadata_is_pending_until_fetched_unless_a_folds_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    download = {"base_urls": ["http://127.0.0.1:1/"], "metadata": "m.csv", "archives": ["P1.zip"]}
    assert moaflow_config.pending_downloads(_with_crops({"download": download})) == ["paint"]
    assert moaflow_config.pending_downloads(_with_crops({"download": download}, folds_file="f.tsv")) == []
    (tmp_path / "results" / "paint" / "raw").mkdir(parents=True)
    (tmp_path / "results" / "paint" / "raw" / "m.csv.verified.json").write_text("{}")
    assert moaflow_config.pending_downloads(_with_crops({"download": download})) == []


def test_reversed_percentiles_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"crops.paint.percentiles: \[99.9, 0.1\]; expected the low"):
        moaflow_config.check(_with_crops({"images": "i", "metadata": "m.csv", "percentiles": [99.9, 0.1]}))


def test_an_initialisation_may_name_its_channel_adapter_over_the_architectures():
    """One architecture under several adapters in one run: each an initialisation of its own."""
    config = moaflow_config.validate(_layered("cellpainting_demo.yaml"))
    assert moaflow_config.initialisation_hyperparameters(config, "imagenet_per_channel") == {
        "channel_adapter": "per_channel"}
    assert moaflow_config.initialisation_hyperparameters(config, "random") == {}
    pairs, _ = moaflow_config.networks(config, "cellpainting")
    assert pairs == [("lab_cnn", "random"), ("efficientnet_lite0", "imagenet_replicate"),
                     ("efficientnet_lite0", "imagenet_per_channel"), ("efficientnet_lite0", "imagenet_project")]
    config["training"]["initialisations"][1]["channel_adapter"] = "sideways"
    with pytest.raises(WorkflowError, match="sideways"):
        moaflow_config.validate(config)
