rule prepare_data:
    """Verify (or, with download: true, fetch) a dataset and write its splits and manifest."""
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        spec=lambda w: json.dumps(config["datasets"][w.dataset]),
        download="--download" if config.get("download") else "",
    conda:
        "../../envs/advrepro.conda.yaml"
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    shell:
        "{PY} -m methods prepare --dataset {wildcards.dataset} --spec {params.spec:q} "
        "--data-dir {DATA:q} --out-dir {RESULTS}/data/{wildcards.dataset} {params.download} "
        "> {log} 2>&1"
