# The configuration, validated once (moaflow.config: schema, registries, cross-checks), and the path and
# input helpers the rules share. Every path comes from moaflow.layout; every rule runs one step of
# moaflow.steps through workflow/scripts/step.py, its named inputs, outputs and params being the step
# function's keyword arguments.
import csv
import functools
import hashlib
import json
import os
import re
import sys
from importlib import resources

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

try:
    from moaflow import config as moaflow_config, layout
    from moaflow.learn import architectures as architecture_registry, presets
    from moaflow.study import BBBC021_CHANNELS, BBBC021_STORED_ORDER, resolve_plates
except ImportError as error:
    raise WorkflowError(
        f"moaflow cannot be imported by this Snakemake's Python ({sys.executable}): {error}. Run the "
        "Snakemake of the environment moaflow is installed in: `.venv/bin/snakemake ...`, or "
        "`source .venv/bin/activate` first (README: 'The two commands')."
    ) from None


moaflow_config.validate(config)
DATASETS = config["datasets"]
CROPS = moaflow_config.crops_datasets(config)
MOA_DATASETS = moaflow_config.moa_datasets(config)
TRAIN = config["training"]
INITS = {i["name"]: i["weights"] for i in TRAIN["initialisations"]}
PROFILING = config["profiling"]
if _unchecked := moaflow_config.unchecked_metadata(config):
    logger.warning(
        f"UNCHECKED METADATA: {', '.join(_unchecked)} will be used without a published size and SHA-256 "
        "(bbbc021.published_files): a file cut short or altered passes as long as its structure looks "
        "complete. The report says so too."
    )
# Tags every MLflow run: which configuration produced it.
CONFIG_HASH = hashlib.sha256(
    json.dumps(config, sort_keys=True, default=str).encode()
).hexdigest()[:12]
BBBC021_PLATES = (
    resolve_plates(config["bbbc021"]["plates"]) if "bbbc021" in DATASETS else []
)
BBBC021_IMAGE_CSV = layout.raw("bbbc021", config["bbbc021"]["image_csv"])
BBBC021_MOA_CSV = layout.raw("bbbc021", config["bbbc021"]["moa_csv"])
# The paper's settings, for the deviations table: the defaults (they reproduce the study).
DEFAULTS = moaflow_config.defaults()
receipt = layout.receipt
STEP = "../scripts/step.py"
# Outside a rule a line may not start with `report(` (the parser takes it for the directive).
report_file = report


wildcard_constraints:
    plate=r"Week[0-9]+_[0-9]+",
    chunk=r"part-[0-9]+-of-[0-9]+",
    seed=r"[0-9]+",


# Files that ship with the workflow are found through the workflow's own location, so it runs from any
# working directory (--directory) or as a module; the user's config and results stay in the working directory.
SHIPPED_FOLDS = {
    ds: workflow.source_path(f"../../config/folds/{ds}.tsv")
    for ds in ("bbbc021", "bbbc014")
}
# The authors' own treatment-level predictions (pharmbio/kensert_CNN, MIT), shipped with moaflow.
PUBLISHED_PREDICTIONS = str(
    resources.files("moaflow") / "data" / "kensert2019_predictions.csv"
)


def folds_file(dataset):
    """training.<dataset>.folds_file, the folds shipped with the workflow, or a crops dataset's generated folds."""
    if TRAIN[dataset]["folds_file"]:
        return TRAIN[dataset]["folds_file"]
    if dataset in CROPS:
        return layout.generated_folds(dataset)
    return SHIPPED_FOLDS[dataset]


@functools.cache
def fold_names(dataset):
    """The dataset's folds, known at parse time so that `snakemake -n` lists every training job."""
    if dataset in CROPS and not TRAIN[dataset]["folds_file"]:
        # Generated folds come from the local metadata, by the functions the rules run.
        from moaflow.datasets.tables import crops_table
        from moaflow.learn.folds import dataset_folds

        spec = CROPS[dataset]
        if dataset in PENDING:
            return []  # this run only fetches the set (all_targets)
        table = crops_table(
            spec["images"],
            spec["metadata"],
            columns=spec["columns"],
            filename=spec["filename"],
            separator=spec["separator"],
            batch_pattern=spec.get("batch_pattern"),
            log=lambda _: None,
            check_files=not spec.get("download"),
        )
        if spec.get("control_compound"):
            table = table[table["compound"] != spec["control_compound"]]
        return list(dataset_folds(table, **TRAIN[dataset]["folds"])["fold"])
    with open(folds_file(dataset)) as handle:
        return [row["fold"] for row in csv.DictReader(handle, delimiter="\t")]


