"""The config is validated against workflow/schemas/config.schema.yaml by common.smk."""

import copy

import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from moaflow.study import resolve_plates

from .conftest import REFERENCE, REPO, run_snakemake

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")


def _config(name):
    return yaml.safe_load((REPO / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    validate(_config(name), SCHEMA)


def test_real_config_has_all_55_plates_and_real_urls():
    config = _config("config.yaml")
    validate(config, SCHEMA)
    plates = resolve_plates(config["bbbc021"]["plates"])
    published = pd.read_csv(REFERENCE / "bbbc021" / "BBBC021_v1_image.csv", usecols=["Image_Metadata_Plate_DAPI"])
    assert len(plates) == 55 and set(plates) == set(published["Image_Metadata_Plate_DAPI"])
    assert config["bbbc021"]["base_urls"][0] == "https://data.broadinstitute.org/bbbc/BBBC021/"
    assert config["bbbc014"]["base_urls"][0] == "https://data.broadinstitute.org/bbbc/BBBC014/"


def test_defaults_are_filled_in():
    config = _config("demo.yaml")
    validate(config, SCHEMA)
    assert config["bbbc021"]["archive_pattern"] == "BBBC021_v1_images_{plate}.zip"
    assert config["bbbc014"]["expected_images"] == 192


def test_wrong_type_names_the_key():
    config = _config("demo.yaml")
    config["download"]["retries"] = "five"
    with pytest.raises(WorkflowError, match=r"(?s)'five' is not of type 'integer'.*retries"):
        validate(config, SCHEMA)


def test_unknown_key_names_the_key():
    config = _config("demo.yaml")
    config["bbbc021"]["plate_list"] = ["Week1_22123"]
    with pytest.raises(WorkflowError, match="plate_list"):
        validate(config, SCHEMA)


def test_snakemake_refuses_a_bad_config(tmp_path):
    config = copy.deepcopy(_config("demo.yaml"))
    config["download"]["timeout_secs"] = 3
    result = run_snakemake(tmp_path, config, "-n", check=False)
    assert result.returncode != 0
    assert "timeout_secs" in result.stdout + result.stderr
