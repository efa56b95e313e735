"""Sharded AutoAttack evaluation (``evaluation.autoattack.shards: K``): the AutoAttack subset and
the PGD run on it split over K jobs each, merged into the evaluation's ``autoattack`` block,
which equals the unsharded block example for example (flags, accuracies, per-attack accuracies).

Why the shards follow AutoAttack's batches, not fixed index ranges.  AutoAttack's result for an
example depends on the batch it is attacked in: every sub-attack reseeds torch at each batch and
draws its random start for the whole batch (an example's start is set by its position in the
batch), and Square draws its window and stops per batch.  The package forms the batches of each
sub-attack afresh from the examples still robust over the *whole* subset (the robust set cut into
``batch_size`` pieces), so after the clean pass no fixed index range of examples sees the
batches it sees in the unsharded run.  So a sharded run is a chain of *stages*, one per
sub-attack in the version's order (``custom``: the listed attacks; ``standard``: APGD-CE,
APGD-T, FAB-T, Square), each of K jobs: stage s forms the robust set after stage s - 1 (the
clean pass for s = 1, recomputed by every stage-1 job: a forward pass), cuts it into the
unsharded run's batches and gives shard i a contiguous run of whole batches (batches
``[i b / K, (i + 1) b / K)`` of b); each batch goes to the package exactly as in the unsharded
run (:func:`methods.autoattack_adapter.run_autoattack` with ``start`` and ``only``), so for a
deterministic model the broken examples, their adversarial images and so the flags are the
unsharded run's, bit for bit.  The price is a barrier between sub-attacks (stage s + 1 starts
when all K jobs of stage s are done) and K x (number of sub-attacks) jobs.  An example's merged
flag is its own worst case: robust only if no stage broke it.  The robust set that feeds the
next stage is the model's own verdict on the adversarial images (the adapter recomputes it; the
package's equals it for a deterministic model, and the adapter warns where they differ).

PGD on the same subset (``compare_pgd``) is split by batches of the evaluation's
``batch_size`` (``min(K, batches)`` parts, contiguous whole batches).  Its random starts (and
random targets) come from one generator shared by the batches in order; a part first advances
a generator seeded as the unsharded run's over the earlier batches, drawing exactly what the
attack draws there (the attack run with no steps against a model that returns zeros: FGSM and
PGD draw nothing that depends on the model), then runs its own batches: the unsharded flags.

Files (Snakemake: rule ``evaluate_autoattack_shard`` in ``workflow/rules/evaluate.smk``): per
cell and checkpoint ``aa_<checkpoint>/stage<s>-shard<i>of<K>.json`` and
``aa_<checkpoint>/pgd-shard<j>of<P>.json``; each stage file carries what the stages before it
left (robust set, per-attack accuracies, warnings, job summaries), so the evaluation merges the
last stage's K files and the P PGD files.  Each job keeps its progress in ``<file>.partial/``
beside its file (not a Snakemake output; :mod:`methods.eval_resume`): AutoAttack's state after
every sub-attack batch (the adapter's ``state_path``, never the package's restore path, which
leaves ``y_adv`` unassigned once flags are set), PGD's after every batch; a killed shard resumes
at its first unfinished batch and ends with the uninterrupted flags.

Identity.  A shard job's parameter is the part of the evaluation identity AutoAttack depends on
(:func:`autoattack_identity`: the ``autoattack`` block, ``threat``, ``seed``, ``batch_size``,
``channels_last``; without ``compare_pgd`` for the stages), so adding an attack to
``evaluation.attacks`` re-runs the evaluation's merge, not the shards.  Every shard file records
its identity hash, the training identity and the checkpoint's SHA-256, and the merge refuses a
file of another run.

The planning functions (counts, file names, checks) import no torch: the Snakefile uses them.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import ConfigError, config_hash

#: The sub-attacks of each AutoAttack version in run order (pyautoattack 0.2.0's
#: ``_set_version`` for Linf and L2; ``custom`` runs its ``attacks``), here without torch for the
#: DAG; ``tests/test_eval_shards.py`` checks them against the package.
VERSION_ATTACKS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
                   "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
                   "rand": ["apgd-ce", "apgd-dlr"]}
#: :func:`methods.evaluation.evaluate_cell`'s defaults.
DEFAULT_BATCH_SIZE, DEFAULT_AA_N = 500, 1000
PGD_PART = "pgd"
KIND = "autoattack_shard"
PGD_UNIT = "PGD on the AutoAttack subset (part)"
_STAGE = re.compile(r"stage([1-9][0-9]*)")


# ----------------------------------------------------------------------------- planning (no torch)

def _aa(evaluation: Dict[str, Any]) -> Dict[str, Any]:
    aa = evaluation.get("autoattack") or {}
    return aa if aa.get("enabled", True) else {}


def shard_count(evaluation: Dict[str, Any]) -> int:
    """K: ``evaluation.autoattack.shards`` (1, one job, when absent or AutoAttack is off)."""
    return int(_aa(evaluation).get("shards", 1) or 1)


def stage_attacks(evaluation: Dict[str, Any]) -> List[str]:
    """The version's sub-attacks in run order: one stage each."""
    aa = _aa(evaluation)
    version = aa.get("version", "standard")
    return list(aa["attacks"]) if version == "custom" else list(VERSION_ATTACKS[version])


