# After training: treatment profiles and NSC/NSCB scores beside the literature, and occlusion maps of
# held-out crops (layout.profiling, layout.interpretation).


rule embed_controls:
    """Each fold's trained model embeds the DMSO crops (profiling normalises its held-out crops to them)."""
    input:
        lambda wc: training_jobs(wc.dataset, wc.architecture, wc.init, int(wc.seed)),
        folds=layout.folds("{dataset}"),
        index=layout.store_index("{dataset}", "dmso"),
        store=lambda wc: store_of(wc.dataset, wc.architecture, "dmso"),
    output:
        output=layout.control_statistics(
            "{dataset}", "{architecture}", "{init}", "{seed}"
        ),
    log:
        layout.log("profiling", "controls/{dataset}/{architecture}/{init}/seed-{seed}"),
    benchmark:
        layout.benchmark(
            "embed_controls", "controls/{dataset}/{architecture}/{init}/seed-{seed}"
        )
    conda:
        "../../envs/moaflow.yaml"
    threads: TRAIN["resources"]["threads"]
    resources:
        gpu=TRAIN["resources"]["gpu"],
        mem_mb=TRAIN["resources"]["mem_mb"],
        runtime=120,
    params:
        step="embed-controls",
        models_dir=layout.seed_dir("{dataset}", "{architecture}", "{init}", "{seed}"),
        gpus=lambda wc, resources: resources.gpu,
        allow_cpu=TRAIN["allow_cpu"],
    script:
        STEP


for _dataset in MOA_DATASETS if PROFILING["enabled"] else []:
    _inputs = profiling_inputs(_dataset)

    rule:
        name:
            f"profile_{_dataset}"
        input:
            training_jobs(_dataset),
            list(_inputs["stores"].values()),
            [receipt(w) for w in _inputs["imagenet_weights"].values()],
            list(_inputs["controls"].values()),
            list(_inputs["control_stores"].values()),
            folds=layout.folds(_dataset),
            index=layout.store_index(_dataset),
            control_index=(
                layout.store_index(_dataset, "dmso")
                if normalises_to_controls()
                else []
            ),
        output:
            report(
                layout.profiling(_dataset, "literature.csv"),
                caption="../report/profiling.rst",
                category="Interpretation",
                subcategory=f"Profiling ({_dataset})",
            ),
            report(
                layout.profiling(_dataset, "profile_map.png"),
                caption="../report/profile_map.rst",
                category="Interpretation",
                subcategory=f"Profiling ({_dataset})",
            ),
            layout.profiling(_dataset, "nsc_nscb.csv"),
            layout.profiling(_dataset, "matches.csv"),
            layout.profiling(_dataset, "summary.json"),
        log:
            layout.log("profiling", _dataset),
        benchmark:
            layout.benchmark(f"profile_{_dataset}", _dataset)
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            **_inputs,
            step="profile",
            dataset=_dataset,
            networks=networks(_dataset),
            out_dir=lambda wc, output: os.path.dirname(output[0]),
            seed=TRAIN["seeds"][0],
            statistic=PROFILING["statistic"],
            feature_normalisation=PROFILING["feature_normalisation"],
            sphering_regularisation=PROFILING["sphering_regularisation"],
            inputs={
                a: {
                    k: presets.resolved(TRAIN[_dataset], a)[k]
                    for k in ("channel_order", "input_scaling", "channel_adapter")
                }
                for a in _inputs["imagenet_weights"]
            },
        script:
            STEP

    for _architecture, _init in networks(_dataset):

        rule:
            name:
                f"interpret_{_dataset}_{_architecture}_{_init}"
            input:
                training_jobs(_dataset, _architecture, _init, TRAIN["seeds"][0]),
                store=store_of(_dataset, _architecture),
            output:
                output=report(
                    layout.interpretation(_dataset, _architecture, _init),
                    caption="../report/interpretation.rst",
                    category="Interpretation",
                    subcategory=f"Occlusion maps ({_dataset})",
                    labels={"architecture": _architecture, "init": _init},
                ),
            log:
                layout.log("interpretation", f"{_dataset}_{_architecture}_{_init}"),
            benchmark:
                layout.benchmark(
                    f"interpret_{_dataset}_{_architecture}_{_init}",
                    f"{_dataset}_{_architecture}_{_init}",
                )
            conda:
                "../../envs/moaflow.yaml"
            threads: 1
            resources:
                mem_mb=2000,
                runtime=10,
            params:
                step="interpret",
                models_dir=lambda wc, input: os.path.dirname(os.path.dirname(input[0])),
                architecture=_architecture,
                per_class=PROFILING["examples_per_moa"],
                channel_names=list(
                    CROPS[_dataset]["channels"]
                    if _dataset in CROPS
                    else BBBC021_STORED_ORDER
                ),
            script:
                STEP
