"""scripts/run_experiments.py on its 2-run tiny grid on the CPU (real Trainer and Tester
processes), a re-run that skips what is done, then scripts/plot_report.py on those runs."""
import json
import os
import shutil

import pytest

from scripts import plot_report, run_experiments

TRAIN = ["--F_dim", "16", "--L_dim", "8", "--N_dim", "4", "--D_out_dim", "16", "--device", "cpu", "--amp", "off",
         "--train_vi_len", "4", "--partial", "0.5", "--val_vi_len", "10", "--batch_size", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid(tiny_dance, tmp_path_factory):
    """The tiny grid run for 2 epochs; returns (out folder, runner argv, runner's exit code, stdout)."""
    dr = tmp_path_factory.mktemp("exp") / "DR"
    shutil.copytree(tiny_dance, dr)  # the loaders write their caches beside the data
    out = tmp_path_factory.mktemp("exp") / "runs"
    argv = ["--grid", "tiny", "--out", str(out), "--epochs", "2",
            "--test_args", "--test_len 20 --num_samples 2 --no_gif", "--", "--DR", str(dr), *TRAIN]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses: no oversubscription on 2 shared cores
    try:
        rc = run_experiments.main(argv)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return out, argv, rc


def test_runner_trains_and_tests_each_run(grid):
    out, _, rc = grid
    assert rc == 0
    for name, prior in (("fixed", "fixed"), ("learned", "learned")):
        run = out / name
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "done" and record["epochs_done"] == 2
        assert json.loads((run / "args.json").read_text())["prior"] == prior
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        res = json.loads((run / "test" / "results.json").read_text())
        assert res["args"]["num_samples"] == 2 and "ssim" in res and "best_of_k_psnr" in res
    # The grid's flags reached the Trainer: the tiny "fixed" run decays teacher forcing 0.5 a epoch.
    rows = [json.loads(x) for x in (out / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tfr"] for r in rows] == [0.5, 0.0]


def test_runner_skips_finished_runs(grid, capsys):
    out, argv, _ = grid
    before = (out / "fixed" / "metrics.jsonl").read_text()
    assert run_experiments.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already; skipped") == 2
    assert (out / "fixed" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("change, named", [
    (["--epochs", "3"], "--epochs 2"),
    (["--", "--lr", "5e-4"], "flags after --"),
])
def test_runner_refuses_finished_runs_made_with_other_settings(grid, capsys, change, named):
    """A rerun with other --epochs or Trainer flags said 'done already; skipped' and reported the
    old settings' results as the new ones."""
    out, argv, _ = grid
    before = (out / "fixed" / "metrics.jsonl").read_text()
    if change[0] == "--":
        new = argv + change[1:]
    else:
        new = list(argv)
        new[new.index(change[0]) + 1] = change[1]
    assert run_experiments.main(new) == 1
    err = capsys.readouterr().err
    assert err.count("holds this run made with other settings") == 2 and named in err
    assert (out / "fixed" / "metrics.jsonl").read_text() == before


def test_flags_after_the_separator_may_not_override_the_grid(capsys):
    """`-- --kl_anneal_type Full_KL` made the run named kl_None train with Full_KL."""
    with pytest.raises(SystemExit) as e:
        run_experiments.main(["--grid", "report", "--dry_run", "--", "--kl_anneal_type", "Full_KL", "--tfr", "1",
                              "--lr", "1e-4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kl_anneal_type, --tfr after -- would override what the runs of grid report set" in err


def test_a_budget_spent_inside_the_first_epoch(tmp_path, monkeypatch, capsys):
    """A run stopped by --minutes before its first epoch ended left a checkpoint but no metrics: the
    runner crashed reading them, on every rerun; a larger --minutes could not continue it."""
    calls = []

    def stopped_in_epoch_1(cmd, log_path, limit_s=None, **kw):
        calls.append((cmd, limit_s))
        save_root = cmd[cmd.index("--resume" if "--resume" in cmd else "--save_root") + 1]
        open(os.path.join(save_root, "last.ckpt"), "w").close()  # the Trainer's mid-epoch checkpoint
        return 143, limit_s, True
    monkeypatch.setattr(run_experiments, "run_logged", stopped_in_epoch_1)
    run = run_experiments.GRIDS["tiny"]()[0]
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 60.0, epochs_given=False) == "failed"
    assert "no epoch finished within the budget (60 s of training)" in capsys.readouterr().err
    # The same budget: nothing left to train, the same answer.
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 60.0, epochs_given=False) == "failed"
    assert len(calls) == 1 and "larger --minutes" in capsys.readouterr().err
    # A larger budget continues the run from its checkpoint with what is left of it.
    run_experiments.run_one(run, str(tmp_path), 3, [], [], 100.0, epochs_given=False)
    assert "--resume" in calls[1][0] and calls[1][1] == pytest.approx(40.0)


def test_a_run_the_budget_stopped_goes_on_with_a_larger_budget(tmp_path, monkeypatch, capsys):
    """A run stopped by --minutes after an epoch is tested and done; a larger --minutes trains it on
    (it was refused as 'made with other settings', so the epochs it had were lost to a restart)."""
    calls = []

    def trainer_stopped_after_one_more_epoch(cmd, log_path, limit_s=None, **kw):
        calls.append((cmd, limit_s))
        if "--ckpt_path" in cmd:  # the Tester
            test_root = cmd[cmd.index("--save_root") + 1]
            os.makedirs(test_root, exist_ok=True)
            with open(os.path.join(test_root, "results.json"), "w") as f:
                json.dump({"psnr": 20.0}, f)
            return 0, 1.0, False
        save_root = cmd[cmd.index("--resume" if "--resume" in cmd else "--save_root") + 1]
        epoch = run_experiments.epochs_done(save_root) + 1
        with open(os.path.join(save_root, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": epoch, "val_psnr": 20.0 + epoch}) + "\n")
        open(os.path.join(save_root, "best.ckpt"), "w").close()
        return 143, limit_s, True
    monkeypatch.setattr(run_experiments, "run_logged", trainer_stopped_after_one_more_epoch)
    run = run_experiments.GRIDS["tiny"]()[0]
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 60.0) == "done"
    assert "1 epoch(s) in 60 s (stopped by the budget)" in capsys.readouterr().out
    # The same budget: done. A smaller one: its result stands for more, refused.
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 60.0) == "done"
    assert "done already" in capsys.readouterr().out
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 30.0) == "failed"
    assert "made with other settings (--minutes 1.0)" in capsys.readouterr().err
    assert len(calls) == 2
    # A larger one: resumed with what is left of it, then tested again.
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 100.0) == "done"
    assert "--resume" in calls[2][0] and calls[2][1] == pytest.approx(40.0) and "--ckpt_path" in calls[3][0]
    assert "2 epoch(s) in 100 s (stopped by the budget)" in capsys.readouterr().out
    with open(tmp_path / run.name / run_experiments.RUN_FILE) as f:
        record = json.load(f)
    assert (record["epochs_done"], record["minutes"], record["status"]) == (2, pytest.approx(100 / 60), "done")


def test_a_run_interrupted_after_its_budget_ran_out_was_stopped_by_it(tmp_path, monkeypatch, capsys):
    """Interrupted once its budget was spent, a run was later tested and marked done as if it had
    finished: a larger --minutes was then refused as 'made with other settings'."""
    calls = []

    def trainer(cmd, log_path, limit_s=None, **kw):
        calls.append((cmd, limit_s))
        if "--ckpt_path" in cmd:  # the Tester
            return 0, 1.0, False
        save_root = cmd[cmd.index("--resume") + 1]
        with open(os.path.join(save_root, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": 2, "val_psnr": 22.0}) + "\n")
        return 143, limit_s, True
    monkeypatch.setattr(run_experiments, "run_logged", trainer)
    run = run_experiments.GRIDS["tiny"]()[0]
    folder = tmp_path / run.name
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_psnr": 21.0}) + "\n")
    (folder / "best.ckpt").write_bytes(b"")
    # What the interrupted invocation left: its training time at the interrupt, the whole budget.
    (folder / run_experiments.RUN_FILE).write_text(json.dumps(
        {"status": "training", "train_s": 60.0, "num_epoch": 3, "flags": run.flags, "extra": [], "minutes": 1.0}))
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 60.0, epochs_given=False) == "done"
    assert "1 epoch(s) in 60 s (stopped by the budget)" in capsys.readouterr().out
    assert run_experiments.run_one(run, str(tmp_path), 3, [], [], 100.0, epochs_given=False) == "done"
    assert "--resume" in calls[1][0] and calls[1][1] == pytest.approx(40.0)


def test_ctrl_c_after_the_budget_stop_sends_no_second_signal(tmp_path, monkeypatch):
    """The Trainer, told to stop by the budget's SIGTERM, was then sent SIGINT by a Ctrl-C to the
    runner: a second signal, on which it aborts without its checkpoint."""
    got = tmp_path / "signals.txt"
    child = ("import signal, sys, time\n"
             "def note(n, f):\n"
             f"    open({str(got)!r}, 'a').write(signal.Signals(n).name + ' ')\n"
             "    if n == signal.SIGTERM:\n"
             "        time.sleep(1.0)\n"  # saving its checkpoint
             "        sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, note)\n"
             "signal.signal(signal.SIGINT, note)\n"
             "time.sleep(30)\n")
    log = tmp_path / "log.txt"
    real_sleep = run_experiments.time.sleep

    def sleep(s):  # Ctrl-C arrives while the Trainer saves after the budget's SIGTERM
        real_sleep(s)
        if got.exists():
            raise KeyboardInterrupt
    monkeypatch.setattr(run_experiments.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        run_experiments.run_logged([run_experiments.sys.executable, "-c", child], str(log), limit_s=0.5)
    assert got.read_text().split() == ["SIGTERM"]


def test_only_keeps_each_runs_place_in_the_grid(tmp_path, monkeypatch):
    """--only numbered the runs it picked from 0, so plot_report's table of runs made by separate
    --only invocations came out in another order than the grid's."""
    seen = {}

    def run_one(run, out, num_epoch, extra, test_extra, limit_s, index=0, epochs_given=True):
        seen[run.name] = index
        return "done"
    monkeypatch.setattr(run_experiments, "run_one", run_one)
    names = [r.name for r in run_experiments.GRIDS["report"]()]
    pick = names[3]
    assert run_experiments.main(["--grid", "report", "--only", pick, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert seen == {pick: 3}


def test_calibration_sizes_runs_to_the_budget(tmp_path, monkeypatch, capsys):
    """Two timed epochs of the grid's first run give the epochs per run (within 90 % of --minutes),
    cached for the same flags; timed without --fast_train, whose short first epochs would size the
    runs for more epochs than fit."""
    calls = []

    def two_epochs(cmd, log_path, on_row=None, metrics_path=None, **kw):
        calls.append(cmd)
        on_row(1, 25.0)  # 5 s start-up, then 20 s an epoch
        on_row(2, 45.0)
        return 0, 46.0, False
    monkeypatch.setattr(run_experiments, "run_logged", two_epochs)
    grid = run_experiments.GRIDS["tiny"]()
    extra = ["--device", "cpu", "--fast_train"]
    # (0.9 * 180 s - 5 s) // 20 s = 7 epochs
    assert run_experiments.calibrate(grid, str(tmp_path), extra, 3.0) == 7
    assert "--fast_train" not in calls[0] and calls[0][-2:] == ["--device", "cpu"]
    assert "20.0 s per epoch, 5.0 s start-up -> 7 epoch(s) per run" in capsys.readouterr().out
    assert run_experiments.calibrate(grid, str(tmp_path), extra, 1.0) == 2 and len(calls) == 1  # cached
    assert run_experiments.calibrate(grid, str(tmp_path), ["--device", "cpu"], 0.1) == 1 and len(calls) == 2


def test_plotter_writes_figures_and_table(grid, tmp_path):
    out, _, _ = grid
    report = tmp_path / "report"
    assert plot_report.main([str(p) for p in sorted(out.iterdir())] + ["--out", str(report)]) == 0
    for name in ("tf.png", "kl.png", "kl_compare.png", "prior_compare.png", "psnr_per_frame.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG), name
        assert len(data) < 200_000
    table = (report / "results.md").read_text().splitlines()
    assert table[0].startswith("| run |") and "test SSIM" in table[0] and "oracle" in table[0]
    body = table[2:]
    assert [row.split("|")[1].strip() for row in body] == ["fixed", "learned"]
    for row in body:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(table[0].strip("|").split("|"))
        assert all(cells), row  # every cell filled (a dash at most)


def test_tester_gets_only_the_flags_it_knows():
    extra = ["--DR", "d", "--device", "cpu", "--milestones", "2", "5", "--kl_anneal_type", "None",
             "--plain", "--batch_size", "8", "--seed=3"]
    # --batch_size is sequences per step to the Trainer, rollouts at once to the Tester: not passed.
    assert run_experiments.tester_share(extra) == ["--DR", "d", "--device", "cpu", "--plain", "--seed=3"]


def fake_run(folder, rows, tail=""):
    """A run folder with the metrics rows given (and `tail` appended as written so far)."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)
    (folder / "args.json").write_text(json.dumps({"kl_anneal_type": "Monotonic", "tfr": 1.0, "tfr_sde": 10,
                                                  "tfr_d_step": 0.1, "prior": "fixed"}))
    return str(folder)


def test_plotter_reads_a_run_whose_last_row_is_cut_short(tmp_path, capsys):
    """A run killed (or still writing) mid-row leaves a partial last line in metrics.jsonl: the
    plotter uses the whole rows (it stopped with a JSONDecodeError traceback)."""
    rows = [{"epoch": e, "loss": 0.5 / e, "mse": 0.5 / e, "kl": 1.0, "beta": 1.0, "tfr": 1.0, "val_psnr": 20.0 + e,
             "val_psnr_per_frame": [20.0, 21.0]} for e in (1, 2)]
    run = fake_run(tmp_path / "run", rows, tail='{"epoch": 3, "loss": 0.1')
    assert plot_report.main([run, "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "results.md").read_text().splitlines()
    assert table[2].split("|")[6].strip() == "2"  # epochs: the two whole rows


def test_plotter_reads_a_run_without_a_readable_args_json(tmp_path):
    """args.json is rewritten at every (re)start: a run killed then leaves it empty. The plotter
    labels the unknown settings "?" (it stopped with a TypeError traceback)."""
    rows = [{"epoch": 1, "loss": 0.5, "mse": 0.5, "kl": 1.0, "beta": 1.0, "tfr": 1.0, "val_psnr": 21.0}]
    run = fake_run(tmp_path / "run", rows)
    (tmp_path / "run" / "args.json").write_text("")
    assert plot_report.main([run, "--out", str(tmp_path / "report")]) == 0
    row = (tmp_path / "report" / "results.md").read_text().splitlines()[2]
    assert [c.strip() for c in row.split("|")[1:6]] == ["run", "?", "?", "?", "?"]  # not "fixed", "mse"


def test_plotter_reads_hand_edited_files(tmp_path):
    """args.json or run.json holding a list or a string, and rows without a loss, were tracebacks
    (AttributeError; matplotlib refusing a log scale of no data)."""
    rows = [{"epoch": e, "mse": 0.5 / e, "val_psnr": 20.0 + e} for e in (1, 2)]
    run = fake_run(tmp_path / "run", rows)
    (tmp_path / "run" / "args.json").write_text("[1, 2]")
    (tmp_path / "run" / "run.json").write_text('"fixed"')
    assert plot_report.main([run, "--out", str(tmp_path / "report")]) == 0
    row = (tmp_path / "report" / "results.md").read_text().splitlines()[2]
    assert [c.strip() for c in row.split("|")[1:6]] == ["run", "?", "?", "?", "?"]  # not "fixed", "mse"


@pytest.mark.parametrize("tested, stale", [(1, True), (3, False)])
def test_plotter_marks_a_test_of_a_replaced_checkpoint(tmp_path, capsys, tested, stale):
    """A run tested after epoch 1 and trained on to a better epoch 3 showed epoch 3's validation
    beside epoch 1's test, unmarked."""
    rows = [{"epoch": e, "loss": 0.5 / e, "mse": 0.5 / e, "val_psnr": 20.0 + e} for e in (1, 2, 3)]
    run = fake_run(tmp_path / "run", rows)
    (tmp_path / "run" / "test").mkdir()
    (tmp_path / "run" / "test" / "results.json").write_text(json.dumps(
        {"psnr": 7.77, "checkpoint_epoch": tested, "args": {"ckpt_path": "runs/x/best.ckpt"}}))
    assert plot_report.main([run, "--out", str(tmp_path / "report")]) == 0
    row = (tmp_path / "report" / "results.md").read_text().splitlines()[2]
    cell = [c.strip() for c in row.split("|")][8]
    err = capsys.readouterr().err
    if stale:
        assert cell == "7.77 (stale: epoch 1)"
        assert "test/results.json is of the epoch-1 best.ckpt; the run's best.ckpt is now epoch 3" in err
        assert f"python Tester.py --ckpt_path {os.path.join(run, 'best.ckpt')}" in err
    else:
        assert cell == "7.77" and err == ""


def test_tester_records_the_epoch_of_its_checkpoint(grid):
    out, _, _ = grid
    for run in out.iterdir():
        rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
        best = max(rows, key=lambda r: r["val_psnr"])["epoch"]
        assert json.load(open(run / "test" / "results.json"))["checkpoint_epoch"] == best


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    """--out naming a file: one line and exit 2 from both scripts (were FileExistsError tracebacks)."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    rows = [{"epoch": 1, "loss": 0.5, "mse": 0.5, "kl": 1.0, "beta": 1.0, "tfr": 1.0, "val_psnr": 21.0}]
    run = fake_run(tmp_path / "run", rows)
    assert plot_report.main([run, "--out", str(blocked)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write the report to --out {blocked}")
    assert run_experiments.main(["--grid", "tiny", "--out", str(blocked), "--epochs", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {blocked}: ")


def test_runner_test_args_with_an_open_quote_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_experiments.main(["--grid", "tiny", "--out", str(tmp_path / "o"), "--epochs", "1",
                              "--test_args", '--test_len "60'])
    assert exit_.value.code == 2
    assert "--test_args" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_dry_run_needs_no_budget(tmp_path, capsys):
    """--dry_run prints the commands (num_epoch N without --epochs); it was refused for want of a
    budget, so the "N" it prints was never reached."""
    assert run_experiments.main(["--grid", "tiny", "--out", str(tmp_path / "o"), "--dry_run", "--", "--DR", "d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--num_epoch N --DR d" in line for line in lines)
    assert not (tmp_path / "o").exists()


def test_the_epoch_coin_is_marked_only_when_it_decides():
    """Per frame, half the frames of epoch 1 were teacher-forced, yet the figure marked it
    'coin: no TF' from the coin the engine logs in every mode."""
    rows = [{"epoch": 1, "tfr": 0.5, "tf_epoch_coin": False}, {"epoch": 2, "tfr": 0.0, "tf_epoch_coin": False}]
    args = {"tfr": 1.0, "tfr_sde": 0, "tfr_d_step": 0.5}
    assert plot_report.coin_off_epochs({"args": args, "rows": rows}) == [1]
    assert plot_report.coin_off_epochs({"args": dict(args, tf_mode="frame"), "rows": rows}) == []
    assert plot_report.tf_label(dict(args, tf_mode="frame")) == "tfr 1, sde 0, step 0.5, per frame"
    assert plot_report.tf_label(args) == "tfr 1, sde 0, step 0.5"


def test_a_run_that_wrote_nothing_does_not_hold_its_settings(tmp_path, monkeypatch, capsys):
    """A mistyped Trainer flag after -- failed both runs; the corrected command was then refused
    ("holds this run made with other settings"), though nothing had been trained in the folders.
    A run with a checkpoint still is."""
    run = run_experiments.GRIDS["tiny"]()[0]
    calls = []

    def fake_run_logged(cmd, log_path, **kw):  # the Trainer refusing its flags, without the processes
        calls.append(cmd)
        with open(log_path, "w") as f:
            f.write("error: unrecognized arguments\n")
        return 2, 0.1, False
    monkeypatch.setattr(run_experiments, "run_logged", fake_run_logged)
    out = str(tmp_path / "o")
    assert run_experiments.run_one(run, out, 1, ["--batchsize", "2"], [], None) == "failed"
    assert run_experiments.run_one(run, out, 1, ["--batch_size", "2"], [], None) == "failed"
    err = capsys.readouterr().err
    assert "other settings" not in err and err.count("Trainer failed (exit 2)") == 2
    assert len(calls) == 2 and calls[1][-2:] == ["--batch_size", "2"]
    assert json.load(open(os.path.join(out, run.name, "run.json")))["extra"] == ["--batch_size", "2"]
    open(os.path.join(out, run.name, "last.ckpt"), "wb").close()  # now it holds a result of those settings
    assert run_experiments.run_one(run, out, 1, ["--batch_size", "4"], [], None) == "failed"
    assert "holds this run made with other settings (flags after -- --batch_size 2)" in capsys.readouterr().err
    assert len(calls) == 2


@pytest.mark.parametrize("flag", ["--save_root", "--resume", "--ckpt_path", "--num_epoch"])
def test_flags_the_runner_sets_are_refused_after_the_separator(tmp_path, capsys, flag):
    """-- --save_root X trained the first run into X, then reported it had no epoch within its
    budget, and failed the second (X already held checkpoints)."""
    with pytest.raises(SystemExit) as exit_:
        run_experiments.main(["--grid", "tiny", "--out", str(tmp_path / "o"), "--epochs", "1", "--", flag, "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} after --: the runner sets it for every run" in err
    assert not (tmp_path / "o").exists()


def test_report_grid_runs_are_what_their_names_say():
    """The report grid compares each factor against one base setting (the lab's Cyclical, tfr 1 /
    sde 5 / step 0.1, the fixed prior): every other run changes only what its name says, and is in
    only the comparison of that factor (a run in another figure would be compared on a factor it
    does not vary). 4 KL + 3 TF + 2 prior settings, sharing the base run: 7 runs."""
    import re
    base = {"kl_anneal_type": "Cyclical", "tfr": 1.0, "tfr_sde": 5, "tfr_d_step": 0.1, "prior": "fixed"}
    runs = run_experiments.GRIDS["report"]()
    assert len(runs) == 7 and len({r.name for r in runs}) == 7
    sizes = {"kl": 0, "tf": 0, "prior": 0}
    for r in runs:
        for g in r.groups:
            sizes[g] += 1
        if r.name == "base":
            assert r.flags == base and set(r.groups) == {"kl", "tf", "prior"}
            continue
        if m := re.fullmatch(r"kl_(\w+)", r.name):
            want, group = {"kl_anneal_type": m[1]}, "kl"
        elif m := re.fullmatch(r"tf_([\d.]+)(?:_sde(\d+)_step([\d.]+))?", r.name):
            want, group = {"tfr": float(m[1])}, "tf"
            if m[2]:
                want.update(tfr_sde=int(m[2]), tfr_d_step=float(m[3]))
        else:
            m = re.fullmatch(r"prior_(\w+)", r.name)
            want, group = {"prior": m[1]}, "prior"
        assert r.flags == {**base, **want}, r.name
        assert tuple(r.groups) == (group,), r.name
    assert sizes == {"kl": 4, "tf": 3, "prior": 2}


def test_to_argv():
    assert run_experiments.to_argv({"tfr": 0.75, "prior": "learned"}) == ["--tfr", "0.75", "--prior", "learned"]
    assert run_experiments.to_argv({"milestones": [2, 5], "plain": True, "amp": False, "ckpt_path": None}) == \
        ["--milestones", "2", "5", "--plain"]


def test_report_figures_and_table_show_each_runs_values(tmp_path, monkeypatch):
    """What the figures plot, read off the figures: the KL panels show beta (not the teacher-forcing
    ratio), the comparison's middle panel the reconstruction error, the per-frame figure each run's
    curve at its best epoch, frames numbered from 1; runs are grouped by run.json and put in grid
    order; an epoch logged twice (a run resumed by hand from an older checkpoint) counts once, as
    logged last."""
    def row(e, beta, tfr, val, mse):
        return {"epoch": e, "loss": 2 * mse + 0.1, "mse": mse, "kl": 1.0, "beta": beta, "tfr": tfr,
                "val_psnr": val, "val_psnr_per_frame": [val - 1, val + 1]}
    cyc = fake_run(tmp_path / "cyc", [row(1, 0.1, 1.0, 20.0, 0.05), row(2, 0.5, 1.0, 30.0, 0.04),
                                      row(2, 0.5, 1.0, 25.0, 0.03), row(3, 1.0, 0.9, 22.0, 0.02)])
    (tmp_path / "cyc" / "args.json").write_text(json.dumps(
        {"kl_anneal_type": "Cyclical", "kl_anneal_cycle": 10, "tfr": 1.0, "tfr_sde": 10, "tfr_d_step": 0.1}))
    (tmp_path / "cyc" / "run.json").write_text(json.dumps({"name": "cyc", "index": 1, "groups": ["kl", "tf"]}))
    full = fake_run(tmp_path / "full", [row(1, 1.0, 0.0, 18.0, 0.06), row(2, 1.0, 0.0, 19.0, 0.05)])
    (tmp_path / "full" / "args.json").write_text(json.dumps({"kl_anneal_type": "Full_KL", "tfr": 0.0}))
    (tmp_path / "full" / "run.json").write_text(json.dumps({"name": "full", "index": 0, "groups": ["kl"]}))
    figs, real = {}, plot_report.save

    def keep(fig, path):
        figs[os.path.basename(path)] = fig
        return real(fig, path)
    monkeypatch.setattr(plot_report, "save", keep)
    assert plot_report.main([cyc, full, "--out", str(tmp_path / "report")]) == 0

    def panels(name):  # the panels with a title: {title: first line's (x, y)}
        return {ax.get_title(): (list(ax.lines[0].get_xdata()), list(ax.lines[0].get_ydata()))
                for ax in figs[name].axes if ax.get_title()}
    assert panels("kl.png") == {"Full_KL  (full)": ([1, 2], [1.0, 1.0]),
                                "Cyclical (10 cycles)  (cyc)": ([1, 2, 3], [0.1, 0.5, 1.0])}
    assert panels("tf.png") == {"tfr 1, sde 10, step 0.1  (cyc)": ([1, 2, 3], [1.0, 1.0, 0.9])}  # full: kl only
    _, recon, val = figs["kl_compare.png"].axes[:3]
    assert recon.get_title() == "train mse"
    assert [list(line.get_ydata()) for line in recon.lines] == [[0.06, 0.05], [0.05, 0.03, 0.02]]
    assert [list(line.get_ydata()) for line in val.lines] == [[18.0, 19.0], [20.0, 25.0, 22.0]]
    (ax,) = figs["psnr_per_frame.png"].axes
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines] == \
        [([1, 2], [18.0, 20.0]), ([1, 2], [24.0, 26.0])]  # full at epoch 2, cyc at epoch 2
    assert "epoch 2" in ax.lines[1].get_label()
    table = (tmp_path / "report" / "results.md").read_text().splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [c[:2] for c in cells] == [["full", "Full_KL"], ["cyc", "Cyclical (10 cycles)"]]
    assert [c[5:7] for c in cells] == [["2", "19.00 (2)"], ["3", "25.00 (2)"]]


@pytest.mark.parametrize("ckpt, stale", [("last.ckpt", True), ("epoch_2.ckpt", False)])
def test_plotter_marks_a_test_of_a_last_checkpoint_trained_on(tmp_path, capsys, ckpt, stale):
    """A test of last.ckpt at epoch 2, the run since trained to epoch 3: the table marks it stale;
    a test of epoch_2.ckpt is of a file that stays epoch 2's."""
    rows = [{"epoch": e, "loss": 0.5 / e, "mse": 0.5 / e, "val_psnr": 20.0 + e} for e in (1, 2, 3)]
    run = fake_run(tmp_path / "run", rows)
    (tmp_path / "run" / "test").mkdir()
    (tmp_path / "run" / "test" / "results.json").write_text(json.dumps(
        {"psnr": 7.77, "checkpoint_epoch": 2, "args": {"ckpt_path": f"runs/x/{ckpt}"}}))
    assert plot_report.main([run, "--out", str(tmp_path / "report")]) == 0
    row = (tmp_path / "report" / "results.md").read_text().splitlines()[2]
    assert [c.strip() for c in row.split("|")][8] == ("7.77 (stale: epoch 2)" if stale else "7.77")
    err = capsys.readouterr().err
    assert ("the run's last.ckpt is now epoch 3" in err) if stale else err == ""
