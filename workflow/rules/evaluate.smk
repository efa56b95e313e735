rule evaluate:
    """Clean, FGSM, PGD-k-r and AutoAttack (on a recorded stratified subset) for one checkpoint."""
    input:
        train=f"{CELL}/train.json",
        weights=f"{CELL}/checkpoints/{{checkpoint}}.pt",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    output:
        f"{CELL}/eval_{{checkpoint}}.json",
    threads: config["threads"]
    resources:
        gpu=1,
    log:
        f"{CELL}/logs/evaluate_{{checkpoint}}.log",
    shell:
        "{PY} -m methods evaluate --train-result {input.train:q} --checkpoint {wildcards.checkpoint} "
        "--data-dir {DATA:q} --prepared-dir {RESULTS}/data/{wildcards.dataset} "
        "--result {output:q} > {log} 2>&1"
