# Cross-validated evaluation per dataset, and the figures of the Snakemake report.


# One evaluation rule per MoA dataset (the study's BBBC021 and every crops dataset): their figures differ
# in number (architectures x initialisations), which one rule's outputs could not.
for _dataset in MOA_DATASETS:

    rule:
        name:
            f"evaluate_{_dataset}"
        input:
            jobs=training_jobs(_dataset),
            folds=f"results/{_dataset}/folds.tsv",
            data_receipt=[verified(BBBC021_IMAGE_CSV)] if _dataset == "bbbc021" else [],
        output:
            summary=f"results/{_dataset}/evaluation/summary.json",
            accuracy=report(
                f"results/{_dataset}/evaluation/accuracy.csv",
                caption="../report/accuracy.rst",
                category="Evaluation",
                subcategory=f"Summary ({_dataset})",
            ),
            misclassified=report(
                f"results/{_dataset}/evaluation/misclassified_treatments.csv",
                caption="../report/misclassified.rst",
                category="Evaluation",
                subcategory=f"Summary ({_dataset})",
            ),
            recall=f"results/{_dataset}/evaluation/per_moa_recall.csv",
            treatment_confusion=[
                report(
                    f"results/{_dataset}/evaluation/confusion_treatment_{a}_{i}.png",
                    caption="../report/confusion.rst",
                    category="Evaluation",
                    subcategory=f"Treatment-level confusion ({_dataset})",
                    labels={"architecture": a, "init": i},
                )
                for a in trained_architectures(_dataset)
                for i in INITS
            ],
            image_confusion=[
                report(
                    f"results/{_dataset}/evaluation/confusion_image_{a}_{i}.png",
                    caption="../report/confusion.rst",
                    category="Evaluation",
                    subcategory=f"Image-level confusion ({_dataset})",
                    labels={"architecture": a, "init": i},
                )
                for a in trained_architectures(_dataset)
                for i in INITS
            ],
            curves=report(
                f"results/{_dataset}/evaluation/learning_curves.png",
                caption="../report/learning_curves.rst",
                category="Training",
                labels={"dataset": _dataset},
            ),
            conformal=report(
                f"results/{_dataset}/evaluation/conformal.csv",
                caption="../report/conformal.rst",
                category="Uncertainty",
                labels={"dataset": _dataset},
            ),
            **_study_outputs(_dataset),
        params:
            dataset=_dataset,
            architectures=trained_architectures(_dataset),
            inits=list(INITS),
            seeds=TRAIN["seeds"],
            significance=config["evaluation"]["significance_levels"],
            # only what the deviations table reads: other settings must not retrigger evaluation
            settings=json.dumps(deviation_settings(), default=str, sort_keys=True)
            if _dataset == "bbbc021"
            else "",
            extra=(
                "--settings results/bbbc021/evaluation/settings.json --data-receipt "
                + shlex.quote(verified(BBBC021_IMAGE_CSV))
                + (
                    f" --published {PUBLISHED_PREDICTIONS}"
                    if config["evaluation"]["published_predictions"]
                    else ""
                )
                if _dataset == "bbbc021"
                else ""
            ),
        log:
            f"results/logs/evaluation/{_dataset}.log",
        resources:
            mem_mb=4000,
            runtime=30,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "if [ -n {params.settings:q} ]; then printf '%s' {params.settings:q}"
            " > results/{params.dataset}/evaluation/settings.json; fi 2> {log:q};"
            " moaflow evaluate {params.dataset:q} --models-dir results/{params.dataset}/models"
            " --folds {input.folds:q} --architectures {params.architectures:q} --inits {params.inits:q}"
            " --seeds {params.seeds:q} --significance {params.significance:q} {params.extra}"
            " --out-dir results/{params.dataset}/evaluation 2>> {log:q}"


rule evaluate_bbbc014:
    input:
        jobs=training_jobs("bbbc014"),
        folds="results/bbbc014/folds.tsv",
    output:
        summary="results/bbbc014/evaluation/summary.json",
        wells=report(
            "results/bbbc014/evaluation/well_accuracy.csv",
            caption="../report/bbbc014.rst",
            category="Evaluation",
            subcategory="BBBC014",
        ),
    params:
        architectures=trained_architectures("bbbc014"),
        inits=list(INITS),
        seeds=TRAIN["seeds"],
    log:
        "results/logs/evaluation/bbbc014.log",
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow evaluate bbbc014 --models-dir results/bbbc014/models --folds {input.folds:q}"
        " --architectures {params.architectures:q} --inits {params.inits:q} --seeds {params.seeds:q}"
        " --out-dir results/bbbc014/evaluation 2> {log:q}"