def _sizes(evaluation: Dict[str, Any]) -> Tuple[int, int, int]:
    """(AutoAttack's n, its batch size, the evaluation's batch size), as evaluate_cell reads them."""
    aa = _aa(evaluation)
    bs = int(evaluation.get("batch_size", DEFAULT_BATCH_SIZE))
    return int(aa.get("n", DEFAULT_AA_N)), int(aa.get("batch_size", bs)), bs


def check_shards(evaluation: Dict[str, Any], note: str = "") -> None:
    """Refuse a ``shards`` that is not an integer >= 1, or more shards than AutoAttack's subset
    has batches (a shard runs whole batches of the unsharded run)."""
    aa = _aa(evaluation)
    if "shards" not in aa:
        return
    k, field = aa["shards"], "evaluation.autoattack.shards"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{field}: got {k!r}; allowed: an integer >= 1 (1: one job){note}")
    n, aa_bs, _ = _sizes(evaluation)
    most = math.ceil(n / aa_bs)
    if k > most:
        raise ConfigError(
            f"{field}: got {k}; allowed: an integer from 1 to {most}: AutoAttack's n = {n} "
            f"examples make {most} batch{'es' if most > 1 else ''} of batch_size {aa_bs}, and a "
            f"shard runs whole batches of the unsharded run (so the merged result equals it)"
            f"{'; there are more shards than examples' if k > n else ''}; lower "
            f"evaluation.autoattack.batch_size to split further{note}")


def pgd_parts(evaluation: Dict[str, Any]) -> int:
    """P: how many jobs run PGD on the AutoAttack subset (0 without ``compare_pgd`` or shards)."""
    k = shard_count(evaluation)
    if k < 2 or not _aa(evaluation).get("compare_pgd"):
        return 0
    n, _, bs = _sizes(evaluation)
    return min(k, math.ceil(n / bs))


def autoattack_identity(evaluation: Dict[str, Any], part: str = PGD_PART) -> Dict[str, Any]:
    """What a shard job computes from besides the trained cell: the evaluation identity's
    AutoAttack part (the stages do not depend on ``compare_pgd``), hashed as ``aa_hash``."""
    spec = {k: evaluation[k] for k in ("autoattack", "threat", "seed", "batch_size",
                                       "channels_last") if k in evaluation}
    if part != PGD_PART and "compare_pgd" in (spec.get("autoattack") or {}):
        spec["autoattack"] = {k: v for k, v in spec["autoattack"].items() if k != "compare_pgd"}
    return {**spec, "aa_hash": config_hash(spec)}


def stage_number(part: str) -> int:
    m = _STAGE.fullmatch(part)
    if not m:
        raise ValueError(f"part {part!r}: expected 'stage<N>' or {PGD_PART!r}")
    return int(m.group(1))