def fold_chunks(dataset):
    """The dataset's folds in groups of training.folds_per_job: chunk name -> fold names."""
    names = fold_names(dataset)
    if not names:  # a set still to be fetched (PENDING)
        return {}
    size = TRAIN["folds_per_job"] or len(names)
    chunks = [names[i : i + size] for i in range(0, len(names), size)]
    return {f"part-{i + 1:02d}-of-{len(chunks):02d}": c for i, c in enumerate(chunks)}


def trained_architectures(dataset):
    return moaflow_config.trained_architectures(config, dataset)


def input_size(dataset, architecture):
    return moaflow_config.input_size(config, dataset, architecture)


def store_of(dataset, architecture, kind="crops"):
    """The crop store at an architecture's input size (kind: crops, or dmso for the DMSO crops)."""
    return layout.store(dataset, input_size(dataset, architecture), kind)


@functools.cache
def networks(dataset):
    """The (architecture, initialisation) pairs trained on a dataset (moaflow.config.networks); those left
    out, an imagenet initialisation of an architecture without ImageNet weights, are named in the log once.
    """
    pairs, left_out = moaflow_config.networks(config, dataset)
    if left_out:
        logger.info(
            f"{dataset}: {len(left_out)} network(s) not trained, their architectures have no ImageNet "
            f"weights (moaflow.learn.architectures): {', '.join(left_out)}"
        )
    return pairs


def network_hyperparameters(dataset, architecture, init):
    """One network's hyper-parameters: the architecture's (preset, overrides), then what its initialisation
    sets (a channel_adapter of its own)."""
    return {
        **presets.resolved(TRAIN[dataset], architecture),
        **moaflow_config.initialisation_hyperparameters(config, init),
    }


def weights_file(init, architecture):
    """What training starts from: the fetched ImageNet file, none (random), or a configured path."""
    if INITS[init] == "imagenet":
        return layout.weights(architecture)
    return INITS[init]


def weights_receipt(init, architecture):
    """The fetched ImageNet weights' receipt for an `imagenet` initialisation, else nothing."""
    return receipt(layout.weights(architecture)) if INITS[init] == "imagenet" else []


def training_jobs(dataset, architecture=None, init=None, seed=None):
    """Every training job's summary of a dataset (or of one architecture, initialisation and seed)."""
    return [
        layout.job_summary(dataset, a, i, s, chunk)
        for a, i in networks(dataset)
        if architecture in (None, a) and init in (None, i)
        for s in TRAIN["seeds"]
        if seed in (None, int(s))
        for chunk in fold_chunks(dataset)
    ]


def training_runs(dataset):
    """Each trained fold's folder (its outputs are written by the training job of its chunk)."""
    return [
        layout.fold_dir(dataset, a, i, s, fold)
        for a, i in networks(dataset)
        for s in TRAIN["seeds"]
        for fold in fold_names(dataset)
    ]


def imagenet_feature_architectures(dataset):
    """Architectures whose untrained ImageNet features are a profiling source (profiling.imagenet_features):
    those this run trains from an imagenet initialisation (their weights are at hand).
    """
    if not PROFILING["imagenet_features"]:
        return []
    return list(
        dict.fromkeys(a for a, i in networks(dataset) if INITS[i] == "imagenet")
    )


def normalises_to_controls():
    return moaflow_config.normalises_to_controls(config)


def control_statistics_files(dataset):
    """Source (architecture/init) -> its DMSO statistics (rule embed_controls), for the seed profiling uses."""
    if not normalises_to_controls():
        return {}
    return {
        f"{a}/{i}": layout.control_statistics(dataset, a, i, TRAIN["seeds"][0])
        for a, i in networks(dataset)
    }


def download_targets(dataset):
    """A downloaded crops dataset's fetched metadata and extracted archives (their receipts)."""
    spec = CROPS[dataset]
    return [receipt(spec["metadata"])] + [
        receipt(os.path.join(spec["images"], folder))
        for folder in moaflow_config.archive_folders(spec)
    ]


# Downloaded crops datasets whose folds come from metadata not fetched yet: Snakemake plans every job before
# it runs one, so such a run fetches the sets only and says so; the same command again plans the study.
PENDING = moaflow_config.pending_downloads(config)
if PENDING:
    logger.warning(
        f"FETCH ONLY: {', '.join(PENDING)} generate their folds from metadata that is downloaded and not here "
        "yet; this run fetches and extracts those sets only. Run the same command again to plan and run the "
        "study (moaflow demo does so itself), or name a folds file (training.<dataset>.folds_file)."
    )


def all_targets():
    """The default target: the whole study, and the resource table of what it cost (only the downloads
    while a set's metadata is pending)."""
    if PENDING:
        return [t for ds in PENDING for t in download_targets(ds)]
    return study_targets() + [layout.resources()]


