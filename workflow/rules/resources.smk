# What the run cost: every rule writes a benchmark record per job (layout.benchmark: wall time, peak
# memory, I/O); one table per results folder gathers them, for sizing a profile's mem_mb and runtime.


rule resources_table:
    input:
        study_targets(),
    output:
        output=report(
            layout.resources(),
            caption="../report/resources.rst",
            category="Resources",
        ),
        disk=report(
            layout.disk_usage(),
            caption="../report/disk.rst",
            category="Resources",
        ),
    log:
        layout.log("resources", "resources"),
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    params:
        step="resources",
        folder=layout.benchmark_folder(),
    script:
        STEP
