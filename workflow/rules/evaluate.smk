# Cross-validated evaluation per dataset, and the figures of the Snakemake report.


rule evaluate_bbbc021:
    input:
        runs=[f"{run}/run.json" for run in training_runs("bbbc021")],
        folds="results/bbbc021/folds.tsv",
    output:
        summary="results/bbbc021/evaluation/summary.json",
        settings="results/bbbc021/evaluation/settings.json",
        accuracy=report(
            "results/bbbc021/evaluation/accuracy.csv",
            caption="../report/accuracy.rst",
            category="Evaluation",
            subcategory="Summary",
        ),
        deviations=report(
            "results/bbbc021/evaluation/deviations.csv",
            caption="../report/deviations.rst",
            category="Evaluation",
            subcategory="Summary",
        ),
        misclassified=report(
            "results/bbbc021/evaluation/misclassified_treatments.csv",
            caption="../report/misclassified.rst",
            category="Evaluation",
            subcategory="Summary",
        ),
        recall="results/bbbc021/evaluation/per_moa_recall.csv",
        treatment_confusion=[
            report(
                f"results/bbbc021/evaluation/confusion_treatment_{a}_{i}.png",
                caption="../report/confusion.rst",
                category="Evaluation",
                subcategory="Treatment-level confusion",
                labels={"architecture": a, "init": i},
            )
            for a in trained_architectures("bbbc021")
            for i in INITS
        ],
        image_confusion=[
            report(
                f"results/bbbc021/evaluation/confusion_image_{a}_{i}.png",
                caption="../report/confusion.rst",
                category="Evaluation",
                subcategory="Image-level confusion",
                labels={"architecture": a, "init": i},
            )
            for a in trained_architectures("bbbc021")
            for i in INITS
        ],
        curves=report(
            "results/bbbc021/evaluation/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Training",
        ),
        conformal=report(
            "results/bbbc021/evaluation/conformal.csv",
            caption="../report/conformal.rst",
            category="Uncertainty",
        ),
    params:
        architectures=trained_architectures("bbbc021"),
        inits=list(INITS),
        seeds=TRAIN["seeds"],
        significance=config["evaluation"]["significance_levels"],
        # only what the deviations table reads: other settings must not retrigger evaluation
        settings=lambda wc: json.dumps(deviation_settings(), default=str),
    log:
        "results/logs/evaluation/bbbc021.log",
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "printf '%s' {params.settings:q} > {output.settings:q} 2> {log:q};"
        " moaflow evaluate bbbc021 --models-dir results/bbbc021/models --folds {input.folds:q}"
        " --architectures {params.architectures:q} --inits {params.inits:q} --seeds {params.seeds:q}"
        " --significance {params.significance:q} --settings {output.settings:q}"
        " --out-dir results/bbbc021/evaluation 2>> {log:q}"


rule evaluate_bbbc014:
    input:
        runs=[f"{run}/run.json" for run in training_runs("bbbc014")],
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
