# Cross-validated evaluation per dataset, and the figures of the Snakemake report.


rule evaluate_bbbc021:
    input:
        runs=[f"{run}/run.json" for run in training_runs("bbbc021")],
        folds="results/bbbc021/folds.tsv",
    output:
        summary="results/bbbc021/evaluation/summary.json",
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
        architectures=" ".join(trained_architectures("bbbc021")),
        inits=" ".join(INITS),
        seeds=" ".join(map(str, TRAIN["seeds"])),
        significance=" ".join(map(str, config["evaluation"]["significance_levels"])),
        # only what the deviations table reads: other settings must not retrigger evaluation
        config_json=lambda wc: json.dumps(deviation_settings(), default=str),
    log:
        "results/logs/evaluation/bbbc021.log",
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "printf '%s' {params.config_json:q} > results/bbbc021/evaluation/.config.json 2> {log};"
        " moaflow evaluate bbbc021 --models-dir results/bbbc021/models --folds {input.folds}"
        " --architectures {params.architectures} --inits {params.inits} --seeds {params.seeds}"
        " --significance {params.significance} --config-json results/bbbc021/evaluation/.config.json"
        " --out-dir results/bbbc021/evaluation 2>> {log}"


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
        architectures=" ".join(trained_architectures("bbbc014")),
        inits=" ".join(INITS),
        seeds=" ".join(map(str, TRAIN["seeds"])),
    log:
        "results/logs/evaluation/bbbc014.log",
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow evaluate bbbc014 --models-dir results/bbbc014/models --folds {input.folds}"
        " --architectures {params.architectures} --inits {params.inits} --seeds {params.seeds}"
        " --out-dir results/bbbc014/evaluation 2> {log}"
