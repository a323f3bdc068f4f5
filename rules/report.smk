# Tables from run records, then the claims report from the tables.


rule tables:
    input:
        W.run_metrics,
    output:
        directory(f"{W.results}/tables/{{experiment}}"),
    log:
        f"{W.results}/reports/tables-{{experiment}}.log",
    params:
        py=W.python,
        common=W.common_args,
        run_ids=W.run_id_list,
        record=lambda w: f"{W.results}/reports/tables-{w.experiment}",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{params.py} -m gemvlab.stages.tables experiment={wildcards.experiment} {params.common} "
        "'report.run_ids=[{params.run_ids}]' hydra.run.dir={params.record} > {log} 2>&1"


rule claims:
    input:
        tables=expand(f"{W.results}/tables/{{experiment}}", experiment=W.experiments),
        claims=expand("experiments/{experiment}/claims.yaml", experiment=W.experiments),
    output:
        f"{W.results}/CLAIMS.md",
    log:
        f"{W.results}/reports/claims.log",
    params:
        py=W.python,
        common=W.common_args,
        experiments=",".join(W.experiments),
        record=f"{W.results}/reports/claims",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "{params.py} -m gemvlab.stages.claims {params.common} "
        "'report.experiments=[{params.experiments}]' hydra.run.dir={params.record} > {log} 2>&1"
