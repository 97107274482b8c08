# After training: treatment profiles and NSC/NSCB scores beside the literature, and occlusion maps of
# held-out crops (results/<dataset>/profiling/ and results/<dataset>/interpretation/).

PROFILING = config["profiling"]


rule embed_controls:
    """Each fold's trained model embeds the DMSO crops (profiling normalises its held-out crops to them)."""
    input:
        jobs=lambda wc: [
            j
            for j in training_jobs(wc.dataset)
            if f"/{wc.architecture}/{wc.init}/seed-{wc.seed}/" in j
        ],
        folds="results/{dataset}/folds.tsv",
        index="results/{dataset}/dmso/index.parquet",
        store=lambda wc: f"results/{wc.dataset}/dmso/{input_size(wc)}.npy",
    output:
        "results/{dataset}/profiling/controls/{architecture}/{init}/seed-{seed}.npz",
    params:
        models_dir="results/{dataset}/models/{architecture}/{init}/seed-{seed}",
        allow_cpu="--allow-cpu" if TRAIN["allow_cpu"] else "",
    log:
        "results/logs/profiling/controls/{dataset}/{architecture}/{init}/seed-{seed}.log",
    resources:
        gpu=TRAIN["resources"]["gpu"],
        mem_mb=TRAIN["resources"]["mem_mb"],
        runtime=120,
    threads: TRAIN["resources"]["threads"]
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "TF_NUM_INTRAOP_THREADS={threads} TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS={threads}"
        " moaflow --threads {threads} embed-controls --models-dir {params.models_dir:q} --folds {input.folds:q}"
        " --index {input.index:q} --store {input.store:q} --gpus {resources.gpu} {params.allow_cpu}"
        " --output {output:q} 2> {log:q}"


for _dataset in MOA_DATASETS if PROFILING["enabled"] else []:

    rule:
        name:
            f"profile_{_dataset}"
        input:
            jobs=training_jobs(_dataset),
            folds=f"results/{_dataset}/folds.tsv",
            index=f"results/{_dataset}/crops/index.parquet",
            stores=[store_of(_dataset, a) for a in trained_architectures(_dataset)],
            weights=imagenet_feature_weights(_dataset),
            controls=list(control_statistics_files(_dataset).values()),
            control_index=f"results/{_dataset}/dmso/index.parquet" if normalises_to_controls() else [],
            control_stores=list(control_stores(_dataset).values()),
        output:
            scores=report(
                f"results/{_dataset}/profiling/literature.csv",
                caption="../report/profiling.rst",
                category="Interpretation",
                subcategory=f"Profiling ({_dataset})",
            ),
            map=report(
                f"results/{_dataset}/profiling/profile_map.png",
                caption="../report/profile_map.rst",
                category="Interpretation",
                subcategory=f"Profiling ({_dataset})",
            ),
            nsc=f"results/{_dataset}/profiling/nsc_nscb.csv",
            matches=f"results/{_dataset}/profiling/matches.csv",
            summary=f"results/{_dataset}/profiling/summary.json",
        params:
            dataset=_dataset,
            stores=[f"{a}={store_of(_dataset, a)}" for a in trained_architectures(_dataset)],
            architectures=trained_architectures(_dataset),
            inits=list(INITS),
            seed=TRAIN["seeds"][0],
            weights=lambda wc, input: [f"{a}={data_of(r)}" for a, r in zip(imagenet_feature_architectures(), input.weights)],
            statistic=PROFILING["statistic"],
            normalisation=PROFILING["normalisation"],
            regularisation=PROFILING["sphering_regularisation"],
            controls=[f"{s}={path}" for s, path in control_statistics_files(_dataset).items()],
            control_index=lambda wc, input: input.control_index or "",
            control_stores=[f"{a}={path}" for a, path in control_stores(_dataset).items()],
            out_dir=lambda wc, output: os.path.dirname(output.summary),
        log:
            f"results/logs/profiling/{_dataset}.log",
        resources:
            mem_mb=8000,
            runtime=120,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow --threads {threads} profile {params.dataset:q} --models-root results/{params.dataset}/models"
            " --folds {input.folds:q} --index {input.index:q} --store {params.stores:q}"
            " --architectures {params.architectures:q} --inits {params.inits:q} --seed {params.seed:q}"
            " --imagenet-weights {params.weights:q} --statistic {params.statistic:q}"
            " --normalisation {params.normalisation:q} --sphering-regularisation {params.regularisation:q}"
            " --controls {params.controls:q} --control-index {params.control_index:q}"
            " --control-store {params.control_stores:q} --out-dir {params.out_dir:q} 2> {log:q}"

    for _architecture in trained_architectures(_dataset):
        for _init in INITS:

            rule:
                name:
                    f"interpret_{_dataset}_{_architecture}_{_init}"
                input:
                    jobs=[
                        j
                        for j in training_jobs(_dataset)
                        if f"/{_architecture}/{_init}/seed-{TRAIN['seeds'][0]}/" in j
                    ],
                    store=store_of(_dataset, _architecture),
                output:
                    report(
                        f"results/{_dataset}/interpretation/{_architecture}_{_init}.png",
                        caption="../report/interpretation.rst",
                        category="Interpretation",
                        subcategory=f"Occlusion maps ({_dataset})",
                        labels={"architecture": _architecture, "init": _init},
                    ),
                params:
                    models=lambda wc, input: os.path.dirname(os.path.dirname(input.jobs[0])),
                    architecture=_architecture,
                    per_class=PROFILING["examples_per_moa"],
                    channels=",".join(CROPS[_dataset]["channels"] if _dataset in CROPS else BBBC021_STORED_ORDER),
                log:
                    f"results/logs/interpretation/{_dataset}_{_architecture}_{_init}.log",
                resources:
                    mem_mb=2000,
                    runtime=10,
                threads: 1
                conda:
                    "../../envs/moaflow.yaml"
                shell:
                    "moaflow --threads {threads} interpret --models-dir {params.models:q} --store {input.store:q}"
                    " --architecture {params.architecture:q} --per-class {params.per_class:q}"
                    " --channels {params.channels:q} --output {output:q} 2> {log:q}"
