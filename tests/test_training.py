"""The shared trainer: LR/momentum schedule, resume round trip, CO detection, result schema."""
import copy
import json

import pytest
import torch

from methods import training
from methods.config import config_hash
from methods.results import read_result, validate
from methods.builders import build_schedule
from methods.training import is_catastrophic_overfitting, train_cell


def schedule_values(spec, opt_name="sgd", steps_per_epoch=5, epochs=2, lr=0.2):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([p], lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam([p], lr=lr))
    sched = build_schedule(opt, spec, lr, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs + 1):
        g = opt.param_groups[0]
        out.append((g["lr"], g.get("momentum")))
        opt.step()
        sched.step()
    return out


def test_cyclic_lr_and_momentum_at_known_steps():
    v = schedule_values({"name": "cyclic", "peak_at": 0.5})  # 10 steps, peak at step 5
    assert v[0] == pytest.approx((0.0, 0.9))
    assert v[1] == pytest.approx((0.04, 0.88))       # lr rises 0.2/5 per step, momentum falls
    assert v[5] == pytest.approx((0.2, 0.8))         # peak LR, lowest momentum (spec 2.4)
    assert v[8] == pytest.approx((0.08, 0.86))
    assert v[10] == pytest.approx((0.0, 0.9))


def test_cyclic_peak_at_two_fifths_and_no_momentum_cycling_for_adam():
    v = schedule_values({"name": "cyclic", "peak_at": 0.4}, opt_name="adam")
    assert v[4][0] == pytest.approx(0.2) and v[0][0] == 0.0 and v[10][0] == pytest.approx(0.0)
    assert v[2][0] == pytest.approx(0.1) and v[7][0] == pytest.approx(0.1)


def test_multistep_milestones_are_in_epochs():
    v = schedule_values({"name": "multistep", "milestones": [1], "gamma": 0.1})
    assert v[4][0] == pytest.approx(0.2) and v[5][0] == pytest.approx(0.02)


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="train.schedule.name"):
        schedule_values({"name": "cosine-ish"})


def test_co_detection_compares_with_the_best_earlier_epoch():
    hist = [{"pgd_acc": 0.4}, {"pgd_acc": 0.45}]
    assert not is_catastrophic_overfitting(hist, {"pgd_acc": 0.3}, 0.2)
    assert is_catastrophic_overfitting(hist, {"pgd_acc": 0.2}, 0.2)
    assert not is_catastrophic_overfitting([], {"pgd_acc": 0.0}, 0.2)


def tiny_cell(method="nfgsm", method_args=None, epochs=3):
    cell = {
        "dataset": {"name": "mnist5k", "source": "mnist5k"},
        "arch": {"name": "smallcnn-tiny", "model": "smallcnn", "width": 0.125},
        "recipe": f"{method}_tiny", "method": method, "method_args": method_args or {},
        "threat": {"norm": "linf", "eps": 0.3}, "normalization": "none", "augmentation": "none",
        "train": {"epochs": epochs, "batch_size": 32, "max_steps_per_epoch": 3,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "cyclic", "peak_at": 0.5},
                  "monitor": {"n": 40, "steps": 2}},
        "seed": 3,
        "runtime": {"amp": None, "channels_last": None, "compile": None},
    }
    return rehash(cell)


def rehash(cell):
    cell["train_hash"] = config_hash({k: v for k, v in cell.items() if k != "train_hash"})
    return cell


def run(cell, root, out):
    return train_cell(cell, root / "data", root / "prepared", out, out / "train.json",
                      device="cpu", threads=1, meter_backend="null")


def test_killed_run_resumes_to_the_same_weights(mnist5k_prepared, tmp_path, monkeypatch):
    cell = tiny_cell("bb", {"m": 2, "selection": "gs"})
    straight = run(cell, mnist5k_prepared, tmp_path / "straight")

    real_epoch = training.run_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if args[-2] == 2:  # epoch index
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(cell, mnist5k_prepared, tmp_path / "killed")
    ckpts = tmp_path / "killed" / "checkpoints"
    assert not (tmp_path / "killed" / "train.json").exists(), "no finished-looking output"
    assert (ckpts / "state.pt").exists()
    for output in ("best.pt", "last.pt"):  # Snakemake deletes a failed job's outputs
        (ckpts / output).unlink(missing_ok=True)
    monkeypatch.setattr(training, "run_epoch", real_epoch)
    resumed = run(cell, mnist5k_prepared, tmp_path / "killed")

    assert resumed["resumed_from_epoch"] == 2
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    best_a = torch.load(tmp_path / "straight" / "checkpoints" / "best.pt", weights_only=True)
    best_b = torch.load(ckpts / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"] == straight["checkpoints"]["best"]["epoch"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])


def test_changed_config_does_not_resume_from_a_stale_state(mnist5k_prepared, tmp_path):
    cell = tiny_cell("standard", epochs=1)
    run(cell, mnist5k_prepared, tmp_path)
    other = copy.deepcopy(cell)
    other["train"]["optimizer"]["lr"] = 0.01
    rehash(other)
    record = run(other, mnist5k_prepared, tmp_path)
    assert record["resumed_from_epoch"] is None
    assert list((tmp_path / "checkpoints").glob("state.stale-*.pt"))


def test_train_result_is_schema_valid_and_records_passes_and_provenance(mnist5k_prepared, tmp_path):
    record = run(tiny_cell("pgd_at", {"steps": 4, "alpha": 0.1}, epochs=1), mnist5k_prepared, tmp_path)
    on_disk = read_result(tmp_path / "train.json", "train_result.schema.json")
    assert on_disk == record  # what the trainer returns is exactly what it wrote
    assert on_disk["passes"]["per_example"] == {"forward": 5.0, "backward": 5.0}
    assert on_disk["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert on_disk["checkpoints"]["best"]["selected_by"].startswith("monitor pgd_acc")
    assert {r["path"] for r in on_disk["measurement"]["records"]} >= {"run", "run/train", "run/train/epoch_000"}
    broken = json.loads(json.dumps(on_disk))
    broken["history"][0]["pgd_acc"] = "0.5"
    with pytest.raises(ValueError, match="history/0/pgd_acc"):
        validate(broken, "train_result.schema.json")


def test_bf16_autocast_and_channels_last_train_on_cpu(mnist5k_prepared, tmp_path):
    cell = tiny_cell("nfgsm", epochs=1)
    cell["runtime"].update({"amp": "bf16", "channels_last": True})
    rehash(cell)
    record = run(cell, mnist5k_prepared, tmp_path)
    assert record["runtime"]["precision"] == "bf16" and record["runtime"]["channels_last"]
    assert all(h["train_loss"] is not None and h["train_loss"] == h["train_loss"] for h in record["history"])


@pytest.mark.slow
def test_torch_compile_path_trains(mnist5k_prepared, tmp_path):
    cell = tiny_cell("pgd_at", {"steps": 2, "alpha": 0.1}, epochs=1)
    cell["runtime"]["compile"] = True
    rehash(cell)
    record = run(cell, mnist5k_prepared, tmp_path)
    assert record["runtime"]["compile"] is True
    assert record["passes"]["per_example"] == {"forward": 3.0, "backward": 3.0}