def shard_file(cell_dir: str, checkpoint: str, part: str, shard: int, shards: int) -> str:
    return f"{cell_dir}/aa_{checkpoint}/{part}-shard{shard}of{shards}.json"


def previous_stage_files(cell_dir: str, checkpoint: str, evaluation: Dict[str, Any],
                         part: str) -> List[str]:
    """The inputs of one shard job: the K files of the stage before (none for stage 1 and PGD)."""
    if part == PGD_PART:
        return []
    s, k = stage_number(part), shard_count(evaluation)
    if s > len(stage_attacks(evaluation)):
        raise ValueError(f"{part}: AutoAttack has {len(stage_attacks(evaluation))} stages "
                         f"({stage_attacks(evaluation)})")
    return [shard_file(cell_dir, checkpoint, f"stage{s - 1}", i, k) for i in range(k)] if s > 1 else []


def final_shard_files(cell_dir: str, checkpoint: str, evaluation: Dict[str, Any]) -> List[str]:
    """The evaluation's extra inputs: the last stage's K files and the P PGD files ([] when
    unsharded, so the DAG is the one-job DAG)."""
    k = shard_count(evaluation)
    if k < 2:
        return []
    last = f"stage{len(stage_attacks(evaluation))}"
    p = pgd_parts(evaluation)
    return ([shard_file(cell_dir, checkpoint, last, i, k) for i in range(k)]
            + [shard_file(cell_dir, checkpoint, PGD_PART, j, p) for j in range(p)])


def split_batches(n_batches: int, shards: int, shard: int) -> Tuple[int, int]:
    """Shard ``shard``'s contiguous run of whole batches ``[first, end)`` of ``n_batches``."""
    return shard * n_batches // shards, (shard + 1) * n_batches // shards


def _dedupe(messages) -> List[str]:
    return list(dict.fromkeys(str(m) for m in messages))


# ----------------------------------------------------------------------------- one shard job

