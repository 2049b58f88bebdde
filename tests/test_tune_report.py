"""Fast tier: the live trial table keeps Tune's control loop free of drawing, and ends showing the final state."""

from types import SimpleNamespace

from steward.tune.report import LiveTable


def trial(trial_id: str, lr: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status="RUNNING", config={"train.optimizer.lr": lr}, last_result={})


def test_results_only_note_the_trials_and_the_table_is_built_at_rich_s_refresh_rate(capsys, monkeypatch):
    live = LiveTable("val_accuracy", ["train.optimizer.lr"])
    built = []
    table = live.table
    monkeypatch.setattr(live, "table", lambda: built.append(1) or table())
    trials = [trial("t_00000", 1e-3), trial("t_00001", 2e-3)]
    live.on_trial_start(0, trials, trials[0])
    for step in range(2000):  # a burst of results, as short trials give: far more than a person can read
        trials[step % 2].last_result = {"val_accuracy": step / 2000, "training_iteration": step}
        live.on_trial_result(step, trials, trials[step % 2], trials[step % 2].last_result)
    trials[1].status = "TERMINATED"
    live.on_experiment_end(trials)
    assert len(built) < 50, len(built)  # about REFRESH_HZ a second while the burst lasted, plus the last draw
    out = capsys.readouterr().out
    assert "terminated" in out and "0.9995" in out and "0.002" in out
