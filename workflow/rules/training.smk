# One training job per (dataset, architecture, initialisation, fold). Folds come
# from the folds file named in the config, read at parse time (common.smk) so
# that `snakemake -n` lists every job; check_folds verifies it against the crop index.


wildcard_constraints:
    dataset="bbbc021|bbbc014",
    architecture="|".join(TRAIN["architectures"]),
    init="|".join(INITS),
    fold=r"[a-z0-9-]+",
    seed=r"[0-9]+",


rule check_folds:
    input:
        folds=lambda wc: TRAIN[wc.dataset]["folds_file"],
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


rule train:
    input:
        store=lambda wc: f"results/{wc.dataset}/crops/{input_size(wc)}.npy",
        index="results/{dataset}/crops/index.parquet",
        folds="results/{dataset}/folds.tsv",
    output:
        model="results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}/model.keras",
        history="results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}/history.tsv",
        test="results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}/test_predictions.parquet",
        validation="results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}/validation_predictions.parquet",
        run="results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}/run.json",
    params:
        weights=lambda wc: INITS[wc.init],
        preset=lambda wc: TRAIN[wc.dataset]["preset"],
        hyper=lambda wc: json.dumps(TRAIN[wc.dataset]["hyperparameters"]),
        # per-epoch checkpoints live outside the declared outputs, so a failed
        # job's cleanup keeps them and a rerun resumes
        checkpoints="results/{dataset}/checkpoints/{architecture}/{init}/seed-{seed}/{fold}",
    log:
        "results/logs/training/{dataset}/{architecture}/{init}/seed-{seed}/{fold}.log",
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
        " --folds {input.folds:q} --fold {wildcards.fold:q} --architecture {wildcards.architecture:q}"
        " --dataset {wildcards.dataset:q} --init {wildcards.init:q} --weights {params.weights:q}"
        " --preset {params.preset:q} --hyperparameters {params.hyper:q} --seed {wildcards.seed:q}"
        " --out-dir \"$(dirname {output.model:q})\" --checkpoint-dir {params.checkpoints:q} 2> {log:q}"


rule track_mlflow:
    input:
        runs=[f"{run}/run.json" for ds in DATASETS for run in training_runs(ds)],
        summaries=[f"results/{ds}/evaluation/summary.json" for ds in DATASETS],
        figures=(
            ["results/bbbc021/evaluation/learning_curves.png"]
            + [
                f"results/bbbc021/evaluation/confusion_treatment_{a}_{i}.png"
                for a in trained_architectures("bbbc021")
                for i in INITS
            ]
            if "bbbc021" in DATASETS
            else []
        ),
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
        " --output {output:q} 2> {log:q}"
