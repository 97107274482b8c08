# After training: treatment profiles and NSC/NSCB scores beside the literature, and occlusion maps of
# held-out crops (results/<dataset>/profiling/ and results/<dataset>/interpretation/).

PROFILING = config["profiling"]

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
            " --normalisation {params.normalisation:q} --out-dir {params.out_dir:q} 2> {log:q}"

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
