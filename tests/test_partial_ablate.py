"""ablate.py --partial: CSL's comparison (ignore, negative, selective) planned on simulated partial labels."""
import shlex

from asl.apps import ablate
from asl.cli import run_main


def test_the_partial_plan_runs_three_modes_on_one_simulation_with_the_ignore_runs_prior(tmp_path, capsys):
    out = tmp_path / "abl"
    assert run_main(ablate.main, ["--partial", "fpc:1000", "--output-dir", str(out), "--dry-run"]) == 0
    commands = [shlex.split(line)[2:] for line in capsys.readouterr().out.splitlines()
                if line.startswith("python train.py ")]
    modes = [c[c.index("--partial-loss-mode") + 1] for c in commands]
    assert modes == ["ignore", "negative", "selective"]
    assert all(c[c.index("--simulate-partial") + 1] == "fpc:1000" for c in commands)
    ignore, negative, selective = commands
    assert selective[selective.index("--prior-path") + 1] == str(out / "runs" / "ignore" / "prior.csv")
    assert ignore[ignore.index("--output-dir") + 1] == str(out / "runs" / "ignore")
    # cross-entropy for the two baselines; CSL README's FPC numbers for the selective loss
    for command in (ignore, negative):
        assert [command[command.index(f) + 1] for f in ("--gamma-neg", "--gamma-pos", "--clip", "--gamma-unann")] \
            == ["0", "0", "0", "0"]
    assert [selective[selective.index(f) + 1] for f in ("--gamma-neg", "--gamma-unann", "--prior-threshold")] \
        == ["3", "4", "0.5"]


def test_partial_refuses_other_variants_and_the_flags_it_sets(tmp_path, capsys):
    assert run_main(ablate.main, ["--partial", "rps:0.5", "--variants", "ce:0,0,0", "--output-dir", str(tmp_path),
                                  "--dry-run"]) == 2
    assert "--partial runs CSL's three variants" in capsys.readouterr().err
    assert run_main(ablate.main, ["--partial", "rps:0.5", "--output-dir", str(tmp_path), "--dry-run", "--",
                                  "DATA", "--prior-path", "p.csv"]) == 2
    assert "--prior-path is set by ablate.py" in capsys.readouterr().err
    assert run_main(ablate.main, ["--partial", "rps:1.5", "--output-dir", str(tmp_path)]) == 2
    assert "within [0, 1]" in capsys.readouterr().err
