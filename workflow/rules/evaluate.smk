# Cross-validated evaluation per dataset, and the figures of the Snakemake report.


# One evaluation rule per MoA dataset (the study's BBBC021 and every crops dataset): their figures differ
# in number (architectures x initialisations), which one rule's outputs could not.
for _dataset in MOA_DATASETS:

    rule:
        name:
            f"evaluate_{_dataset}"
        input:
            training_jobs(_dataset),
            **study_inputs(_dataset),
            folds=layout.folds(_dataset),
        output:
            layout.evaluation(_dataset, "summary.json"),
            report(
                layout.evaluation(_dataset, "headline.csv"),
                caption="../report/headline.rst",
                category="Evaluation",
                subcategory=f"Summary ({_dataset})",
            ),
            report(
                layout.evaluation(_dataset, "accuracy.csv"),
                caption="../report/accuracy.rst",
                category="Evaluation",
                subcategory=f"Summary ({_dataset})",
            ),
            report(
                layout.evaluation(_dataset, "misclassified_treatments.csv"),
                caption="../report/misclassified.rst",
                category="Evaluation",
                subcategory=f"Summary ({_dataset})",
            ),
            layout.evaluation(_dataset, "per_moa_recall.csv"),
            report_figures(_dataset, "treatment"),
            report_figures(_dataset, "image"),
            report(
                layout.evaluation(_dataset, "learning_curves.png"),
                caption="../report/learning_curves.rst",
                category="Training",
                labels={"dataset": _dataset},
            ),
            report(
                layout.evaluation(_dataset, "conformal.csv"),
                caption="../report/conformal.rst",
                category="Uncertainty",
                labels={"dataset": _dataset},
            ),
            *study_outputs(_dataset).values(),
        log:
            layout.log("evaluation", _dataset),
        benchmark:
            layout.benchmark(f"evaluate_{_dataset}", _dataset)
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            **study_params(_dataset),
            step="evaluate",
            dataset=_dataset,
            networks=networks(_dataset),
            out_dir=lambda wc, output: os.path.dirname(output[0]),
            seeds=TRAIN["seeds"],
            significance_levels=config["evaluation"]["significance_levels"],
        script:
            STEP


if "bbbc014" in DATASETS:

    rule evaluate_bbbc014:
        input:
            training_jobs("bbbc014"),
            folds=layout.folds("bbbc014"),
        output:
            layout.evaluation("bbbc014", "summary.json"),
            report(
                layout.evaluation("bbbc014", "well_accuracy.csv"),
                caption="../report/bbbc014.rst",
                category="Evaluation",
                subcategory="BBBC014",
            ),
        log:
            layout.log("evaluation", "bbbc014"),
        benchmark:
            layout.benchmark("evaluate_bbbc014", "bbbc014")
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        params:
            step="evaluate",
            dataset="bbbc014",
            networks=networks("bbbc014"),
            out_dir=lambda wc, output: os.path.dirname(output[0]),
            seeds=TRAIN["seeds"],
            significance_levels=config["evaluation"]["significance_levels"],
        script:
            STEP