def study_targets():
    targets = []
    if "bbbc021" in DATASETS:
        targets.append(layout.store_index("bbbc021"))
        if config["preprocess"]["bbbc021"]["illumination"]["compute"]:
            targets += [layout.illumination_figure(p) for p in BBBC021_PLATES]
    targets += [layout.store_index(ds) for ds in DATASETS if ds != "bbbc021"]
    targets += [layout.evaluation(ds, "summary.json") for ds in DATASETS]
    if PROFILING["enabled"]:
        targets += [layout.profiling(ds, "summary.json") for ds in MOA_DATASETS]
        targets += [
            layout.interpretation(ds, a, i)
            for ds in MOA_DATASETS
            for a, i in networks(ds)
        ]
    targets.append(layout.mlflow("runs.json"))
    return targets


def start_live_tracking():
    """Create the parent MLflow run on a tracking server (MLFLOW_TRACKING_URI or tracking.uri = http(s))."""
    from moaflow import tracking

    uri = tracking.resolve_uri(config["tracking"]["uri"])
    if tracking.is_server(uri):
        record = tracking.start_parent(
            uri,
            config["tracking"]["experiment"],
            CONFIG_HASH,
            layout.mlflow("parent.json"),
        )
        logger.info(
            f"MLflow: live logging to {uri}, parent run {record['parent_run_id']}"
        )


# ------------------------------------------------------------------ per-stage helpers


def illumination_functions(plate):
    return [layout.illumination(plate, channel) for channel in BBBC021_CHANNELS]


def study_outputs(dataset):
    """What only the study's own dataset gets: the deviations from the paper and the authors' predictions."""
    if dataset != "bbbc021":
        return {}
    outputs = {
        "deviations": report_file(
            layout.evaluation("bbbc021", "deviations.csv"),
            caption="../report/deviations.rst",
            category="Evaluation",
            subcategory="Summary",
        )
    }
    if config["evaluation"]["published_predictions"]:
        outputs["published_confusion"] = [
            report_file(
                layout.evaluation("bbbc021", f"confusion_treatment_{a}_published.png"),
                caption="../report/published.rst",
                category="Evaluation",
                subcategory="Treatment-level confusion (bbbc021)",
                labels={
                    "architecture": a,
                    "init": "published (the authors' predictions)",
                },
            )
            for a in architecture_registry.paper_architectures()
        ]
    return outputs


def study_inputs(dataset):
    """The image CSV, whose receipt says whether the data were the Broad's, and the paper's folds (the study's
    dataset only)."""
    if dataset != "bbbc021":
        return {}
    # The shipped folds are the paper's: an input, since their path lies in Snakemake's per-run source cache.
    return {
        "image_csv": receipt(BBBC021_IMAGE_CSV),
        "paper_folds": SHIPPED_FOLDS["bbbc021"],
    }


def study_params(dataset):
    """The deviations table's and the published predictions' arguments (the study's dataset only)."""
    if dataset != "bbbc021":
        return {}
    from moaflow.analysis.deviations import settings_of

    return {
        # only what the table reads: other settings must not redo the evaluation
        "settings": settings_of(config),
        "paper": settings_of(DEFAULTS),
        "published": (
            PUBLISHED_PREDICTIONS
            if config["evaluation"]["published_predictions"]
            else None
        ),
    }


def report_figures(dataset, level):
    return [
        report_file(
            layout.evaluation(dataset, f"confusion_{level}_{a}_{i}.png"),
            caption="../report/confusion.rst",
            category="Evaluation",
            subcategory=f"{level.capitalize()}-level confusion ({dataset})",
            labels={"architecture": a, "init": i},
        )
        for a, i in networks(dataset)
    ]


def crops_table_settings(spec):
    """What decides a crops dataset's table: its files and columns; one file per channel in `channels`' order."""
    settings = {
        k: spec[k]
        for k in (
            "images",
            "metadata",
            "separator",
            "filename",
            "columns",
            "batch_pattern",
        )
        if k in spec
    }
    if isinstance(spec["filename"], dict):
        settings["filename"] = {c: spec["filename"][c] for c in spec["channels"]}
    return settings


def profiling_inputs(dataset):
    """What profiling reads, by role; the step takes them as mappings, so they are params too."""
    controls = normalises_to_controls()
    features = imagenet_feature_architectures(dataset)
    return {
        "stores": {a: store_of(dataset, a) for a in trained_architectures(dataset)},
        "imagenet_weights": {a: layout.weights(a) for a in features},
        "controls": control_statistics_files(dataset),
        "control_stores": (
            {a: store_of(dataset, a, "dmso") for a in features} if controls else {}
        ),
    }