def run_shard(train_result_path: Path, evaluation: Dict[str, Any], checkpoint: str,
              data_dir: Path, prepared_dir: Path, part: str, shard: int, shards: int,
              previous: Sequence[Path], result_path: Path, *, device: Optional[str] = None,
              threads: Optional[int] = None) -> Dict[str, Any]:
    """Run one shard job and write its file: ``part`` ``stage<s>`` (AutoAttack's s-th sub-attack
    on shard ``shard``'s batches of the robust set the ``previous`` stage's files leave) or
    ``pgd`` (the compare PGD on part ``shard``'s batches).  ``evaluation``: the evaluation
    identity or its :func:`autoattack_identity`.  Resumes from ``<result>.partial/``."""
    from .eval_resume import PartialEvaluation, resume_key
    from .results import atomic_write_text, jsonable

    started, cpu_started = time.time(), time.process_time()
    check_shards(evaluation)
    k = shard_count(evaluation)
    if k < 2:
        raise ValueError("evaluation.autoattack.shards is 1 (or AutoAttack is off): nothing to shard")
    expected = pgd_parts(evaluation) if part == PGD_PART else k
    if part != PGD_PART:
        s = stage_number(part)
        if s > len(stage_attacks(evaluation)):
            raise ValueError(f"{part}: AutoAttack has {len(stage_attacks(evaluation))} stages")
    if shards != expected or not 0 <= shard < shards:
        raise ValueError(f"{part} shard {shard} of {shards}: this evaluation has {expected} "
                         f"{'PGD parts' if part == PGD_PART else 'shards'}")
    identity = autoattack_identity(evaluation, part)
    run = _setup(train_result_path, evaluation, checkpoint, data_dir, prepared_dir, device, threads)
    key = {**resume_key(identity["aa_hash"], run["cell"]["train_hash"], checkpoint,
                        run["checkpoint_file"]),
           "part": part, "shard": shard, "shards": shards}
    partial = PartialEvaluation(Path(result_path), key, [PGD_UNIT])
    job = f"[AutoAttack {part} shard {shard + 1}/{shards} {run['cell']['recipe']} {checkpoint}]"
    print(f"{job} start", file=sys.stderr, flush=True)
    if part == PGD_PART:
        body = _pgd_part(run, partial, shard, shards)
    else:
        body = _stage(run, partial, evaluation, s, shard, shards, [Path(p) for p in previous],
                      identity, job)
    record = {"kind": KIND, "part": part, "shard": shard, "shards": shards,
              "aa_hash": identity["aa_hash"], "identity": identity,
              "train_hash": run["cell"]["train_hash"], "checkpoint": checkpoint,
              "checkpoint_sha256": key["checkpoint_sha256"], "n": run["n"],
              "indices_hash": config_hash(run["indices"]), **body,
              "seconds": {"wall": time.time() - started, "cpu": time.process_time() - cpu_started}}
    atomic_write_text(Path(result_path), json.dumps(jsonable(record), indent=1) + "\n")
    partial.remove()
    print(f"{job} done in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    return record


def _setup(train_result_path, evaluation, checkpoint, data_dir, prepared_dir, device,
           threads) -> Dict[str, Any]:
    """The model, the AutoAttack subset and the settings, as :func:`methods.evaluation.evaluate_cell`
    builds them."""
    import torch

    from .attack_specs import normalize_attack_spec
    from .builders import build_cell_model, build_threat, load_weights, to_float
    from .data import load_dataset
    from .eval_core import threat_dict
    from .results import read_result
    from .runtime import pick_device, seed_everything, set_threads
    from .subsets import stratified_subset

    record = read_result(Path(train_result_path), "train_result.schema.json")
    cell = record["cell"]
    set_threads(threads)
    device = pick_device(device)
    seed = int(evaluation.get("seed", 0))
    seed_everything(seed)
    spec = {k: v for k, v in cell["dataset"].items() if k != "name"}
    bundle = load_dataset(cell["dataset"]["name"], spec, Path(data_dir), Path(prepared_dir))
    model = build_cell_model(cell, bundle).to(device)
    ckpt_file = Path(record["checkpoints"][checkpoint]["file"])
    load_weights(ckpt_file, model)
    model.eval()
    if evaluation.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    threat = build_threat(threat_dict(build_threat(evaluation.get("threat", cell["threat"]))))
    aa = _aa(evaluation)
    n, aa_bs, bs = _sizes(evaluation)
    aa_seed = int(aa.get("seed", seed))
    idx = stratified_subset(bundle.test.y, n, aa_seed)
    x, y = to_float(bundle.test.x[idx], device), bundle.test.y[idx].to(device)
    compare = aa.get("compare_pgd")
    return {"cell": cell, "model": model, "device": device, "threat": threat, "seed": seed,
            "aa": aa, "aa_seed": aa_seed, "aa_bs": aa_bs, "bs": bs, "x": x, "y": y,
            "n": len(idx), "indices": idx.tolist(), "classes": int(bundle.num_classes),
            "checkpoint_file": ckpt_file,
            "compare_pgd": normalize_attack_spec(compare, "evaluation.autoattack.compare_pgd")
            if compare else None}


def _autoattack(run, x, y, **kwargs):
    from .autoattack_adapter import run_autoattack

    aa = run["aa"]
    return run_autoattack(run["model"], x, y, norm=run["threat"].norm.value, eps=run["threat"].eps,
                          version=aa.get("version", "standard"), seed=run["aa_seed"],
                          batch_size=run["aa_bs"], attacks=aa.get("attacks"),
                          device=run["device"], **kwargs)


#: The adapter result's fields that describe the run (its ``to_dict`` order), kept for the merge.
RUN_FIELDS = ("package", "package_version", "version", "norm", "eps", "seed", "attacks",
              "batch_size", "iterations", "eot_iter")


def _stage(run, partial, evaluation, s: int, shard: int, shards: int, previous: List[Path],
           identity: Dict[str, Any], job: str) -> Dict[str, Any]:
    import torch

    from .eval_core import check_adversarial

    attack = stage_attacks(evaluation)[s - 1]
    n = run["n"]
    if s == 1:   # the package's checks and clean pass, on the whole subset
        clean = _autoattack(run, run["x"], run["y"], only=[])
        robust = clean.robust.cpu()
        before = {"robust": robust, "per_attack": {"clean": int(robust.sum()) / n},
                  "warnings": list(clean.warnings), "jobs": [],
                  "run": {f: clean.to_dict()[f] for f in RUN_FIELDS}}
    else:
        records = read_shards(previous, f"stage{s - 1}", shards, identity["aa_hash"],
                              run["cell"]["train_hash"], partial.key["checkpoint_sha256"],
                              run["indices"])
        before = after_stage(records)
    pool = before["robust"].nonzero().flatten()
    aa_bs = run["aa_bs"]
    first, end = split_batches(math.ceil(len(pool) / aa_bs), shards, shard)
    ids = pool[first * aa_bs:end * aa_bs]
    broken, warnings, worst, resumed = [], [], 0.0, False
    if len(ids):
        resumed = partial.autoattack_state.exists()
        dev = run["x"].device
        x, y = run["x"][ids.to(dev)], run["y"][ids.to(dev)]

        def done(name, robust_count, status):
            print(f"{job} {name}: {status}, robust {robust_count}/{len(ids)}", file=sys.stderr,
                  flush=True)
        result = _autoattack(run, x, y, state_path=partial.autoattack_state,
                             start=torch.ones(len(ids), dtype=torch.bool), only=[attack],
                             on_attack_done=done)
        run["model"].eval()
        worst = check_adversarial(x, result.x_adv.to(dev), run["threat"], f"AutoAttack {attack}")
        broken = ids[~result.robust.cpu()].tolist()
        warnings = list(result.warnings)
    return {"stage": s, "stages": len(stage_attacks(evaluation)), "attack": attack,
            "robust_before": before["robust"].nonzero().flatten().tolist(),
            "per_attack_before": before["per_attack"], "warnings_before": before["warnings"],
            "jobs_before": before["jobs"], "run": before["run"],
            "pool": len(pool), "batches": [first, end], "attacked": len(ids), "broken": broken,
            "warnings": warnings, "max_distance": worst, "resumed": resumed}


def _pgd_part(run, partial, part: int, parts: int) -> Dict[str, Any]:
    from .attack_specs import attack_label
    from .eval_core import run_attack
    from .runtime import cpu_generator

    spec, bs, n = run["compare_pgd"], run["bs"], run["n"]
    first, end = split_batches(math.ceil(n / bs), parts, part)
    first, end = min(first * bs, n), min(end * bs, n)
    flags, worst, resumed = [], 0.0, False
    if first < end:
        generator = cpu_generator(run["seed"])
        advance_generator(generator, spec, run["threat"], run["x"], run["y"], bs, first,
                          run["classes"])
        store = _FromBatch(partial.unit(PGD_UNIT), first, end, bs, run["seed"],
                           generator.get_state())
        ok, worst = run_attack(run["model"], spec, run["threat"], run["x"][:end], run["y"][:end],
                               bs, run["seed"], PGD_UNIT, resume=store)
        flags = ok[first:end].cpu().tolist()
        resumed = store.resumed
    return {"label": attack_label(spec), "range": [first, end], "flags": flags,
            "max_distance": worst, "resumed": resumed}


class _NoModel:
    """Zeros for logits: the attacks' draws do not depend on them (see the module docstring)."""

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def __call__(self, x):
        import torch
        return torch.zeros(len(x), self.classes, device=x.device)


def advance_generator(generator, spec: Dict[str, Any], threat, x, y, batch_size: int, upto: int,
                      classes: int) -> None:
    """Advance ``generator`` as :func:`methods.eval_core.run_attack` does over the batches
    before example ``upto`` (a multiple of ``batch_size``): the attack's own draws, made by the
    attack itself run with no steps against a zero model."""
    from . import attacks  # noqa: F401  (fills ATTACKS)
    from .registry import ATTACKS

    if upto % batch_size:
        raise ValueError(f"advance_generator: {upto} is not a multiple of {batch_size}")
    implementation = ATTACKS.get(spec["name"])
    draws_only = {**spec, "steps": 0}
    model = _NoModel(classes)
    for i in range(0, upto, batch_size):
        implementation(model, x[i:i + batch_size], y[i:i + batch_size], draws_only, threat,
                       generator)


class _FromBatch:
    """A :class:`methods.eval_resume.UnitProgress` for :func:`methods.eval_core.run_attack` over
    ``x[:end]`` that starts at example ``first`` with the advanced generator (or where an earlier
    session of this part stopped)."""

    def __init__(self, unit, first: int, end: int, batch_size: int, seed: int, state) -> None:
        self.unit, self.first, self.resumed = unit, first, False
        self.start = {"next": first, "batch_size": batch_size, "n": end, "seed": seed,
                      "worst": 0.0, "generator": state}

    def load(self):
        import torch

        saved = self.unit.load()
        if saved and all(saved.get(k) == self.start[k] for k in ("batch_size", "n", "seed")) \
                and int(saved.get("next", 0)) >= self.first:
            self.resumed = True
            return saved
        return {**self.start, "flags": torch.zeros(self.first, dtype=torch.bool)}

    def save(self, progress) -> None:
        self.unit.save(progress)


# ----------------------------------------------------------------------------- merging

def read_shards(paths: Sequence[Path], part: str, shards: int, aa_hash: str, train_hash: str,
                checkpoint_sha256: str, indices: List[int]) -> List[Dict[str, Any]]:
    """The shard files of one part, checked to be this run's and complete, by shard."""
    records = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        problems = [what for what, ok in (
            ("not a shard file", record.get("kind") == KIND),
            (f"part {record.get('part')!r}, not {part!r}", record.get("part") == part),
            (f"{record.get('shards')} shards, not {shards}", record.get("shards") == shards),
            ("another AutoAttack identity", record.get("aa_hash") == aa_hash),
            ("another training identity", record.get("train_hash") == train_hash),
            ("another checkpoint file", record.get("checkpoint_sha256") == checkpoint_sha256),
            ("another AutoAttack subset", record.get("n") == len(indices)
             and record.get("indices_hash") == config_hash(list(indices)))) if not ok]
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)} (a shard file of another run; "
                             "delete it to recompute)")
        records.append(record)
    records.sort(key=lambda r: r["shard"])
    if [r["shard"] for r in records] != list(range(shards)):
        raise ValueError(f"{part}: shards {[r['shard'] for r in records]} given, expected "
                         f"0..{shards - 1}")
    return records


