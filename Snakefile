# moaflow: Kensert, Harrison & Spjuth (2019) end to end. Stages live in workflow/rules/.
configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/image_table.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/crops.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/profiling.smk"
include: "workflow/rules/resources.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# Where jobs run: fetching needs the internet, which cluster compute nodes often lack.
logger.info(
    f"Run on the submit host (localrules): {', '.join(sorted(workflow._localrules))}"
)
