# Training jobs per (dataset, architecture, initialisation, seed), each training
# `training.folds_per_job` folds in one process (one start-up, one compilation).
# Folds come from the folds file named in the config, read at parse time
# (common.smk) so that `snakemake -n` lists every job; check_folds verifies it
# against the crop index. ImageNet weights are fetched once, on the submit host.

localrules:
    fetch_weights,


wildcard_constraints:
    dataset="|".join(DATASETS),
    architecture="|".join(TRAIN["architectures"]),
    init="|".join(INITS),
    chunk=r"part-[0-9]+-of-[0-9]+",
    seed=r"[0-9]+",


rule check_folds:
    input:
        folds=lambda wc: folds_file(wc.dataset),
        index="results/{dataset}/crops/index.parquet",
    output:
        "results/{dataset}/folds.tsv",
    log:
        "results/logs/training/{dataset}_check_folds.log",
    resources:
        mem_mb=1000,
        runtime=5,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow check-folds --folds {input.folds:q} --index {input.index:q} --output {output:q} 2> {log:q}"


rule fetch_weights:
    output:
        verified("results/weights/{architecture}_notop.h5"),
    params:
        section="weights",
        filename=lambda wc: config["weights"]["files"][wc.architecture],
        data=lambda wc, output: data_of(output[0]),
        kind="weights",
    log:
        "results/logs/download/weights_{architecture}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/fetch.py"


rule train:
    input:
        store=lambda wc: f"results/{wc.dataset}/crops/{input_size(wc)}.npy",
        index="results/{dataset}/crops/index.parquet",
        folds="results/{dataset}/folds.tsv",
        weights=lambda wc: weights_input(wc.init, wc.architecture),
    output:
        # the job's summary; each fold's outputs go to .../seed-{seed}/<fold>/ (see moaflow.learn.train)
        "results/{dataset}/models/{architecture}/{init}/seed-{seed}/jobs/{chunk}.json",
    params:
        folds=lambda wc: fold_chunks(wc.dataset)[wc.chunk],
        weights=lambda wc, input: data_of(input.weights) if input.weights else INITS[wc.init],
        preset=lambda wc: architecture_settings(TRAIN[wc.dataset], wc.architecture)[0],
        hyper=lambda wc: json.dumps(
            architecture_settings(TRAIN[wc.dataset], wc.architecture)[1], sort_keys=True
        ),
        models_dir=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
        # per-fold checkpoints live outside the outputs, so a killed job's cleanup keeps them
        checkpoints="results/{dataset}/checkpoints/{architecture}/{init}/seed-{seed}",
        allow_cpu="--allow-cpu" if TRAIN["allow_cpu"] else "",
        load_into_memory=str(TRAIN["load_into_memory"]).lower(),
        checkpoint_minutes=TRAIN["checkpoint_minutes"],
        tracking_uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        occlusion_examples=lambda wc: (
            config["profiling"]["examples_per_moa"]
            if config["profiling"]["enabled"] and wc.dataset in MOA_DATASETS
            else 0
        ),
        occlusion_grid=config["profiling"]["occlusion_grid"],
    log:
        "results/logs/training/{dataset}/{architecture}/{init}/seed-{seed}/{chunk}.log",
    resources:
        gpu=TRAIN["resources"]["gpu"],
        mem_mb=TRAIN["resources"]["mem_mb"],
        runtime=TRAIN["resources"]["runtime"],
    threads: TRAIN["resources"]["threads"]
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "TF_NUM_INTRAOP_THREADS={threads} TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS={threads}"
        " moaflow --threads {threads} train --store {input.store:q} --index {input.index:q}"
        " --folds {input.folds:q} --fold {params.folds:q} --architecture {wildcards.architecture:q}"
        " --dataset {wildcards.dataset:q} --init {wildcards.init:q} --weights {params.weights:q}"
        " --preset {params.preset:q} --hyperparameters {params.hyper:q} --seed {wildcards.seed:q}"
        " --gpus {resources.gpu} {params.allow_cpu} --load-into-memory {params.load_into_memory:q}"
        " --checkpoint-minutes {params.checkpoint_minutes:q} --models-dir {params.models_dir:q}"
        " --checkpoints-dir {params.checkpoints:q} --receipt {output:q} --tracking-uri {params.tracking_uri:q}"
        " --experiment {params.experiment:q} --mlflow-parent results/mlflow/parent.json"
        " --occlusion-examples {params.occlusion_examples:q} --occlusion-grid {params.occlusion_grid:q} 2> {log:q}"


rule track_mlflow:
    input:
        jobs=[job for ds in DATASETS for job in training_jobs(ds)],
        summaries=[f"results/{ds}/evaluation/summary.json" for ds in DATASETS]
        + (
            [f"results/{ds}/profiling/summary.json" for ds in MOA_DATASETS]
            if config["profiling"]["enabled"]
            else []
        ),
        figures=[
            figure
            for ds in MOA_DATASETS
            for figure in [f"results/{ds}/evaluation/learning_curves.png"]
            + [
                f"results/{ds}/evaluation/confusion_treatment_{a}_{i}.png"
                for a in trained_architectures(ds)
                for i in INITS
            ]
        ],
    output:
        "results/mlflow/runs.json",
    params:
        run_dirs=[run for ds in DATASETS for run in training_runs(ds)],
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        no_models="" if config["tracking"]["log_models"] else "--no-models",
        config_hash=CONFIG_HASH,
    log:
        "results/logs/tracking/mlflow.log",
    resources:
        mem_mb=2000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        # MLFLOW_TRACKING_URI, when set, wins over the config (a tracking server)
        "moaflow track --run-dirs {params.run_dirs:q} --tracking-uri {params.uri:q}"
        " --experiment {params.experiment:q} --config-hash {params.config_hash:q} {params.no_models}"
        " --summaries {input.summaries:q} --artifacts {input.summaries:q} {input.figures:q}"
        " --parent-file results/mlflow/parent.json --output {output:q} 2> {log:q}"


# With a tracking server, the study's parent run exists before any training job logs a fold to it.
onstart:
    start_live_tracking()