def after_stage(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The robust set, per-attack accuracies, warnings and job summaries after one stage's K
    files (each carries what the earlier stages left; they must agree on it)."""
    import torch

    head = records[0]
    for r in records[1:]:
        if r["robust_before"] != head["robust_before"]:
            raise ValueError(f"{r['part']}: shards {head['shard']} and {r['shard']} started from "
                             "different robust sets (is the model deterministic?)")
    n = head["n"]
    robust = torch.zeros(n, dtype=torch.bool)
    robust[torch.tensor(head["robust_before"], dtype=torch.long)] = True
    for r in records:
        robust[torch.tensor(r["broken"], dtype=torch.long)] = False
    per_attack = dict(head["per_attack_before"])
    if head["robust_before"]:   # the package skips (and leaves out) an attack with nothing left
        per_attack[head["attack"]] = int(robust.sum()) / n
    return {"robust": robust, "per_attack": per_attack,
            "warnings": _dedupe([*head["warnings_before"],
                                 *(w for r in records for w in r["warnings"])]),
            "jobs": [*head["jobs_before"], *(_summary(r) for r in records)], "run": head["run"]}


def _summary(record: Dict[str, Any]) -> Dict[str, Any]:
    out = {"part": record["part"], "shard": record["shard"], "shards": record["shards"]}
    if record["part"] == PGD_PART:
        out.update(range=record["range"])
    else:
        out.update(attack=record["attack"], batches=record["batches"],
                   attacked=record["attacked"], broken=len(record["broken"]))
    out.update(max_distance=record["max_distance"], resumed=record["resumed"],
               seconds=record["seconds"])
    return out


def merge_autoattack(paths: Sequence[Path], evaluation: Dict[str, Any], cell: Dict[str, Any],
                     checkpoint_file: Path, bundle, base_threat: Dict[str, Any]) -> Dict[str, Any]:
    """The evaluation's ``autoattack`` block from the shard files (:func:`final_shard_files`):
    the unsharded block's fields and values, plus ``shards`` (K and every job's summary)."""
    import torch

    from .attack_specs import attack_label, normalize_attack_spec
    from .autoattack_adapter import square_check_warnings
    from .eval_core import accuracy_record
    from .eval_extras import evaluated_groups, group_counts
    from .eval_resume import file_sha256
    from .subsets import stratified_subset

    check_shards(evaluation)
    k = shard_count(evaluation)
    if k < 2:
        raise ValueError("shard files given, but evaluation.autoattack.shards is 1")
    aa = _aa(evaluation)
    n_aa, _, _ = _sizes(evaluation)
    aa_seed = int(aa.get("seed", int(evaluation.get("seed", 0))))
    idx = stratified_subset(bundle.test.y, n_aa, aa_seed)
    y, n, classes = bundle.test.y[idx], len(idx), int(bundle.num_classes)
    sha = file_sha256(Path(checkpoint_file))
    last = f"stage{len(stage_attacks(evaluation))}"
    paths = [Path(p) for p in paths]
    stage_paths = [p for p in paths if p.name.startswith(f"{last}-")]
    pgd_paths = [p for p in paths if p.name.startswith(f"{PGD_PART}-")]
    if len(stage_paths) + len(pgd_paths) != len(paths):
        raise ValueError(f"shard files other than {last} and {PGD_PART}: "
                         f"{[str(p) for p in paths if p not in stage_paths + pgd_paths]}")
    stages = read_shards(stage_paths, last, k, autoattack_identity(evaluation, last)["aa_hash"],
                         cell["train_hash"], sha, idx.tolist())
    merged = after_stage(stages)
    robust = merged["robust"]
    groups = evaluated_groups(bundle.test.groups, idx)
    out = {"robust_accuracy": int(robust.sum()) / n, "per_attack": merged["per_attack"],
           "warnings": _dedupe([*merged["warnings"], *square_check_warnings(merged["per_attack"])]),
           **merged["run"], "n_examples": n, **accuracy_record(robust, y, classes),
           "indices": idx.tolist(), "subset_seed": aa_seed}
    if groups is not None:
        out["per_group"] = group_counts(robust, groups, bundle.num_groups)
    jobs = list(merged["jobs"])
    compare = aa.get("compare_pgd")
    if compare:
        compare = normalize_attack_spec(compare, "evaluation.autoattack.compare_pgd")
        p = pgd_parts(evaluation)
        parts = read_shards(pgd_paths, PGD_PART, p, autoattack_identity(evaluation)["aa_hash"],
                            cell["train_hash"], sha, idx.tolist())
        pgd_ok = torch.zeros(n, dtype=torch.bool)
        covered = 0
        for r in parts:
            first, end = r["range"]
            if first != min(covered, n) or len(r["flags"]) != end - first:
                raise ValueError(f"PGD part {r['shard']}: examples {first}..{end} do not follow "
                                 f"{covered}")
            pgd_ok[first:end] = torch.tensor(r["flags"], dtype=torch.bool)
            covered = end
        if covered != n:
            raise ValueError(f"PGD parts cover {covered} of {n} examples")
        record = {**accuracy_record(pgd_ok, y, classes), "attack": compare,
                  "label": attack_label(compare), "threat": base_threat,
                  "max_distance": max(r["max_distance"] for r in parts),
                  "robust_to_pgd_not_aa": int((pgd_ok & ~robust).sum()),
                  "robust_to_aa_not_pgd": int((robust & ~pgd_ok).sum())}
        if groups is not None:
            record["per_group"] = group_counts(pgd_ok, groups, bundle.num_groups)
        out["pgd_same_subset"] = record
        jobs += [_summary(r) for r in parts]
    elif pgd_paths:
        raise ValueError("PGD shard files given, but the evaluation has no compare_pgd")
    out["shards"] = {"count": k, "stages": stage_attacks(evaluation), "jobs": jobs}
    return out
